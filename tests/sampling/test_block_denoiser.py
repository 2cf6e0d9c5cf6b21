"""BlockCausalDenoiser's prefix session ≡ the uncached block-causal forward of the whole row.

Reference: SUBS log-probs of the one-stream forward (models/dit.py) of [committed prefix, noisy block, masks],
read at the block's columns — what a whole-row view of the sampler computes. The session is driven like the
block-wise sampler drives it (sampling/blocks.py): one ``block()`` per sampler block, then several denoising
calls on changing row subsets; sampler blocks equal to the model's blocks and half their size.
"""

from __future__ import annotations

import pytest
import torch

from edlm_dist.errors import ConfigError, SamplingError
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.block_denoiser import BlockCausalDenoiser, check_block_sampling
from edlm_dist.sampling.blocks import sample_blocks
from edlm_dist.sampling.model_energies import AREnergy
from edlm_dist.sampling.engine import SamplerSettings
from tests.models.model_helpers import randomised, tiny

V, L, MODEL_BLOCK, B = 11, 12, 4, 3
MASK = V - 1
TOL = torch.finfo(torch.float32).eps * 4 * 32 * 2 * 10  # fp32 over the MLP width and 2 layers, log-prob scale


def _reference(model, x: torch.Tensor, lo: int, x_block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    row = torch.full((len(rows), L), MASK)
    row[:, :lo] = x[rows, :lo]
    row[:, lo:lo + x_block.shape[1]] = x_block
    logits = model(row, gather_logits=True)[:, lo:lo + x_block.shape[1], :V]
    return subs_log_probs(logits, x_block, MASK)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("sampler_block", [MODEL_BLOCK, MODEL_BLOCK // 2])
@torch.no_grad()
def test_session_views_equal_the_whole_row_forward(sampler_block, fuse):
    model = randomised("dit", tiny(block_size=MODEL_BLOCK), seed=3, vocab=V, length=L).eval()
    denoiser = BlockCausalDenoiser(model, MASK, V, fuse_commits=fuse)
    session = denoiser.prefix_session(B, L)
    g = torch.Generator().manual_seed(0)
    x = torch.full((B, L), MASK)
    worst = 0.0
    for lo in range(0, L, sampler_block):
        hi = lo + sampler_block
        todo = torch.tensor([0, 2]) if lo == sampler_block else torch.arange(B)  # a row may skip a block (prompt)
        view = session.block(x, lo, hi, todo)
        for rows in (torch.arange(len(todo)), torch.tensor([len(todo) - 1])):  # all todo rows, then a subset
            x_block = torch.where(torch.rand(len(rows), sampler_block, generator=g) < 0.5,
                                  torch.randint(0, MASK, (len(rows), sampler_block), generator=g), MASK)
            got = view(x_block, torch.full((len(rows),), 0.5), rows=rows)
            want = _reference(model, x, lo, x_block, todo[rows])
            finite = want > -1e5  # carried-over positions hold -1e6 in both
            assert torch.equal(finite, got > -1e5)
            worst = max(worst, (got - want)[finite].abs().max().item())
        x[:, lo:hi] = torch.randint(0, MASK, (B, sampler_block), generator=g)  # commit the block
    assert worst < TOL, worst
    # One commit per model block after the first; fused into the first denoising call when it has every row
    # (not for the second sampler block, whose todo rows skip row 1, unless it opens no model block).
    separate = 1 if fuse and sampler_block == MODEL_BLOCK else 0 if fuse else L // MODEL_BLOCK - 1
    assert session.calls == separate
    assert session.cache.length == L - MODEL_BLOCK


def test_straddling_blocks_and_whole_rows_are_refused():
    model = randomised("dit", tiny(block_size=MODEL_BLOCK), seed=3, vocab=V, length=L).eval()
    denoiser = BlockCausalDenoiser(model, MASK, V)
    with pytest.raises(SamplingError, match="straddles"):
        denoiser.prefix_session(B, L).block(torch.full((B, L), MASK), 2, 6, torch.arange(B))
    with pytest.raises(SamplingError, match="block by block"):
        denoiser(torch.full((B, L), MASK), torch.ones(B))
    with pytest.raises(SamplingError, match="block_size < L"):
        BlockCausalDenoiser(randomised("dit", tiny(), vocab=V, length=L), MASK, V)


class _WholeRowView:
    """The uncached reference: the block-causal model's one-stream forward of the whole row (no prefix_session,
    so the block-wise sampler hands it [prefix, block, masks])."""

    time_conditioning = False

    def __init__(self, model):
        self.model = model

    def __call__(self, x_t, t):
        return subs_log_probs(self.model(x_t, gather_logits=True)[..., :V], x_t, MASK)


@pytest.mark.parametrize("sampler", ["mdlm", "edlm"])
@torch.no_grad()
def test_block_wise_samples_with_the_prefix_cache_equal_the_uncached_ones(sampler):
    """Same tokens (float64 races on log-probs that differ by fp32 rounding only), with and without fused
    commits; fused, MDLM makes no commit call of its own (every block's first step covers every row)."""
    model = randomised("dit", tiny(block_size=MODEL_BLOCK), seed=4, vocab=V, length=L).eval()
    energy = AREnergy(randomised("ar", tiny(), seed=5, vocab=V, length=L).eval(), MASK, carry_over=True)
    settings = SamplerSettings(sampler=sampler, steps=3, k=3, window=1.0, block_size=MODEL_BLOCK, seed=7)
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy if sampler == "edlm" else None)
    uncached = sample_blocks(_WholeRowView(model), settings, range(5), **kwargs)
    for fuse in (False, True):
        cached = sample_blocks(BlockCausalDenoiser(model, MASK, V, fuse_commits=fuse), settings, range(5), **kwargs)
        assert torch.equal(cached.tokens, uncached.tokens)
        assert (cached.tokens != MASK).all() and cached.nfe == uncached.nfe
        if sampler == "mdlm":
            denoiser_commits = cached.prefix_calls - uncached.prefix_calls  # the energy has none for MDLM
            assert denoiser_commits == (0 if fuse else L // MODEL_BLOCK - 1)


@pytest.mark.parametrize("sampler", ["mdlm", "edlm"])
@torch.no_grad()
def test_prompted_block_wise_samples_with_the_prefix_cache_equal_the_uncached_ones(sampler):
    """A prompt of 6 tokens (one whole model block and half the next; rows of different prompts): the prompt
    stays, the first block is never sampled, and the cached samples are the uncached reference's tokens."""
    model = randomised("dit", tiny(block_size=MODEL_BLOCK), seed=6, vocab=V, length=L).eval()
    energy = AREnergy(randomised("ar", tiny(), seed=8, vocab=V, length=L).eval(), MASK, carry_over=True)
    settings = SamplerSettings(sampler=sampler, steps=2, k=3, window=1.0, block_size=MODEL_BLOCK // 2, seed=3)
    prompt = torch.randint(0, MASK, (4, 6), generator=torch.Generator().manual_seed(0))
    x_init = torch.full((4, L), MASK)
    x_init[:, :6] = prompt
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy if sampler == "edlm" else None, x_init=x_init)
    uncached = sample_blocks(_WholeRowView(model), settings, range(4), **kwargs)
    cached = sample_blocks(BlockCausalDenoiser(model, MASK, V), settings, range(4), **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens) and torch.equal(cached.tokens[:, :6], prompt)
    assert (cached.tokens != MASK).all()
    assert cached.nfe == uncached.nfe == (L - 6) // (MODEL_BLOCK // 2) * settings.steps  # prompt blocks skipped


def test_sampling_settings_must_fit_the_model_blocks():
    check_block_sampling(L, 0, L)  # MDLM: anything goes
    check_block_sampling(MODEL_BLOCK, MODEL_BLOCK // 2, L)
    for sample_block in (0, L, 3, 2 * MODEL_BLOCK):
        with pytest.raises(ConfigError, match="block by block"):
            check_block_sampling(MODEL_BLOCK, sample_block, L)
