"""Deterministic, exactly resumable streaming loader over prepared shards.

Shards are read through WebDataset's URL layer (``webdataset.gopen`` + its tar iterator), so the
dataset may be a local folder, an ``http(s)://`` URL or a ``pipe:`` command (:mod:`locations`); a
failed remote read is retried at the row it had reached, then raises. The batches never depend on
where the shards live.

Design (WebDataset has no mid-epoch resume, so the order is a pure function we can re-enter):

* **Streams.** Every data-parallel rank runs ``W = max(num_workers, 1)`` reader streams; stream
  ``s = dp_rank * W + worker`` of ``S = dp_world * W``. ``dp_rank``/``dp_world`` are the
  *data-parallel* rank and size (Megatron's DP group): tensor-parallel peers pass the same
  ``dp_rank`` and get identical batches.
* **Epoch order.** Epoch ``e`` of a split is one sequence of all ``N`` rows: shards in a seeded
  order ``perm(seed, e)`` (file order when not shuffling), rows in file order inside a shard.
  Stream ``s`` owns the contiguous block ``[N*s//S, N*(s+1)//S)`` of that sequence, so streams
  are disjoint, together complete, and differ by at most one row.
* **Shuffle.** A block is read in windows of ``shuffle_buffer`` rows and each window is permuted
  with ``rng(seed, e, s, window)``: a replayable stand-in for WebDataset's shuffle buffer. With a
  new shard order per epoch (and prepare-data writing training rows in shuffled order) every
  epoch is a new shuffle.
* **Batches.** A training stream is epoch 0's block, then epoch 1's, ... forever; a batch is the
  next ``micro_batch`` rows (a batch may straddle an epoch boundary). The rank's loader takes
  batch ``k`` from worker ``k % W``, which is torch ``DataLoader``'s round-robin order.

**Resume guarantee.** ``state_dict()`` records ``batches``, the number of batches the loader has
handed out. Worker ``w`` produced ``batches // W + (w < batches % W)`` of them, so the rows every
stream consumed are known exactly; after ``load_state_dict`` each stream restarts at that row
(epoch = rows // block, then the start of its shuffle window; nothing earlier is re-read) and the
worker that is due next is served first. The batches after a resume are therefore identical to
those of an uninterrupted run, provided the data, ``seed``, ``micro_batch``, ``dp_world``,
``num_workers`` and ``shuffle_buffer`` are the same (checked; ``dp_rank`` is not part of the state,
so one state serves every rank). ``load_state_dict(state, strict=False)`` accepts a different
layout and continues at the start of the next epoch instead (not exact). Exactness holds for
``infinite=True``; a finite stream stops at its epoch end.

**Evaluation** (:func:`build_eval_loader`): rows ``[0, min(N, max_rows))`` in file order, the
same contiguous blocks per stream, each row exactly once across ranks and workers (ranks may get
one row more than others; the last batch of each worker may be smaller). Every ``iter()`` starts
again from the first row.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from edlm_dist.data.locations import DataLocation, RetryPolicy
from edlm_dist.data.shards import ShardCursor, load_manifest, rerun_hint, split_shards
from edlm_dist.errors import CheckpointError, ConfigError, DataError

STATE_KIND = "edlm-shard-stream"
READ_CHUNK_ROWS = 256  # rows read at a time when not shuffling


def micro_batches_per_step(global_batch: int, micro_batch: int, dp_world: int) -> int:
    """Gradient-accumulation steps so that ``micro_batch * dp_world * steps == global_batch``."""
    if min(global_batch, micro_batch, dp_world) < 1:
        raise ConfigError(f"need train.global_batch, train.micro_batch and the data-parallel size >= 1, got "
                          f"{global_batch}, {micro_batch}, {dp_world}")
    per_step = micro_batch * dp_world
    if global_batch % per_step:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch} "
                          f"x data-parallel size {dp_world} = {per_step}; set train.global_batch to a multiple of "
                          f"{per_step} or change train.micro_batch")
    return global_batch // per_step


class SplitIndex:
    """Shard files and row counts of one split, from the manifest."""

    def __init__(self, data_dir: str | Path, split: str, manifest: Optional[dict] = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.data_dir = DataLocation(data_dir)  # a folder, URL or pipe: command (see data/locations.py)
        manifest = manifest if manifest is not None else load_manifest(self.data_dir, retry)
        records = split_shards(manifest, split, self.data_dir)
        self.split = split
        self.files = [r["file"] for r in records]
        self.rows = np.array([int(r["rows"]) for r in records], dtype=np.int64)
        self.total = int(self.rows.sum())
        self.seq_len = int(manifest["seq_len"])
        self.fingerprint = hashlib.sha256("".join(r["sha256"] for r in records).encode()).hexdigest()[:16]

    def shard_order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        if not shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.files))

    def segments(self, order: np.ndarray, start: int, stop: int) -> Iterator[tuple[str, int, int]]:
        """``(file, first_row, count)`` pieces covering positions ``[start, stop)`` of the epoch sequence."""
        ends = np.cumsum(self.rows[order])
        i = int(np.searchsorted(ends, start, side="right"))
        while start < stop:
            shard = int(order[i])
            first = start - int(ends[i] - self.rows[shard])
            count = min(int(self.rows[shard]) - first, stop - start)
            yield self.files[shard], first, count
            start += count
            i += 1


class ShardStream(IterableDataset):
    """Batches ``(micro_batch, seq_len)`` LongTensor of one split for one DP rank (module docstring).

    Iterated directly (one stream) or by a ``DataLoader`` with ``num_workers`` workers (one stream
    per worker); :class:`DataStream` does that and keeps the resume state.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", *, micro_batch: int, dp_rank: int = 0,
                 dp_world: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 512, infinite: bool = True, max_rows: Optional[int] = None,
                 manifest: Optional[dict] = None, retry: RetryPolicy = RetryPolicy()):
        if micro_batch < 1 or num_workers < 0 or not 0 <= dp_rank < dp_world:
            raise ConfigError(f"need micro_batch >= 1, num_workers >= 0 and 0 <= dp_rank < dp_world, got "
                              f"micro_batch={micro_batch}, num_workers={num_workers}, dp_rank={dp_rank}, "
                              f"dp_world={dp_world}")
        self.index = SplitIndex(data_dir, split, manifest, retry)
        self.retry = retry
        self.micro_batch, self.dp_rank, self.dp_world = int(micro_batch), int(dp_rank), int(dp_world)
        self.num_workers, self.workers = int(num_workers), max(int(num_workers), 1)
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), bool(shuffle), int(shuffle_buffer)
        self.infinite = bool(infinite)
        self.rows_used = self.index.total if max_rows is None else min(self.index.total, int(max_rows))
        self.batches_before = 0  # batches already handed out by the rank loader (resume)
        self.first_epoch = 0
        if self.infinite and self.index.total // (self.dp_world * self.workers) == 0:
            raise DataError(f"the {split} split of {self.index.data_dir} has {self.index.total} rows, fewer than "
                            f"its {self.dp_world * self.workers} readers (data-parallel ranks x workers); lower "
                            f"data.num_workers or {rerun_hint(self.index.data_dir)} with more rows")

    # ------------------------------------------------------------------ per-stream rows
    def block(self, worker: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of the epoch sequence owned by ``worker`` of this rank."""
        streams, stream = self.dp_world * self.workers, self.dp_rank * self.workers + worker
        return self.rows_used * stream // streams, self.rows_used * (stream + 1) // streams

    def _read(self, cursor: ShardCursor, order: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
        rows: list[np.ndarray] = []
        for file, first, count in self.index.segments(order, start, stop):
            rows.extend(cursor.read(file, first, count))
        for row in rows:
            if row.shape != (self.index.seq_len,):
                raise DataError(f"a row in {self.index.data_dir}/{self.index.split} has shape {tuple(row.shape)}, "
                                f"expected ({self.index.seq_len},); {rerun_hint(self.index.data_dir)}")
        return rows

    def stream_rows(self, worker: int, skip_rows: int = 0) -> Iterator[np.ndarray]:
        """The rows of ``worker``'s stream from row ``skip_rows`` on (see module docstring)."""
        a, b = self.block(worker)
        n = b - a
        if n == 0:
            return
        epoch, offset = divmod(skip_rows, n) if self.infinite else (0, skip_rows)
        epoch += self.first_epoch
        shuffling = self.shuffle and self.shuffle_buffer > 1
        window = self.shuffle_buffer if shuffling else READ_CHUNK_ROWS
        stream = self.dp_rank * self.workers + worker
        cursor = ShardCursor(self.index.data_dir, dict(zip(self.index.files, self.index.rows.tolist())), self.retry)
        try:
            while True:
                order = self.index.shard_order(self.seed, epoch, self.shuffle)
                for w in range(offset // window, -(-n // window)):
                    rows = self._read(cursor, order, a + w * window, min(a + (w + 1) * window, b))
                    if shuffling:
                        perm = np.random.default_rng([self.seed, epoch, stream, w]).permutation(len(rows))
                        rows = [rows[i] for i in perm]
                    yield from rows[max(offset - w * window, 0):]
                offset, epoch = 0, epoch + 1
                if not self.infinite:
                    return
        finally:
            cursor.close()

    def stream_batches(self, worker: int, skip_batches: int = 0) -> Iterator[torch.Tensor]:
        rows = self.stream_rows(worker, skip_batches * self.micro_batch)
        while batch := list(islice(rows, self.micro_batch)):
            yield torch.from_numpy(np.stack(batch).astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        done = self.batches_before
        # Serve the worker that is due next first: physical worker j plays logical worker (j + done) % W.
        worker = (physical + done) % self.workers
        skip = done // self.workers + (1 if worker < done % self.workers else 0)
        return self.stream_batches(worker, skip)


class DataStream:
    """A rank's loader: iterates :class:`ShardStream` (through a DataLoader when ``num_workers > 0``)
    and, when ``resumable``, keeps the batch count for ``state_dict`` / ``load_state_dict``."""

    def __init__(self, stream: ShardStream, *, resumable: bool):
        self.stream = stream
        self.resumable = resumable
        self.batches = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.stream.batches_before = self.batches if self.resumable else 0
        if self.stream.num_workers == 0:
            batches = iter(self.stream)
        else:
            # Its own generator: creating the workers' iterator draws a base seed, which from the global torch
            # RNG would shift dropout's stream after a resume restored it (the workers draw nothing else).
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.stream.num_workers,
                                generator=torch.Generator().manual_seed(self.stream.seed))
            batches = iter(loader)
        for batch in batches:
            if self.resumable:
                self.batches += 1  # before yielding: a state saved now includes this batch
            yield batch

    def num_rows(self) -> int:
        """Rows this rank reads per epoch (all its workers)."""
        return sum(b - a for a, b in map(self.stream.block, range(self.stream.workers)))

    def num_batches(self) -> int:
        """Batches per pass of a finite (eval) loader on this rank."""
        mb = self.stream.micro_batch
        return sum(-(-(b - a) // mb) for a, b in map(self.stream.block, range(self.stream.workers)))

    def _layout(self) -> dict:
        s = self.stream
        return {"split": s.index.split, "data": s.index.fingerprint, "seed": s.seed, "micro_batch": s.micro_batch,
                "dp_world": s.dp_world, "num_workers": s.workers, "shuffle": s.shuffle,
                "shuffle_buffer": s.shuffle_buffer, "rows": s.rows_used}

    def state_dict(self) -> dict:
        return {"kind": STATE_KIND, "version": 1, "batches": self.batches, "first_epoch": self.stream.first_epoch,
                **self._layout()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue after ``state["batches"]`` batches; call before ``iter()``."""
        if not self.resumable:
            raise ConfigError("an evaluation loader has no resume state; iterate it from the start")
        if state.get("kind") != STATE_KIND:
            raise CheckpointError("the checkpoint's data-loader state is not an edlm shard-stream state; "
                                  "resume from a checkpoint written by this edlm-dist version")
        layout = self._layout()
        changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if not changed:
            self.batches, self.stream.first_epoch = int(state["batches"]), int(state.get("first_epoch", 0))
            return
        if strict:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise CheckpointError(f"the data loader changed since the checkpoint ({what}); restore the old "
                                  "settings for an exact resume, or resume the data stream non-strictly "
                                  "(continues at the next epoch)")
        # Not exact: skip to the epoch after the one in progress (no row of it is seen twice).
        consumed = int(state["batches"]) * int(state["micro_batch"]) * int(state["dp_world"])
        epochs_done = consumed // max(int(state.get("rows") or layout["rows"]), 1)
        self.stream.first_epoch = int(state.get("first_epoch", 0)) + epochs_done + 1
        self.batches = 0


def build_train_loader(data_dir: str | Path, split: str = "train", *, micro_batch: int, dp_rank: int = 0,
                       dp_world: int = 1, seed: int = 0, shuffle_buffer: int = 512, num_workers: int = 0,
                       infinite: bool = True, manifest: Optional[dict] = None,
                       retry: RetryPolicy = RetryPolicy()) -> DataStream:
    """Shuffled, resumable, by default infinite stream of ``(micro_batch, seq_len)`` LongTensors."""
    stream = ShardStream(data_dir, split, micro_batch=micro_batch, dp_rank=dp_rank, dp_world=dp_world,
                         num_workers=num_workers, seed=seed, shuffle=True, shuffle_buffer=shuffle_buffer,
                         infinite=infinite, manifest=manifest, retry=retry)
    return DataStream(stream, resumable=True)


def build_eval_loader(data_dir: str | Path, split: str = "valid", *, micro_batch: int, dp_rank: int = 0,
                      dp_world: int = 1, num_workers: int = 0, max_rows: Optional[int] = None,
                      manifest: Optional[dict] = None, retry: RetryPolicy = RetryPolicy()) -> DataStream:
    """Every row of ``split`` (or its first ``max_rows``) exactly once across ranks and workers."""
    stream = ShardStream(data_dir, split, micro_batch=micro_batch, dp_rank=dp_rank, dp_world=dp_world,
                         num_workers=num_workers, shuffle=False, infinite=False, max_rows=max_rows, manifest=manifest,
                         retry=retry)
    return DataStream(stream, resumable=False)
