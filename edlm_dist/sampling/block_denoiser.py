"""The block-causal denoiser as a block-wise sampler sees it: encode the prefix once, denoise a block many times.

A block-causal DiT (``model.block_size`` b < L, docs/block_diffusion.md) computes block j's logits from the
noisy block and the *clean* blocks before it only, so the keys and values of the committed prefix can be
cached and every denoising call of the block costs O(b) tokens (plus attention to the cached prefix)
instead of O(L). :class:`BlockCausalDenoiser` is a :class:`ModelDenoiser` with the ``prefix_session``
hook of the block-wise sampler (sampling/blocks.py, issue 17):

    session = denoiser.prefix_session(batch, length)   # one per batch of rows; an empty KV cache
    view = session.block(x, lo, hi, todo)               # once per sampler block [lo, hi): commits the new
                                                        # whole model blocks of x[:, :lo] (one call)
    log_mu = view(x_block, t, rows=rows)                # many times: (R, hi - lo, V) for rows todo[rows]

A sampler block must lie inside one model block (b_sampler divides b, blocks aligned): then its chunk is its
whole model block, [the already committed part ; the noisy block ; masks up to the model block's end],
which attends to the cached whole blocks and to itself bidirectionally, exactly the block-causal forward of
the whole row [prefix, block, masks] that a whole-row view computes (tested to fp32
tolerance against the one-stream forward: tests/sampling/test_block_denoiser.py). ``session.calls``
counts the prefix-commit calls (sequential model calls besides the denoising ones).

Fused commits (``fuse_commits``, default on): ``block()`` only remembers the newly committed blocks; the
block's first denoising call, when it covers every row of the batch (the usual case: the first step of a
block needs μθ for all rows), runs [new committed blocks ; the current model block] as one chunk with a
block-causal in-chunk mask and keeps only the committed part in the cache (``append=n``). The committed
blocks' keys do not see the current block (the mask), so the cache holds exactly what a separate commit
call writes, and a block costs its denoising calls only: ~L/b fewer sequential calls per row. When the first
call covers a subset of rows, the commit runs on its own first.
"""

from __future__ import annotations

from typing import Optional

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.errors import ConfigError
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.engine import ModelDenoiser
from edlm_dist.sampling.lookahead import Lookahead


def check_block_alignment(model_block: int, lo: int, hi: int) -> None:
    """A sampler block [lo, hi) must not straddle two model blocks (module docstring)."""
    if hi <= lo or lo // model_block != (hi - 1) // model_block:
        raise SamplingError(f"sampler block [{lo}, {hi}) straddles blocks of the block-causal model "
                            f"(model.block_size={model_block}); use a sample block size that divides it")


class BlockCausalSession:
    """Prefix state of one batch: a KV cache of the committed whole model blocks of every row."""

    def __init__(self, model: torch.nn.Module, mask_id: int, vocab_size: int, batch: int, length: int,
                 fuse_commits: bool = True):
        self.model, self.mask_id, self.vocab_size = model, mask_id, vocab_size
        self.batch, self.length, self.fuse_commits = batch, length, fuse_commits
        self.cache = model.new_cache(length)
        self.pending: Optional[torch.Tensor] = None  # committed whole blocks not yet in the cache (all rows)
        self.calls = 0
        self.lookahead = Lookahead()  # block j+1's first call run beside block j's scoring (sampling/lookahead.py)

    def speculate(self, x: torch.Tensor, span: tuple[int, int], next_span: tuple[int, int], proposals: torch.Tensor,
                  rows: torch.Tensor) -> None:
        """Block ``next_span``'s first denoising call for each proposal of block ``span`` (sampling/lookahead.py)."""
        self.lookahead.speculate(self, x, span, next_span, proposals, rows, self.vocab_size)

    def flush(self) -> None:
        """Write the pending committed blocks into the cache with a call of their own."""
        if self.pending is not None:
            self.model(self.pending, cache=self.cache)
            self.calls += 1
            self.pending = None

    @torch.no_grad()
    def block(self, x: torch.Tensor, lo: int, hi: int, todo: torch.Tensor) -> "CachedBlockView":
        """Commit x's whole model blocks below ``lo`` that the cache lacks (now, or fused into the block's
        first denoising call); return the view of [lo, hi)."""
        if x.shape != (self.batch, self.length):
            raise SamplingError(f"the session holds {self.batch} rows of {self.length}, got x {tuple(x.shape)}")
        check_block_alignment(self.model.block_size, lo, hi)
        start = lo - lo % self.model.block_size  # the model block holding [lo, hi) starts here
        self.flush()
        if start < self.cache.length:
            raise SamplingError(f"blocks go left to right: the cache already holds {self.cache.length} positions, "
                                f"past this block's start {start}")
        if start > self.cache.length:
            self.pending = x[:, self.cache.length:start].clone()  # every row's newly committed blocks
            if not self.fuse_commits:
                self.flush()
        end = min(start + self.model.block_size, self.length)
        return CachedBlockView(self, x[:, start:lo].clone(), todo.to(x.device), lo - start, end - hi, lo)


class CachedBlockView:
    """log μθ of one sampler block, for a subset of the session's rows, against the cached prefix."""

    needs_rows = True
    time_conditioning = False  # a block-causal model never has it (models/dit.py)

    def __init__(self, session: BlockCausalSession, committed: torch.Tensor, todo: torch.Tensor, offset: int,
                 tail: int, lo: int):
        self.session, self.committed, self.todo = session, committed, todo
        self.offset, self.tail, self.lo = offset, tail, lo  # the sampler block's place inside its model block

    @torch.no_grad()
    def __call__(self, x_block: torch.Tensor, t: torch.Tensor, *, rows: torch.Tensor) -> torch.Tensor:
        s = self.session
        batch_rows = self.todo[rows.to(self.todo.device)]
        masks = torch.full((len(batch_rows), self.tail), s.mask_id, dtype=x_block.dtype, device=x_block.device)
        chunk = torch.cat([self.committed[batch_rows], x_block, masks], dim=1)
        if s.lookahead.pending is not None:  # computed in the previous block's scoring round?
            fed = chunk if s.pending is None else torch.cat([s.pending[batch_rows.to(s.pending.device)], chunk], dim=1)
            logits = s.lookahead.serve(s, self.lo, batch_rows, fed)
            if logits is not None:
                return subs_log_probs(logits, x_block, s.mask_id)
        offset = self.offset
        if s.pending is not None and torch.equal(batch_rows.cpu(), torch.arange(s.batch)):  # fused commit
            kept = s.pending.shape[1]
            logits = s.model(torch.cat([s.pending, chunk], dim=1), cache=s.cache, append=kept, gather_logits=True)
            s.pending, offset = None, offset + kept
        else:
            s.flush()
            child = s.cache.share(group=1, rows=batch_rows)
            logits = s.model(chunk, cache=child, append=False, gather_logits=True)
        logits = logits[:, offset:offset + x_block.shape[1], : s.vocab_size]
        return subs_log_probs(logits, x_block, s.mask_id)


class BlockCausalDenoiser:
    """A block-causal DiT for the block-wise sampler (module docstring); whole rows are refused."""

    time_conditioning = False

    def __init__(self, model: torch.nn.Module, mask_id: int, vocab_size: int,
                 schedule: Optional[LogLinearSchedule] = None, *, fuse_commits: bool = True):
        if not getattr(model, "is_block_causal", False):
            raise SamplingError("BlockCausalDenoiser needs a DiT with model.block_size < L")
        self.model, self.mask_id, self.vocab_size = model.eval(), int(mask_id), int(vocab_size)
        self.block_size, self.fuse_commits = model.block_size, fuse_commits

    def prefix_session(self, batch: int, length: int) -> BlockCausalSession:
        return BlockCausalSession(self.model, self.mask_id, self.vocab_size, batch, length, self.fuse_commits)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise SamplingError(f"a block-causal denoiser (model.block_size={self.block_size}) samples block by block; "
                            f"set sample.block_size to {self.block_size} (or a divisor of it)")


def model_block_size(meta: dict) -> int:
    """The block size a diffusion checkpoint was trained with (its seq_len for MDLM) from its meta.json."""
    length = int(meta.get("seq_len") or 0)
    return int(((meta.get("config") or {}).get("model") or {}).get("block_size") or length)


def check_block_sampling(model_block: int, sample_block: int, length: int) -> None:
    """Before any model is loaded: a block-causal model needs block-wise sampling whose blocks fit in its own."""
    if model_block >= length:
        return
    if sample_block == 0 or sample_block == length or model_block % sample_block:
        raise ConfigError(f"the diffusion model is block-causal (model.block_size={model_block}); set "
                          f"sample.block_size={model_block} (or a divisor of it) to sample it block by block")


def make_denoiser(model: torch.nn.Module, mask_id: int, vocab_size: int):
    """The sampler's view of a trained DiT: prefix-cached for a block-causal one, whole rows for MDLM."""
    if getattr(model, "is_block_causal", False):
        return BlockCausalDenoiser(model, mask_id, vocab_size)
    return ModelDenoiser(model, mask_id, vocab_size)
