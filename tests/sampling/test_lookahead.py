"""block_lookahead: the next block's first denoiser call, run beside the scoring call, changes no sample.

References: the same block-wise EDLM sampler without the lookahead (its tokens, its call counts), and the
session's own uncached first call (its logits). Tiny block-causal DiT (model block 4, L = 12) and AR energy;
sampler blocks of 4 (every lookahead closes a model block: its keys are adopted into the prefix cache) and of
2 (half the lookaheads stay inside the model block).
"""

from __future__ import annotations

import pytest
import torch

from edlm_dist.config.load import load_config
from edlm_dist.errors import ConfigError, SamplingError
from edlm_dist.sampling.block_denoiser import BlockCausalDenoiser
from edlm_dist.sampling.blocks import sample_blocks, sample_rows
from edlm_dist.sampling.engine import LocalProposals, SamplerSettings
from edlm_dist.sampling.model_energies import AREnergy
from tests.models.model_helpers import randomised, tiny
from tests.sampling.test_block_denoiser import TOL, _WholeRowView

V, L, MODEL_BLOCK = 11, 12, 4
MASK = V - 1


def _models(seed: int = 4):
    model = randomised("dit", tiny(block_size=MODEL_BLOCK), seed=seed, vocab=V, length=L).eval()
    energy = AREnergy(randomised("ar", tiny(), seed=seed + 1, vocab=V, length=L).eval(), MASK, carry_over=True)
    return model, energy


def _sequential(out) -> int:
    return out.nfe + out.energy_calls + out.prefix_calls


@pytest.mark.parametrize("sampler_block", [MODEL_BLOCK, MODEL_BLOCK // 2])
@pytest.mark.parametrize("steps", [1, 2])
@torch.no_grad()
def test_lookahead_gives_the_same_samples_in_fewer_sequential_calls(sampler_block, steps):
    model, energy = _models()
    settings = SamplerSettings(sampler="edlm", steps=steps, k=4, window=1.0, block_size=sampler_block, seed=11)
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy)
    plain = sample_blocks(BlockCausalDenoiser(model, MASK, V), settings, range(6), **kwargs)
    ahead = sample_blocks(BlockCausalDenoiser(model, MASK, V), SamplerSettings(**{**settings.__dict__,
                          "block_lookahead": True}), range(6), **kwargs)
    blocks = L // sampler_block
    assert torch.equal(ahead.tokens, plain.tokens) and (ahead.tokens != MASK).all()
    assert ahead.lookahead_calls == blocks - 1  # one per block that has a next block
    assert ahead.nfe == plain.nfe - ahead.lookahead_hits and ahead.energy_calls == plain.energy_calls
    if steps == 1:  # every first call served: one round per block after the first denoiser call
        assert ahead.lookahead_hits == blocks - 1
        assert _sequential(plain) == 2 * blocks and _sequential(ahead) == blocks + 1


@torch.no_grad()
def test_lookahead_with_prompts_equals_the_uncached_sampler():
    """Rows with different 6-token prompts (the first model block and half the next are given): same tokens as
    the uncached whole-row reference, prompts kept."""
    model, energy = _models(seed=6)
    settings = SamplerSettings(sampler="edlm", steps=1, k=3, window=1.0, block_size=2, seed=3, block_lookahead=True)
    x_init = torch.full((4, L), MASK)
    x_init[:, :6] = torch.randint(0, MASK, (4, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy, x_init=x_init)
    reference = sample_blocks(_WholeRowView(model), SamplerSettings(**{**settings.__dict__, "block_lookahead": False}),
                              range(4), **kwargs)
    ahead = sample_blocks(BlockCausalDenoiser(model, MASK, V), settings, range(4), **kwargs)
    assert torch.equal(ahead.tokens, reference.tokens) and torch.equal(ahead.tokens[:, :6], x_init[:, :6])
    assert ahead.lookahead_hits == (L - 6) // 2 - 1


@pytest.mark.parametrize("fuse", [True, False])
@torch.no_grad()
def test_a_row_that_already_holds_a_block_is_never_served_a_stale_commit(fuse):
    """Row 3 holds block [4, 6) (an infill template): that block is generated for rows 0-2 only, so the commit of
    model block [0, 4) that waits for every row cannot be adopted from their lookahead; same tokens regardless."""
    model, energy = _models(seed=12)
    settings = SamplerSettings(sampler="edlm", steps=1, k=4, window=1.0, block_size=2, seed=5)
    x_init = torch.full((4, L), MASK)
    x_init[3, 4:6] = torch.tensor([1, 2])
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy, x_init=x_init)
    plain = sample_blocks(BlockCausalDenoiser(model, MASK, V, fuse_commits=fuse), settings, range(4), **kwargs)
    ahead = sample_blocks(BlockCausalDenoiser(model, MASK, V, fuse_commits=fuse),
                          SamplerSettings(**{**settings.__dict__, "block_lookahead": True}), range(4), **kwargs)
    assert torch.equal(ahead.tokens, plain.tokens) and torch.equal(ahead.tokens[3, 4:6], torch.tensor([1, 2]))
    assert ahead.lookahead_hits < ahead.lookahead_calls and ahead.nfe == plain.nfe - ahead.lookahead_hits


@pytest.mark.parametrize("span, next_span", [((4, 6), (6, 8)), ((6, 8), (8, 10))])  # inside / closing a model block
@torch.no_grad()
def test_served_logits_equal_the_first_call_they_replace(span, next_span):
    model, _ = _models(seed=8)
    g = torch.Generator().manual_seed(1)
    x = torch.full((3, L), MASK)
    x[:, : span[0]] = torch.randint(0, MASK, (3, span[0]), generator=g)
    proposals = torch.randint(0, MASK, (5, span[1] - span[0]), generator=g)  # row 1 has two proposals
    rows = torch.tensor([0, 1, 1, 2, 2])
    outputs = []
    for use_lookahead in (False, True):
        session = BlockCausalDenoiser(model, MASK, V).prefix_session(3, L)
        session.block(x, *span, torch.arange(3))(x[:, span[0]:span[1]], torch.ones(3), rows=torch.arange(3))
        if use_lookahead:
            session.speculate(x, span, next_span, proposals, rows)
        committed = x.clone()
        committed[:, span[0]:span[1]] = proposals[[0, 2, 3]]  # the chosen proposal of each row
        view = session.block(committed, *next_span, torch.arange(3))
        outputs.append(view(committed[:, next_span[0]:next_span[1]], torch.ones(3), rows=torch.arange(3)))
        assert session.lookahead.hits == int(use_lookahead)
        assert session.cache.length == next_span[0] - next_span[0] % MODEL_BLOCK  # the closed block was committed
    finite = outputs[0] > -1e5
    assert torch.equal(finite, outputs[1] > -1e5)
    assert (outputs[0] - outputs[1])[finite].abs().max().item() < TOL


@torch.no_grad()
def test_a_block_that_matches_no_proposal_runs_its_call():
    model, _ = _models(seed=9)
    x = torch.full((2, L), MASK)
    session = BlockCausalDenoiser(model, MASK, V).prefix_session(2, L)
    session.block(x, 0, 4, torch.arange(2))(x[:, :4], torch.ones(2), rows=torch.arange(2))
    session.speculate(x, (0, 4), (4, 8), torch.zeros((2, 4), dtype=torch.long), torch.arange(2))
    x[:, :4] = 1  # not the proposal
    session.block(x, 4, 8, torch.arange(2))(x[:, 4:8], torch.ones(2), rows=torch.arange(2))
    assert (session.lookahead.hits, session.lookahead.misses) == (0, 1)
    assert session.cache.length == 4  # committed by the fused call instead


class _HalfTheProposals(LocalProposals):
    def owned(self, k: int) -> range:
        return range(k // 2)


def test_lookahead_refuses_what_it_cannot_do():
    model, energy = _models()
    settings = SamplerSettings(sampler="edlm", steps=1, k=4, window=1.0, block_size=4, block_lookahead=True)
    kwargs = dict(length=L, mask_id=MASK, energy_fn=energy)
    with pytest.raises(SamplingError, match="block-causal denoiser"):
        sample_blocks(_WholeRowView(model), settings, range(2), **kwargs)
    with pytest.raises(SamplingError, match="all k proposals on one rank"):
        sample_blocks(BlockCausalDenoiser(model, MASK, V), settings, range(2), proposals=_HalfTheProposals(), **kwargs)
    with pytest.raises(SamplingError, match="straddles"):  # sampler blocks of 3 in model blocks of 4
        sample_blocks(BlockCausalDenoiser(model, MASK, V), SamplerSettings(**{**settings.__dict__, "block_size": 3}),
                      range(2), **kwargs)
    with pytest.raises(SamplingError, match="no next block"):
        sample_rows(model, SamplerSettings(**{**settings.__dict__, "block_size": L}), range(2), **kwargs)
    with pytest.raises(SamplingError, match="needs sampler=edlm and block_size > 0"):
        SamplerSettings(sampler="mdlm", block_size=4, block_lookahead=True)
    with pytest.raises(ConfigError, match="block_lookahead=true needs"):
        load_config(None, ["sample.block_lookahead=true", "sample.sampler=mdlm"])
