"""Streaming loader: disjoint/complete splits over ranks x workers, shuffling, exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.loader import ShardStream, build_eval_loader, build_train_loader, micro_batches_per_step
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import iter_shard_rows, load_manifest
from edlm_dist.errors import CheckpointError, ConfigError

CFG = SyntheticConfig(num_tokens=30, num_topics=2, branching=20, concentration=5.0, train_rows=47, valid_rows=23)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_data("synthetic", out, seq_len=12, shard_rows=10, seed=3, synthetic_cfg=CFG, progress=False)
    return out


def file_rows(data_dir: Path, split: str) -> list[tuple[int, ...]]:
    """All rows of a split in file order, read independently of the loader."""
    manifest = load_manifest(data_dir)
    shards = manifest["splits"][split]["shards"]
    return [tuple(r.tolist()) for s in shards for r in iter_shard_rows(data_dir / s["file"])]


def rows_of(batches) -> list[tuple[int, ...]]:
    return [tuple(r) for b in batches for r in b.tolist()]


def take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_file_rows_are_distinct(data_dir):
    # The coverage tests below compare multisets; distinct rows make them exact.
    for split in ("train", "valid"):
        assert len(set(file_rows(data_dir, split))) == len(file_rows(data_dir, split))


def test_eval_two_ranks_two_simulated_workers_cover_every_row_once(data_dir):
    seen = []
    for rank in range(2):
        stream = ShardStream(data_dir, "valid", micro_batch=4, dp_rank=rank, dp_world=2, num_workers=2,
                             shuffle=False, infinite=False)
        for worker in range(2):
            seen += rows_of(stream.stream_batches(worker))
    assert seen == file_rows(data_dir, "valid")  # contiguous blocks in rank-major, worker-minor order


def test_eval_loader_with_real_dataloader_workers(data_dir):
    per_rank = [rows_of(build_eval_loader(data_dir, micro_batch=4, dp_rank=r, dp_world=2, num_workers=2))
                for r in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(file_rows(data_dir, "valid"))
    assert sorted(len(p) for p in per_rank) == [11, 12]
    loader = build_eval_loader(data_dir, micro_batch=4, dp_rank=0, dp_world=2, num_workers=2)
    assert rows_of(loader) == rows_of(loader)  # each pass restarts from the first row
    assert loader.num_rows() == len(per_rank[0]) and loader.num_batches() == 4  # 6 + 5 rows -> 2 + 2


def test_eval_max_rows(data_dir):
    seen = []
    for rank in range(3):
        seen += rows_of(build_eval_loader(data_dir, micro_batch=2, dp_rank=rank, dp_world=3, max_rows=10))
    assert seen == file_rows(data_dir, "valid")[:10]


def test_train_epoch_is_a_disjoint_complete_shuffle(data_dir):
    epochs = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            stream = ShardStream(data_dir, "train", micro_batch=3, dp_rank=rank, dp_world=2, num_workers=2,
                                 seed=5, shuffle_buffer=4, infinite=True)
            for worker in range(2):
                a, b = stream.block(worker)
                rows = stream.stream_rows(worker, skip_rows=epoch * (b - a))
                seen += [tuple(next(rows).tolist()) for _ in range(b - a)]
        assert Counter(seen) == Counter(file_rows(data_dir, "train"))
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != file_rows(data_dir, "train")


def test_train_loader_same_rank_identical_other_rank_disjoint(data_dir):
    kwargs = dict(micro_batch=3, dp_world=2, seed=9, shuffle_buffer=8, num_workers=0)
    a = rows_of(take(build_train_loader(data_dir, dp_rank=0, **kwargs), 7))
    b = rows_of(take(build_train_loader(data_dir, dp_rank=0, **kwargs), 7))  # a tensor-parallel peer
    c = rows_of(take(build_train_loader(data_dir, dp_rank=1, **kwargs), 7))
    assert a == b and not set(a) & set(c)
    d = rows_of(take(build_train_loader(data_dir, dp_rank=0, **{**kwargs, "seed": 10}), 7))
    assert d != a


@pytest.mark.parametrize("num_workers, stop", [(0, 5), (2, 7), (2, 8)])
def test_resume_continues_exactly_across_epochs(data_dir, num_workers, stop):
    kwargs = dict(micro_batch=3, dp_rank=1, dp_world=2, seed=11, shuffle_buffer=5, num_workers=num_workers)
    total = 20  # 60 rows per rank: each stream (11-12 rows) crosses 2+ epoch boundaries
    reference = take(build_train_loader(data_dir, **kwargs), total)
    first = build_train_loader(data_dir, **kwargs)
    assert torch.equal(torch.stack(take(first, stop)), torch.stack(reference[:stop]))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    assert state["batches"] == stop
    resumed = build_train_loader(data_dir, **kwargs)
    resumed.load_state_dict(state)
    after = take(resumed, total - stop)
    assert all(torch.equal(x, y) for x, y in zip(after, reference[stop:]))
    assert resumed.state_dict()["batches"] == total


def test_resume_state_from_another_rank_and_layout_checks(data_dir):
    kwargs = dict(micro_batch=3, dp_world=2, seed=11, shuffle_buffer=5, num_workers=0)
    rank0 = build_train_loader(data_dir, dp_rank=0, **kwargs)
    take(rank0, 4)
    reference = take(build_train_loader(data_dir, dp_rank=1, **kwargs), 9)[4:]
    rank1 = build_train_loader(data_dir, dp_rank=1, **kwargs)
    rank1.load_state_dict(rank0.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(take(rank1, 5), reference))

    other = build_train_loader(data_dir, dp_rank=0, **{**kwargs, "num_workers": 2})
    with pytest.raises(CheckpointError, match="num_workers 1 -> 2"):
        other.load_state_dict(rank0.state_dict())
    other.load_state_dict(rank0.state_dict(), strict=False)  # 4*3*2 = 24 of 47 rows: epoch 0 in progress
    assert other.stream.first_epoch == 1 and other.batches == 0


def test_micro_batches_per_step():
    assert micro_batches_per_step(32, 4, 2) == 4
    assert micro_batches_per_step(8, 8, 1) == 1
    with pytest.raises(ConfigError, match="multiple of 12"):
        micro_batches_per_step(32, 4, 3)
    with pytest.raises(ConfigError, match=">= 1"):
        micro_batches_per_step(32, 0, 2)
