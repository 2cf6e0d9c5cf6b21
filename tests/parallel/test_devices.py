"""The device helpers (edlm_dist/parallel/devices.py, collectives.py): generators on the run's device,
collective tensors on the backend's device, the GPU a rank drives, generator states across device types.

A CPU machine cannot build a CUDA tensor, so the NCCL branch is checked through the device it
chooses (the backend is faked; nothing is allocated there); tests/gpu runs it for real.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from edlm_dist.errors import ConfigError
from edlm_dist.parallel import collectives, devices
from tests.spawn import run_on_ranks


def test_device_generator_is_seeded_on_the_requested_device():
    generator = devices.device_generator(torch.device("cpu"), 7)
    assert generator.device == torch.device("cpu")
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=torch.Generator().manual_seed(7)))


def test_generator_state_round_trip_on_the_same_device_type():
    generator = devices.device_generator("cpu", 3)
    torch.rand(10, generator=generator)
    saved = devices.generator_state(generator)
    expected = torch.rand(4, generator=generator)
    fresh = devices.device_generator("cpu", 99)
    assert devices.restore_generator(fresh, saved, reseed=5) is True
    assert torch.equal(torch.rand(4, generator=fresh), expected)


def test_generator_saved_on_another_device_type_is_reseeded_not_misread():
    # A CUDA generator's state is a (seed, offset) pair: it must never be poured into a CPU generator.
    saved = {"device_type": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    generator = devices.device_generator("cpu", 1)
    assert devices.restore_generator(generator, saved, reseed=1234) is False
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(1234)))


def test_bare_cpu_state_of_older_checkpoints_still_restores():
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    expected = torch.rand(3, generator=generator)
    target = devices.device_generator("cpu", 0)
    assert devices.restore_generator(target, state, reseed=0) is True
    assert torch.equal(torch.rand(3, generator=target), expected)


def test_collective_device_follows_the_backend(monkeypatch):
    assert devices.collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert devices.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert devices.collective_device() == torch.device("cpu")


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 1, 0)])
def test_cuda_device_index(local_rank, visible, expected):
    # One visible GPU: the scheduler bound one GPU per task, so it is ordinal 0 whatever the local rank.
    assert devices.cuda_device_index(local_rank, visible) == expected


def test_more_ranks_than_gpus_on_a_node_is_refused():
    with pytest.raises(ConfigError, match="local rank 4 has no GPU of its own: this node shows 4 GPUs"):
        devices.cuda_device_index(4, 4)


def _reductions_under_meta_default(world: int):
    """Reductions must not depend on the default device: with it set to ``meta`` (a stand-in for "not where
    the backend reduces"), any tensor built without an explicit device would land on meta."""
    from edlm_dist.artifacts.checkpoint import _all_ok
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["train.global_batch=4", "train.micro_batch=1"]))
    with torch.device("meta"):
        return {
            "sum": collectives.all_reduce_values([1.0, float(ctx.rank)]),
            "max": collectives.max_over_ranks(10.0 * ctx.rank),
            "any": collectives.any_rank(ctx.rank == world - 1),
            "none": collectives.any_rank(False),
            "all_ok": _all_ok(ctx.rank != 0),
            "float64": collectives.all_reduce_float64([0.5], ctx.dp_group),
        }


@pytest.mark.multirank
def test_reductions_place_their_tensors_on_the_backend_device():
    for row in run_on_ranks(_reductions_under_meta_default, 2, 2):
        assert row == {"sum": [2.0, 1.0], "max": 10.0, "any": True, "none": False, "all_ok": False, "float64": [1.0]}
