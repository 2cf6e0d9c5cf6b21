"""Block-wise MDLM / EDLM (sampling/blocks.py, docs/sampling.md "Block-wise").

* One block of the whole row (b = L) is today's sampler, bit for bit, for MDLM and EDLM with every energy.
* The block's target, by enumeration on a tiny synthetic language (81 rows): with an exact-marginal denoiser
  and the exact energy, one IS step per block selects from the SIR law of (q = the block's factorised
  marginals, w = p(prefix, block) / q); the committed row's law is the product over blocks of those laws,
  which tends to p itself as k grows. The engine's empirical law matches the enumerated finite-k law, and
  its TV to p falls with k.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from edlm_dist.config.schema import ModelConfig, SyntheticConfig
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.errors import SamplingError
from edlm_dist.models.build import build_model
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.blocks import block_spans, sample_blocks
from edlm_dist.sampling.model_energies import AREnergy, NCEEnergy, OracleEnergy
from edlm_dist.sampling.engine import ModelDenoiser, SamplerSettings, sample_batch

from test_math_importance import _exact_selection_by_laplace  # noqa: E402  (tests/sampling is on sys.path)

LANG = SyntheticLanguage(SyntheticConfig(num_tokens=3, num_topics=2, branching=2, order=1, smoothing=0.05, seed=3),
                         seq_len=6)
MASK, V, L = LANG.mask_id, LANG.vocab_size, LANG.seq_len
ROWS = torch.tensor([[LANG.bos_id, *body, LANG.eos_id] for body in itertools.product(range(3), repeat=L - 2)])
P_ROWS = LANG.log_prob(ROWS).exp()  # the 81 rows of the language and their exact probabilities (sum 1)


class ExactMarginalDenoiser:
    """mu(x_i | x_t) = the language's exact conditional marginal of position i given x_t's unmasked tokens
    (by enumeration over the 81 rows): the best factorised denoiser. SUBS: one-hot at unmasked positions."""

    def __call__(self, x_t, t):
        consistent = ((ROWS[None] == x_t[:, None]) | (x_t[:, None] == MASK)).all(-1)  # (R, 81)
        weights = consistent * P_ROWS[None]
        weights = weights / weights.sum(-1, keepdim=True)
        one_hot = torch.nn.functional.one_hot(ROWS, V).to(torch.float64)  # (81, L, V)
        marginals = torch.einsum("rn,nlv->rlv", weights, one_hot)
        return subs_log_probs(marginals.clamp_min(1e-300).log(), x_t, MASK)


def _codes(rows: torch.Tensor) -> torch.Tensor:
    """Index of each row among ROWS (rows outside the language's framing count as -1)."""
    match = (rows[:, None] == ROWS[None]).all(-1)
    return torch.where(match.any(-1), match.float().argmax(-1), torch.full((rows.shape[0],), -1))


@functools.lru_cache(maxsize=None)
def _exact_block_law(k: int, block: int) -> torch.Tensor:
    """P(row) of block-wise EDLM with one IS step per block, the exact energy and k proposals: the product over
    blocks of the SIR law (proposal q = product of the exact marginals given the prefix, weight p / q)."""
    law = torch.ones(len(ROWS), dtype=torch.float64)
    denoiser = ExactMarginalDenoiser()
    for lo, hi in block_spans(L, block):
        prefixes = torch.unique(ROWS[:, :lo], dim=0) if lo else ROWS[:1, :0]
        for prefix in prefixes:
            x_t = torch.full((1, L), MASK)
            x_t[0, :lo] = prefix
            marginals = denoiser(x_t, torch.ones(1))[0, lo:hi].exp()  # (b, V)
            outcomes = torch.tensor(list(itertools.product(range(V), repeat=hi - lo)))
            q = marginals[torch.arange(hi - lo), outcomes].prod(-1)
            keep = q > 0
            outcomes, q = outcomes[keep], q[keep]
            joint = LANG.prefix_log_prob(torch.cat([prefix.expand(len(outcomes), -1), outcomes], 1)).exp()
            energy = -(joint / q).log()  # oracle energy: -log p(prefix, block) + log q(block)
            selection = _exact_selection_by_laplace(q, energy - energy.min(), k, points=4001)
            members = (ROWS[:, :lo] == prefix).all(-1)
            for outcome, prob in zip(outcomes, selection):
                law[members & (ROWS[:, lo:hi] == outcome).all(-1)] *= prob
    return law


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_exact_block_law_tends_to_the_language_as_k_grows():
    tvs = {k: _tv(_exact_block_law(k, block=2), P_ROWS) for k in (1, 4, 16, 64)}
    assert abs(float(_exact_block_law(4, block=2).sum()) - 1.0) < 1e-6
    assert all(tvs[a] > tvs[b] for a, b in zip(sorted(tvs), sorted(tvs)[1:])), tvs
    assert tvs[1] > 0.1 and tvs[64] < 0.1 * tvs[1], tvs
    # b = 1 with the exact marginals is already exact at k = 1: each block is one position's true conditional
    assert _tv(_exact_block_law(1, block=1), P_ROWS) < 1e-9


def test_engine_matches_the_enumerated_block_law_and_its_tv_falls_with_k():
    rows = 2000
    empirical = {}
    for k in (1, 4, 16):
        settings = SamplerSettings(sampler="edlm", steps=1, k=k, window=1.0, seed=5, block_size=2)
        out = sample_blocks(ExactMarginalDenoiser(), settings, range(rows), length=L, mask_id=MASK,
                            energy_fn=OracleEnergy(LANG)).tokens
        codes = _codes(out)
        assert int((codes < 0).sum()) <= 2  # a position kept masked through t = 1 -> 1e-5 is ~never seen
        law = torch.bincount(codes[codes >= 0], minlength=len(ROWS)).double() / rows
        exact = _exact_block_law(k, block=2)
        sigma = (exact * (1 - exact) / rows).sqrt()
        assert bool(((law - exact).abs() <= 4.5 * sigma + 2e-3).all()), (k, (law - exact).abs().max())
        empirical[k] = _tv(law, P_ROWS)
    assert empirical[1] > empirical[4] + 0.05 > empirical[16] + 0.07, empirical


# ------------------------------------------------------------------ b = L is today's sampler
TINY = ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, dropout=0.0, use_apex=False)


def _random_model(kind: str, seed: int):
    torch.manual_seed(seed)
    model = build_model(kind, TINY, V, L)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 / math.sqrt(p.shape[-1]))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    energies = {"ar": AREnergy(_random_model("ar", 1), MASK, carry_over=False),
                "coar": AREnergy(_random_model("ar", 1), MASK, carry_over=True),
                "nce": NCEEnergy(_random_model("energy", 2)), "oracle": OracleEnergy(LANG)}
    return ModelDenoiser(_random_model("dit", 0), MASK, V), energies


@pytest.mark.parametrize("energy", [None, "ar", "coar", "nce", "oracle"])
def test_one_block_of_the_whole_row_gives_todays_samples_bit_for_bit(models, energy):
    denoiser, energies = models
    kind = "mdlm" if energy is None else "edlm"
    for window in (1.0, (0.3, 0.8)):
        settings = SamplerSettings(sampler=kind, steps=7, k=3, window=window, seed=11)
        energy_fn = energies.get(energy)
        today = sample_batch(denoiser, settings, range(6), length=L, mask_id=MASK, energy_fn=energy_fn, trace=True)
        blocks = sample_blocks(denoiser, SamplerSettings(**{**settings.__dict__, "block_size": L}), range(6),
                               length=L, mask_id=MASK, energy_fn=energy_fn, trace=True)
        assert torch.equal(today.tokens, blocks.tokens)
        assert today.step_hashes == blocks.step_hashes
        assert (today.nfe, today.energy_rows, today.ess_per_step) == (blocks.nfe, blocks.energy_rows,
                                                                      blocks.ess_per_step)


def test_blocks_keep_the_prefix_and_the_future_masked_and_skip_prompted_blocks(models):
    """Every denoiser call of block [lo, hi) sees the committed prefix and masks after hi; a prompt that fills
    whole blocks is never touched and those blocks cost no model call."""
    denoiser, energies = models
    seen = []

    def spy(x_t, t):
        seen.append(x_t.clone())
        return denoiser(x_t, t)

    prompt = torch.full((4, L), MASK)
    prompt[:, :3] = torch.tensor([LANG.bos_id, 0, 1])
    settings = SamplerSettings(sampler="edlm", steps=3, k=2, window=1.0, block_size=2, seed=3)
    out = sample_blocks(spy, settings, range(4), length=L, mask_id=MASK, x_init=prompt, energy_fn=energies["ar"])
    assert torch.equal(out.tokens[:, :3], prompt[:, :3]) and not bool((out.tokens == MASK).any())
    assert all(bool((x[:, :2] == prompt[:1, :2]).all()) for x in seen)  # block [0, 2) was never sampled
    for x in seen:  # the row's first mask lies in the current block [lo, lo + 2); everything after it is masked
        for row in x:
            hi = int((row == MASK).float().argmax()) // 2 * 2 + 2
            assert bool((row[hi:] == MASK).all()), row


def test_window_interval_selects_the_grid_times():
    """window [0.25, 0.65] on T = 10 (t = 1, .9, ..., .1): IS exactly at t = .6, .5, .4, .3."""
    settings = SamplerSettings(sampler="edlm", steps=10, k=2, window=[0.25, 0.65], skip_idle_is=False)
    assert settings.window == (0.25, 0.65) and settings.window_bounds == (0.25, 0.65)
    out = sample_batch(ExactMarginalDenoiser(), settings, range(3), length=L, mask_id=MASK,
                       energy_fn=OracleEnergy(LANG))
    ran = [value is not None for value in out.ess_per_step]
    assert ran == [False] * 4 + [True] * 4 + [False] * 2
    assert SamplerSettings(window=0.25).window_bounds == (0.75, 1.0)
    for bad in ([0.7, 0.3], [0.2, 1.5], [0.1], "0.5"):
        with pytest.raises(SamplingError, match="window"):
            SamplerSettings(window=bad)


def test_block_size_checks():
    with pytest.raises(SamplingError, match="block_size must be in"):
        block_spans(6, 7)
    assert block_spans(6, 4) == [(0, 4), (4, 6)]
    with pytest.raises(SamplingError, match="block_size must be >= 0"):
        SamplerSettings(block_size=-1)
