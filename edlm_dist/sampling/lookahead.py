"""Lookahead: run block j+1's first denoiser call in the round that scores block j (``sample.block_lookahead``).

Block-wise EDLM with a block-causal denoiser and one IS step per block makes two *dependent* model calls per
block: the denoiser's call that gives log mu_theta of block j, then the energy's call that scores the k
proposals drawn from it. Block j+1's first denoiser call depends on which proposal is chosen, and on nothing
else: it sees [cached prefix, block j, block j+1's start state, masks], and block j will be one of the k
proposals being scored (the block's last step reveals the chosen proposal whole, almost surely; the rare
position it leaves masked is filled by noise removal). So in the scoring round the denoiser also runs block
j+1's first call for *each distinct proposal* (one batched call over a child of the prefix cache), beside
the energy's call: neither needs the other's output, so on an accelerator they are one round of latency.
After resampling, block j+1's first call reads the chosen proposal's logits; when block j closed a model
block, that block's keys and values are copied into the prefix cache (``KVCache.adopt``), exactly what the
fused commit call would have written.

Same samples, fewer sequential calls: the lookahead computes the call it replaces (same tokens, same cached
prefix; the logits agree to fp32 rounding, tested) and draws no random number, so the tokens are the
sampler's own. A row of n blocks with T = 1 takes n + 1 sequential rounds instead of 2n (L/2 + 1 at b = 2,
about half the AR sampler's L - 1), for about k times more denoiser tokens per block (one lookahead row per
distinct proposal). Only the call of a block's last IS step is speculated (earlier steps reveal part of the
proposal). If some row's committed block matches none of its proposals, or the first call covers only some
rows while a model block waits to be committed, the call runs as usual and is counted.

Scope: a block-causal denoiser (a prefix KV cache: sampling/block_denoiser.py), EDLM, and all k proposals
on one rank (spread over ranks, the chosen proposal may live on another rank: refused in sampling/blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from edlm_dist.sampling.chunking import rows_per_forward


@dataclass
class Speculation:
    """Block j+1's first-call logits for each distinct proposal of block j (row ``rows[u]``, tokens ``chunks[u]``)."""

    next_lo: int  # the block whose first call this is
    start: int  # the cache length it was computed against (block j's model block starts here)
    rows: torch.Tensor  # (U,) batch rows
    chunks: torch.Tensor  # (U, c) the chunk fed after the cached prefix: [model block so far, proposal, next, masks]
    logits: torch.Tensor  # (U, width, V) logits of block j+1's positions
    kept: int  # > 0: block j closed a model block of this many positions; its keys join the cache on a hit
    keys: list = field(default_factory=list)  # per layer (U, heads, kept, d) when kept
    values: list = field(default_factory=list)


class Lookahead:
    """A block-causal session's speculated first call, and the counts (module docstring)."""

    def __init__(self):
        self.pending: Optional[Speculation] = None
        self.calls = 0  # lookahead model calls: each runs in the round of an energy scoring call
        self.hits = 0  # first calls of a block served from the lookahead (no model call)
        self.misses = 0  # speculated first calls that had to run (some row's block matched no proposal)

    @torch.no_grad()
    def speculate(self, session, x: torch.Tensor, span: tuple[int, int], next_span: tuple[int, int],
                  proposals: torch.Tensor, rows: torch.Tensor, vocab_size: int) -> None:
        """Run block ``next_span``'s first call for each proposal (U, hi - lo) of block ``span`` of batch ``rows``;
        ``x`` (B, L) holds the committed prefix and the next block's start state (prompt tokens or masks)."""
        model, cache, length = session.model, session.cache, session.length
        (lo, hi), (next_lo, next_hi) = span, next_span
        start = lo - lo % model.block_size
        end = min(next_lo - next_lo % model.block_size + model.block_size, length)
        self.pending = None
        if session.pending is not None or cache.length != start:  # the cache must hold exactly [0, start)
            return
        if next_lo // model.block_size != (next_hi - 1) // model.block_size:  # straddles: block() will refuse it
            return
        rows = rows.to(x.device)
        masks = torch.full((len(rows), end - next_hi), session.mask_id, dtype=x.dtype, device=x.device)
        chunks = torch.cat([x[rows, start:lo], proposals, x[rows, hi:next_hi], masks], dim=1)
        kept = hi - start if hi % model.block_size == 0 else 0  # block j closes its model block
        offset, width = next_lo - start, next_hi - next_lo
        logits, keys, values = [], [], []
        per_call = rows_per_forward(x.device, chunks.shape[1], len(rows))
        for first in range(0, len(rows), per_call):
            part = slice(first, min(len(rows), first + per_call))
            child = cache.share(group=1, rows=rows[part])
            out = model(chunks[part], cache=child, append=False, gather_logits=True)
            logits.append(out[:, offset:offset + width, :vocab_size])
            if kept:
                part_keys, part_values = child.scored_chunk(torch.arange(part.stop - part.start, device=x.device), kept)
                keys.append(part_keys)
                values.append(part_values)
        if kept:
            keys = [torch.cat([k[layer] for k in keys]) for layer in range(len(keys[0]))]
            values = [torch.cat([v[layer] for v in values]) for layer in range(len(values[0]))]
        self.pending = Speculation(next_lo, start, rows, chunks, torch.cat(logits), kept, keys, values)
        self.calls += 1

    def serve(self, session, lo: int, batch_rows: torch.Tensor, chunk: torch.Tensor) -> Optional[torch.Tensor]:
        """The logits (R, width, V) of block ``lo``'s first call, which would feed ``chunk`` (R, c) for ``batch_rows``
        after the cached prefix, when every row's chunk was speculated; else None (the caller runs the call).
        Only the speculated block's first call is looked up (noise removal of block j is not); one-shot."""
        spec = self.pending
        if spec is None or spec.next_lo != lo:
            return None
        self.pending = None
        everyone = torch.equal(batch_rows.cpu(), torch.arange(session.batch))
        commit_waits = session.pending is not None
        match = torch.zeros((len(batch_rows), len(spec.rows)), dtype=torch.bool, device=chunk.device)
        # A waiting commit is adopted for every row at once: a first call that covers some rows only (a row
        # already holds this block: a prompt or infill template) cannot take it, so it runs as usual.
        if (chunk.shape[1] == spec.chunks.shape[1] and session.cache.length == spec.start
                and commit_waits == bool(spec.kept) and (everyone or not spec.kept)):
            match = (batch_rows.to(chunk.device)[:, None] == spec.rows[None, :]) & \
                    (chunk[:, None, :] == spec.chunks[None, :, :]).all(dim=-1)
        if not bool(match.any(dim=1).all()):
            self.misses += 1
            return None
        pick = match.to(torch.int8).argmax(dim=1)
        if spec.kept:  # block j closed a model block: its keys join the cache as the fused commit would write them
            cache = session.cache
            if not cache.keys:
                _, heads, _, head_dim = spec.keys[0].shape
                cache.allocate(session.batch, len(spec.keys), heads, head_dim, spec.keys[0])
            cache.adopt(batch_rows.to(chunk.device), [k[pick] for k in spec.keys], [v[pick] for v in spec.values])
            cache.advance(spec.kept)
            session.pending = None
        self.hits += 1
        return spec.logits[pick]
