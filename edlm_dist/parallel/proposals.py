"""Distributed proposal sampler: the k importance-sampling proposals of EDLM spread over ranks.

Layout (docs/sampling.md). The world is tp x dp (Megatron). The dp replicas are cut into
contiguous blocks of P = ``proposal_parallel`` replicas:

* a *proposal group* (P replicas, same tp rank) samples the SAME sequences: every rank holds the
  same x_t, runs the same denoiser call, draws only its share of the k proposals, computes their
  energies locally (the energy model may be TP-sharded over the replica's tp group), and one
  all-gather of (x_t fingerprint, energies, candidate tokens) per IS step gives every rank all k.
  All ranks then draw the same index (the resampling generator depends only on seed/step/sample
  id), so x_t stays identical without broadcasting it; the fingerprints are compared at every IS
  step and once more at the end of each batch (``check_sync``), so drift fails loudly.
* the dp/P proposal groups are *data parallel*: they sample disjoint sets of sequences and never
  talk during sampling.

Contiguous blocks keep the per-step all-gather inside a node when P <= replicas per node.
Proposal j goes to proposal rank r for j in [start_r, start_r + count_r): contiguous blocks whose
sizes differ by at most one, so k need not be divisible by P (ranks with no proposal still take
part in the all-gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from edlm_dist.errors import ConfigError, SamplingError
from edlm_dist.fingerprint import state_hash


def proposal_split(k: int, size: int) -> list[range]:
    """Proposal indices owned by each of ``size`` ranks: contiguous, sizes differ by at most one."""
    if k < 1 or size < 1:
        raise ConfigError(f"need k >= 1 proposals and >= 1 ranks, got k={k}, ranks={size}")
    base, extra = divmod(k, size)
    out, start = [], 0
    for rank in range(size):
        count = base + (1 if rank < extra else 0)
        out.append(range(start, start + count))
        start += count
    return out


def default_proposal_parallel(dp_size: int, k: int) -> int:
    """Largest divisor P of dp_size with P <= k: no rank idles, the rest is data parallelism."""
    return max(p for p in range(1, dp_size + 1) if dp_size % p == 0 and p <= max(1, k))


class DistributedProposals:
    """The :class:`edlm_dist.sampling.engine.Proposals` exchange over a process group.

    It implements the sampling loop's protocol structurally and imports nothing from ``sampling/``:
    parallelism stays here, the loop stays single-device math.
    """

    def __init__(self, group=None, *, check_sync: bool = True):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.check_sync = check_sync

    def owned(self, k: int) -> range:
        return proposal_split(k, self.size)[self.rank]

    def gather(self, energies: torch.Tensor, candidates: torch.Tensor, k: int,
               x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, k_local) energies + (R, k_local, L) candidates on every rank -> (R, k) and (R, k, L), j order.

        One all-gather of a float64 buffer per IS step: a fingerprint of this rank's x_t (checked here,
        so drift is caught without a collective of its own), then energies and candidate tokens
        (exact as float64 below 2^53), padded to the largest share so every layout fits one call.
        """
        split = proposal_split(k, self.size)
        widest = max(len(r) for r in split)
        rows, local, length = candidates.shape
        packed = torch.zeros((rows, widest, length + 1), dtype=torch.float64, device=candidates.device)
        packed[:, :local, 0] = energies
        packed[:, :local, 1:] = candidates.to(torch.float64)
        buffer = torch.cat([_fingerprint(x_t, candidates.device), packed.flatten()])
        parts = [torch.empty_like(buffer) for _ in range(self.size)]
        dist.all_gather(parts, buffer, group=self.group)
        self._raise_if_apart([part[:2] for part in parts], "at an importance-sampling step")
        full = torch.cat([part[2:].view(rows, widest, length + 1)[:, : len(owned)]
                          for part, owned in zip(parts, split)], dim=1)
        return full[..., 0].contiguous(), full[..., 1:].round().long()

    def row_owners(self, have: torch.Tensor) -> torch.Tensor:
        """(B,) long: the lowest proposal rank whose ``have`` (B,) bool is set for each row, -1 where none is.
        Collective: every rank gets the same answer."""
        flags = [torch.empty_like(have, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(flags, have.to(torch.int64), group=self.group)
        stacked = torch.stack(flags)  # (P, B)
        first = stacked.argmax(dim=0)
        return torch.where(stacked.any(dim=0), first, torch.full_like(first, -1))

    def broadcast_rows(self, owners: torch.Tensor, numel_per_row: int, pack, unpack) -> None:
        """Every rank s sends the rows it owns (``owners == s``) to the others: ``pack(rows)`` -> a flat float32
        tensor of ``len(rows) * numel_per_row`` values on s, ``unpack(rows, flat)`` on every other rank. One
        broadcast per owning rank (the block-wise AR prefix cache increment, sampling/prefix_energies.py)."""
        for source in range(self.size):
            rows = (owners == source).nonzero().flatten()
            if len(rows) == 0:
                continue
            if self.rank == source:
                flat = pack(rows).to(torch.float32).contiguous()
            else:
                flat = torch.empty(len(rows) * numel_per_row, dtype=torch.float32, device=owners.device)
            dist.broadcast(flat, src=dist.get_global_rank(self.group, source) if self.group is not None else source,
                           group=self.group)
            if self.rank != source:
                unpack(rows, flat)

    def check_in_sync(self, x: torch.Tensor, where: str) -> None:
        """Fail loudly (on every rank) if x_t drifted apart, instead of silently mixing sequences."""
        if not self.check_sync or self.size == 1:
            return
        digest = _fingerprint(x, x.device)
        parts = [torch.empty_like(digest) for _ in range(self.size)]
        dist.all_gather(parts, digest, group=self.group)
        self._raise_if_apart(parts, where)

    def _raise_if_apart(self, fingerprints: list[torch.Tensor], where: str) -> None:
        if self.check_sync and any(not torch.equal(f, fingerprints[0]) for f in fingerprints):
            raise SamplingError(f"x_t differs between the ranks of a proposal group {where}; the ranks must load "
                                "identical weights and use the same seed (non-deterministic kernels?)")


def _fingerprint(x: torch.Tensor, device) -> torch.Tensor:
    """state_hash(x) as two float64-exact 32-bit halves."""
    value = state_hash(x)
    return torch.tensor([value >> 32, value & 0xFFFFFFFF], dtype=torch.float64, device=device)


@dataclass
class SamplingLayout:
    """Where this rank sits: its proposal exchange and its share of the sequences."""

    proposals: Optional[DistributedProposals]  # None: this rank draws all k proposals (the loop's default)
    proposal_rank: int
    proposal_size: int
    data_rank: int  # which proposal group (data-parallel shard of the sequences)
    data_size: int
    writes: bool  # this rank reports its group's samples (proposal rank 0, tp rank 0)


def single_rank_layout() -> SamplingLayout:
    return SamplingLayout(None, 0, 1, 0, 1, True)


def sampling_layout(ctx, proposal_parallel: int, k: int, *, check_sync: bool = True) -> SamplingLayout:
    """Cut the dp replicas of ``ctx`` (a ParallelContext) into proposal groups of ``proposal_parallel``
    (0 = :func:`default_proposal_parallel`). Collective: every rank must call it, in the same order."""
    if ctx is None or ctx.world_size == 1:
        return single_rank_layout()
    size = proposal_parallel or default_proposal_parallel(ctx.dp_size, k)
    if size < 1 or ctx.dp_size % size:
        raise ConfigError(f"proposal_parallel={size} must divide the data-parallel size {ctx.dp_size} "
                          f"(world {ctx.world_size} / tp {ctx.tp_size}); pick a divisor or 0 (auto)")
    coords = [None] * ctx.world_size
    dist.all_gather_object(coords, (ctx.tp_rank, ctx.dp_rank))
    group: Optional[object] = None
    for tp_rank in range(ctx.tp_size):  # every rank creates every group, in one fixed order
        for block in range(ctx.dp_size // size):
            members = sorted(r for r, (t, d) in enumerate(coords) if t == tp_rank and d // size == block)
            handle = dist.new_group(members)
            if ctx.rank in members:
                group = handle
    proposals = DistributedProposals(group, check_sync=check_sync) if size > 1 else None
    proposal_rank = ctx.dp_rank % size
    return SamplingLayout(proposals, proposal_rank, size, ctx.dp_rank // size, ctx.dp_size // size,
                          writes=proposal_rank == 0 and ctx.tp_rank == 0)
