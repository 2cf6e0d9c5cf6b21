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
from edlm_dist.parallel.sharded_state import full_state_dict, load_full_state_dict
from tests.spawn import run_on_ranks
from edlm_dist.sampling.blocks import block_spans, sample_blocks
from edlm_dist.sampling.model_energies import AREnergy
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
    """Per block: worst |cached - recomputed| energy relative to the energies' scale, for AR and coAR.

    Blocks of 3 over L = 12. Block 0: every row scores proposals and then commits one of them, so block 1's
    prefix is adopted from the scored proposals (no call). Block 1: rows 3, 1, 2 only. Block 2: nobody (a
    prompt), so block 3 needs one extension call of 6 tokens."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, MASK, (BATCH, L), generator=g)
    out = {"errors": [], "calls": {}, "adopted": {}, "tokens": {}}
    for carry_over in (False, True):
        sessions = {cached: AREnergy(_model("ar", state), MASK, carry_over=carry_over, prefix_cache=cached)
                    .prefix_session(BATCH, L) for cached in (True, False)}
        for j, (lo, hi) in enumerate(block_spans(L, BLOCK)):
            if j == 2:
                continue
            todo = torch.tensor([3, 1, 2]) if j % 2 else torch.arange(BATCH)
            rows = torch.tensor([0, 2, 0, 1, 0, 2, 0, 3])[: 2 * len(todo)] % len(todo)  # ragged proposals per row
            x0 = torch.randint(0, MASK, (len(rows), hi - lo), generator=g)
            x_t = torch.where(torch.rand(x0.shape, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
            log_mu = -torch.rand(x0.shape, generator=g)
            t = torch.ones(len(rows))
            with torch.no_grad():
                got = sessions[True].block(x, lo, hi, todo)(x0, x_t, log_mu, t, rows=rows)
                want = sessions[False].block(x, lo, hi, todo)(x0, x_t, log_mu, t, rows=rows)
            out["errors"].append(float((got - want).abs().max() / want.abs().max()))
            if j == 0:  # every row commits its last-listed proposal
                for b in range(BATCH):
                    x[b, lo:hi] = x0[(rows == b).nonzero().flatten()[-1]]
        session = sessions[True]
        out["calls"][carry_over], out["adopted"][carry_over] = session.calls, session.adopted
        out["tokens"][carry_over] = (session.tokens, sessions[False].tokens)
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
    # Block 1's prefix is adopted from block 0's scored proposals; block 3's needs one call (BATCH x 6 new
    # tokens). Cached scoring feeds each proposal whole, padded per row to the row with most proposals:
    # block 0: 8 proposals over rows with 4, 1, 2, 1 -> 4 x 4 x 3 tokens; block 1: rows 3, 1, 2 with 3, 1, 2 ->
    # 3 x 3 x 3; block 3 ends the row, so its last token is not fed: 3 x 3 x 2. Recomputing costs prefix +
    # block per proposal: 8 x 3 + 6 x 6 + 6 x 12.
    assert out["calls"] == {False: 1, True: 1} and out["adopted"] == {False: 1, True: 1}
    assert out["tokens"] == {c: (48 + 27 + 18 + BATCH * 6, 24 + 36 + 72) for c in (False, True)}


@pytest.mark.multirank
def test_cached_block_energies_equal_the_recomputed_ones_tp2(ar_state):
    for rank, out in enumerate(run_on_ranks(_tp2_rank, 2, ar_state, timeout=240)):
        assert max(out["errors"]) < TOL, (rank, out["errors"], TOL)


@pytest.mark.parametrize("block", [1, BLOCK])
def test_block_wise_sampling_gives_the_same_tokens_with_and_without_the_cache(ar_state, block):
    denoiser = ModelDenoiser(_model("dit", _state("dit", 7)), MASK, V)
    settings = SamplerSettings(sampler="edlm", steps=4, k=4, window=1.0, block_size=block, seed=2)
    runs = {}
    for cached in (True, False):
        energy = AREnergy(_model("ar", ar_state), MASK, carry_over=False, prefix_cache=cached)
        runs[cached] = sample_blocks(denoiser, settings, range(5), length=L, mask_id=MASK, energy_fn=energy)
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    # T = 4 with window 1: the last step reveals the chosen proposal whole, so every block after the first is
    # committed into the cache by adoption, without an extension call.
    assert runs[True].prefix_calls == 0 and runs[False].prefix_calls == 0


def test_ar_first_proposal_is_the_ar_conditional_and_leaves_the_target_alone(ar_state):
    """block_proposal=ar_first with b = 1: each block's proposal IS p_AR(x^i | prefix) (read from the prefix cache),
    so every importance weight is equal (ESS = k at every IS step) and the committed token follows p_AR: position 1's
    empirical law matches the AR model's next-token distribution after the fixed position 0."""
    denoiser = ModelDenoiser(_model("dit", _state("dit", 7)), MASK, V)
    energy = AREnergy(_model("ar", ar_state), MASK, carry_over=False)
    rows, k = 600, 3
    x_init = torch.full((rows, L), MASK)
    x_init[:, 0] = 0
    settings = SamplerSettings(sampler="edlm", steps=1, k=k, window=1.0, block_size=1, seed=4, skip_idle_is=False,
                               block_proposal="ar_first")
    out = sample_blocks(denoiser, settings, range(rows), length=L, mask_id=MASK, energy_fn=energy, x_init=x_init)
    assert all(abs(ess - k) < 1e-9 for ess in out.ess_per_step)  # every IS step: exactly equal weights
    with torch.no_grad():
        p_ar = energy.model.log_probs(x_init[:1, :1], MASK)[0, 0].exp().double()
    law = torch.bincount(out.tokens[:, 1], minlength=V).double() / rows
    sigma = (p_ar * (1 - p_ar) / rows).sqrt()
    assert bool(((law - p_ar).abs() <= 4.5 * sigma + 1e-3).all()), (law, p_ar)
    plain = sample_blocks(denoiser, SamplerSettings(**{**settings.__dict__, "block_proposal": "denoiser"}), range(8),
                          length=L, mask_id=MASK, energy_fn=energy, x_init=x_init[:8])
    assert any(ess < k - 1e-6 for ess in plain.ess_per_step[1:] if ess is not None)  # the denoiser's proposal differs
