"""Energies of block proposals against a committed prefix (block-wise EDLM, sampling/blocks.py).

A *prefix session* lives for one batch of rows. Before block [lo, hi) runs, :meth:`block` is called once
with the rows' current state; it returns a row-aware scorer ``(x0_block, x_t_block, log_mu_block, t,
rows=) -> energies`` used by every step of the block. Only the block's terms are computed: the prefix's
terms are one constant per row, which the importance weights ignore (docs/sampling.md, "Block-wise").

* :class:`ARPrefixSession` (AR and coAR energies, paper Eq. 9). The committed prefix sits in ONE KV cache
  of the AR model (models/kv_cache.py) for all rows of the batch, extended once per block by the newly
  committed tokens (b tokens per row, one model call) and read in place by all k proposals of every step
  of the block. Position lo's log-probability comes from the extension call's last position; a proposal
  then costs b - 1 AR tokens instead of hi (tested equal to the full recomputation to float32 tolerance
  at TP=1 and TP=2). ``cached=False`` recomputes prefix + block per proposal (the reference point).
  Block 0 (lo = 0) has no prefix and runs the same forward as the whole-row energy, so one block of the
  whole row gives today's energies bit for bit.
* :class:`OraclePrefixSession`: ``-log p_true(prefix, block) + log q`` with the language's exact prefix
  marginal.

Each session counts ``calls`` (its prefix computations, sequential model calls) and ``tokens`` (model
tokens it processed, padding included).
"""

from __future__ import annotations

import torch

from edlm_dist.sampling.energies import oracle_energy
from edlm_dist.sampling.engine import rows_per_forward


class ARPrefixSession:
    """The AR energy's view of one batch for block-wise sampling (module docstring)."""

    def __init__(self, energy, length: int, *, cached: bool = True):
        self.energy, self.length, self.cached = energy, int(length), bool(cached)
        self.cache = None  # the AR model's KVCache over every row of the batch, positions [0, filled)
        self.filled = 0
        self.next_log_probs = None  # (B, V): log p_AR(x^filled = . | x^{<filled}) of every row
        self.calls = 0
        self.tokens = 0

    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor):
        """The scorer of block [lo, hi) for the batch rows ``todo``; ``x`` (B, L) holds the committed prefix."""
        if lo == 0 or not self.cached:
            return _RecomputedBlockScorer(self, x[todo, :lo])
        if lo > self.filled:  # commit [filled, lo) to the cache: one call of (lo - filled) tokens per row
            model = self.energy.model
            if self.cache is None:
                self.cache = model.new_cache(self.length)
            chunk = x[:, self.filled:lo]
            log_probs = model.log_probs(chunk, self.energy.mask_id, cache=self.cache, append=True, last_only=True)
            self.next_log_probs = log_probs[:, -1]
            self.filled = lo
            self.calls += 1
            self.tokens += chunk.numel()
        return _CachedBlockScorer(self, todo.to(x.device), lo, hi)


class _RecomputedBlockScorer:
    """log p_AR of the block from one forward over [prefix, block] per proposal (no cache)."""

    needs_rows = True

    def __init__(self, session: ARPrefixSession, prefix: torch.Tensor):
        self.session, self.prefix, self.lo = session, prefix, prefix.shape[1]

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        energy = self.session.energy
        rows_in = torch.cat([self.prefix[rows.to(self.prefix.device)], x0], dim=1) if self.lo else x0
        self.session.tokens += rows_in.numel()
        log_p = energy.token_log_probs(rows_in)[:, self.lo:]
        return energy.block_energy(log_p, log_mu_tokens, x_t, start=self.lo)


class _CachedBlockScorer:
    """log p_AR of the block against the session's prefix cache: proposals of a row share its cached prefix."""

    needs_rows = True

    def __init__(self, session: ARPrefixSession, todo: torch.Tensor, lo: int, hi: int):
        self.session, self.todo, self.lo, self.hi = session, todo, lo, hi

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        session, energy = self.session, self.session.energy
        parent = self.todo[rows.to(self.todo.device)]  # the batch row of each proposal
        width = x0.shape[1]
        log_p = torch.empty(x0.shape, dtype=torch.float32, device=x0.device)
        log_p[:, 0] = session.next_log_probs[parent].gather(-1, x0[:, :1]).squeeze(-1)
        if width > 1:
            # The cache shares a prefix among G proposals per row: group the proposals by row, pad each
            # group to the largest one with copies of its first proposal (scored, then dropped).
            order = torch.argsort(parent, stable=True)
            owners, counts = torch.unique_consecutive(parent[order], return_counts=True)
            group = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            owner_index = torch.repeat_interleave(torch.arange(len(owners), device=x0.device), counts)
            slot = torch.arange(len(order), device=x0.device) - starts[owner_index]
            padded = x0[order[starts]].unsqueeze(1).repeat(1, group, 1)  # (R, G, b)
            padded[owner_index, slot] = x0[order]
            scored = torch.empty((len(owners), group, width - 1), dtype=torch.float32, device=x0.device)
            per_chunk = rows_per_forward(x0.device, group * (width - 1), len(owners))
            for start in range(0, len(owners), per_chunk):
                part = slice(start, min(len(owners), start + per_chunk))
                tokens = padded[part].reshape(-1, width)
                child = session.cache.share(group=group, capacity=self.hi, rows=owners[part])
                lp = energy.model.log_probs(tokens[:, :-1], energy.mask_id, cache=child, append=False)
                scored[part] = lp.gather(-1, tokens[:, 1:, None]).squeeze(-1).view(-1, group, width - 1)
                session.tokens += tokens[:, :-1].numel()
            log_p[order, 1:] = scored[owner_index, slot]
        return energy.block_energy(log_p, log_mu_tokens, x_t, start=self.lo)


class OraclePrefixSession:
    """The exact energy of block proposals: the language's marginal of prefix + block (no model calls)."""

    calls = 0
    tokens = 0

    def __init__(self, language):
        self.language = language

    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor):
        return _OracleBlockScorer(self.language, x[todo, :lo])


class _OracleBlockScorer:
    needs_rows = True

    def __init__(self, language, prefix: torch.Tensor):
        self.language, self.prefix = language, prefix

    @torch.no_grad()
    def __call__(self, x0, x_t, log_mu_tokens, t, *, rows):
        rows_in = torch.cat([self.prefix[rows.to(self.prefix.device)], x0], dim=1)
        log_p_true = self.language.prefix_log_prob(rows_in.cpu()).to(x0.device)
        return oracle_energy(log_p_true, log_mu_tokens.to(torch.float64)).to(torch.float64)
