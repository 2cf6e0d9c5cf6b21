"""AR / coAR energies of block proposals against a cached prefix (sampling/prefix_energies.py).

The independent truth is the same energy recomputed from one forward over [prefix, block] per proposal.
The cached scorer keeps ONE KV cache of the committed prefix for the batch, extended once per block, and
lets a row's proposals (a ragged number per row, as the engine sends after merging equal candidates) read
it in place. Energies must agree to float32 tolerance at TP=1 and TP=2 (two gloo ranks), the prefix must
be computed once per block (not per proposal or step), and block-wise sampling must give the same tokens
with and without the cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from edlm_dist.config.schema import ModelConfig
from edlm_dist.models.build import build_model
from edlm_dist.models.layers import full_state_dict, load_full_state_dict
from edlm_dist.parallel.spawn import run_on_ranks
from edlm_dist.sampling.blocks import block_spans, sample_blocks
from edlm_dist.sampling.energy_fns import AREnergy
from edlm_dist.sampling.engine import ModelDenoiser, SamplerSettings

V, L, MASK, BATCH, BLOCK = 9, 12, 8, 4, 3
CFG = ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, dropout=0.0)
TOL = torch.finfo(torch.float32).eps * 4 * CFG.hidden_size * CFG.n_blocks  # as tests/models/test_kv_cache.py


def _state(kind: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(kind, CFG, V, L)
    g = torch.Generator().manual_seed(seed + 1)
    return {k: torch.randn(v.shape, generator=g) * (0.6 / math.sqrt(v.shape[-1])) if v.dim() == 2
            else 1.0 + 0.1 * torch.randn(v.shape, generator=g) for k, v in full_state_dict(model).items()}


def _model(kind: str, state: dict):
    torch.manual_seed(0)
    model = build_model(kind, CFG, V, L)
    load_full_state_dict(model, state)
    return model.eval()


def _block_errors(state: dict) -> dict:
    """Per block: worst |cached - recomputed| energy relative to the energies' scale, for AR and coAR."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, MASK, (BATCH, L), generator=g)  # the committed rows, block after block
    out = {"errors": [], "calls": {}, "tokens": {}}
    for carry_over in (False, True):
        cached = AREnergy(_model("ar", state), MASK, carry_over=carry_over).prefix_session(BATCH, L)
        plain = AREnergy(_model("ar", state), MASK, carry_over=carry_over, prefix_cache=False).prefix_session(BATCH, L)
        for j, (lo, hi) in enumerate(block_spans(L, BLOCK)):
            if j == 2:
                continue  # a block no row needs (a prompt): the next extension commits two blocks at once
            todo = torch.tensor([3, 1, 2]) if j % 2 else torch.arange(BATCH)
            rows = torch.tensor([0, 2, 0, 1, 0, 2, 0])[: 2 * len(todo)] % len(todo)  # ragged proposals per row
            x0 = torch.randint(0, MASK, (len(rows), hi - lo), generator=g)
            x_t = torch.where(torch.rand(x0.shape, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
            log_mu = -torch.rand(x0.shape, generator=g)
            t = torch.ones(len(rows))
            with torch.no_grad():
                got = cached.block(x, lo, hi, todo)(x0, x_t, log_mu, t, rows=rows)
                want = plain.block(x, lo, hi, todo)(x0, x_t, log_mu, t, rows=rows)
            out["errors"].append(float((got - want).abs().max() / want.abs().max()))
        out["calls"][carry_over], out["tokens"][carry_over] = cached.calls, cached.tokens
    return out


def _tp2_rank(state: dict) -> dict:
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel

    init_parallel(load_config(None, ["parallel.tp=2"]))
    return _block_errors(state)


@pytest.fixture(scope="module")
def ar_state():
    return _state("ar", 5)


def test_cached_block_energies_equal_the_recomputed_ones_tp1(ar_state):
    out = _block_errors(ar_state)
    assert max(out["errors"]) < TOL, (out["errors"], TOL)
    # The prefix is computed once per block after a commit: blocks 1 and 3 (block 0 has no prefix, block 2
    # was skipped) -> 2 calls of BATCH x 3 and BATCH x 6 new tokens. Block 0 runs the whole-row forward on
    # its 7 proposals (7 x 3 tokens); in blocks 1 and 3 the 6 proposals of rows (3, 1, 2) come 3, 1, 2 per
    # row and are padded to 3 per row, b - 1 = 2 tokens each: 9 x 2 per block.
    assert out["calls"] == {False: 2, True: 2}
    assert out["tokens"] == {c: BATCH * 3 + BATCH * 6 + 7 * 3 + 2 * 9 * (BLOCK - 1) for c in (False, True)}


@pytest.mark.multirank
def test_cached_block_energies_equal_the_recomputed_ones_tp2(ar_state):
    for rank, out in enumerate(run_on_ranks(_tp2_rank, 2, ar_state, timeout=240)):
        assert max(out["errors"]) < TOL, (rank, out["errors"], TOL)


def test_block_wise_sampling_gives_the_same_tokens_with_and_without_the_cache(ar_state):
    denoiser = ModelDenoiser(_model("dit", _state("dit", 7)), MASK, V)
    settings = SamplerSettings(sampler="edlm", steps=4, k=4, window=1.0, block_size=BLOCK, seed=2)
    runs = {}
    for cached in (True, False):
        energy = AREnergy(_model("ar", ar_state), MASK, carry_over=False, prefix_cache=cached)
        runs[cached] = sample_blocks(denoiser, settings, range(5), length=L, mask_id=MASK, energy_fn=energy)
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[True].prefix_calls == L // BLOCK - 1 and runs[False].prefix_calls == 0
