"""The block-diffusion NELBO (BD3-LM) against exact enumeration on V = 3 real tokens (+ mask), L = 4.

The model is a tiny random block-causal DiT. Its generative distribution is the block sampler that
reveals the tokens of block j one at a time in uniformly random order, conditioned on the clean
blocks < j (docs/likelihood_bounds.md §5):

    p(x) = Π_j p(x^j | x^{<j}),   p(x^j | x^{<j}) = f_j(block j all masked),
    f_j(S) = (1/|S|) Σ_{i∈S} μθ(x_i | block j masked on S, x^{<j}) · f_j(S \\ {i}),  f_j(∅) = 1,

computed exactly from the one-stream (sampling) forward for every x in 3^4. The NELBO is computed
exactly from the two-stream (training) forward for every mask pattern of every block, with
Gauss-Legendre in t (exact: the integrand is a polynomial). Checked: p sums to 1; the NELBO is
≥ −log p(x) for every x and b ∈ {1, 2, 4}; with ε = 0 and b = 1 it *equals* −log p(x) (one token
per block: no ordering to average); at b = L it equals the MDLM NELBO of evaluation.bounds; and the
training objective's Monte-Carlo loss (its own times, masks and forward) converges to the exact value.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from edlm_dist.config.schema import RunConfig
from edlm_dist.evaluation.bounds import mdlm_nelbo_row
from edlm_dist.training.objective_steps import MDLMObjective
from tests.models.model_helpers import randomised, tiny

REAL, MASK, L = 3, 3, 4
V = REAL + 1
EPS = 1e-3  # schedule ε (mask probability (1 − ε)t) and time ε_s (t ~ U[ε_s, 1)), spec §3
ALL_X = torch.tensor(list(itertools.product(range(REAL), repeat=L)))  # (81, 4)
Z_SIGMAS = 4.0
FP32 = 1e-5  # relative: fp32 logits of two forwards with different shapes, summed over ≤ 4 tokens


def _model(block_size: int):
    return randomised("dit", tiny(block_size=block_size), seed=block_size, vocab=V, length=L).eval()


def _subsets(positions):
    return [s for r in range(len(positions) + 1) for s in itertools.combinations(positions, r)]


@torch.no_grad()
def _log_mu(model, block: int, j: int, training: bool) -> dict[tuple, torch.Tensor]:
    """log μθ(x_i | block j masked on S, clean prefix) for every x and every subset S of block j: (81, L)."""
    own = list(range(j * block, (j + 1) * block))
    out = {}
    for subset in _subsets(own):
        x_t = ALL_X.clone()
        x_t[:, list(subset)] = MASK
        if training:
            logits = model(x_t, x0=ALL_X)
        else:
            x_t[:, (j + 1) * block:] = MASK  # the sampler has not written later blocks yet
            logits = model(x_t)
        log_mu = torch.log_softmax(logits.double()[..., :REAL], dim=-1)  # SUBS: the mask is never predicted
        out[subset] = log_mu.gather(-1, ALL_X[..., None]).squeeze(-1)
    return out


def exact_nll(model, block: int) -> torch.Tensor:
    """−log p(x) of the block sampler for all 81 rows (one-stream forward)."""
    total = torch.zeros(len(ALL_X), dtype=torch.float64)
    for j in range(L // block):
        log_mu = _log_mu(model, block, j, training=False)
        f = {(): torch.ones(len(ALL_X), dtype=torch.float64)}
        for subset in sorted(log_mu, key=len)[1:]:
            f[subset] = sum(log_mu[subset][:, i].exp() * f[tuple(p for p in subset if p != i)] for i in subset)
            f[subset] = f[subset] / len(subset)
        total -= f[tuple(range(j * block, (j + 1) * block))].log()
    return total


def exact_nelbo(model, block: int, *, eps: float = EPS, time_eps: float = EPS) -> torch.Tensor:
    """E over t ~ U[ε_s, 1) per block and masks of the training loss, nats per row, for all 81 rows."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts = 0.5 * (1 - time_eps) * nodes + 0.5 * (1 + time_eps)
    total = torch.zeros(len(ALL_X), dtype=torch.float64)
    for j in range(L // block):
        log_mu = _log_mu(model, block, j, training=True)
        for t, w in zip(ts, weights):
            q = (1 - eps) * t
            for subset, values in log_mu.items():
                prob = q ** len(subset) * (1 - q) ** (block - len(subset))
                term = -values[:, list(subset)].sum(-1) / t if subset else torch.zeros_like(total)
                total += 0.5 * (1 - time_eps) * w * prob * term / (1 - time_eps)
    return total


@pytest.mark.parametrize("block", [1, 2, 4])
def test_block_nelbo_upper_bounds_the_exact_nll(block):
    model = _model(block)
    nll = exact_nll(model, block)
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)  # a normalised distribution
    nelbo = exact_nelbo(model, block, eps=0.0, time_eps=0.0)
    # The NLL reads the one-stream forward, the NELBO the two-stream one: equal up to fp32 rounding.
    assert (nelbo >= nll * (1 - FP32)).all()
    as_trained = exact_nelbo(model, block)  # ε = ε_s = 1e-3: the truncated NELBO training reports (§1 of the doc)
    if block == 1:  # one token per block: no ordering to average, the bound is tight (the AR NLL) ...
        torch.testing.assert_close(nelbo, nll, rtol=FP32, atol=0)
        # ... and the truncation scales it by exactly (1 − ε): ∫_{ε_s}^1 (1/t)(1−ε)t dt / (1 − ε_s) = 1 − ε.
        torch.testing.assert_close(as_trained, (1 - EPS) * nll, rtol=FP32, atol=0)
    else:  # a real Jensen gap over the orderings inside a block, far above fp32 rounding
        assert (nelbo - nll).mean().item() > 100 * FP32 * nll.mean().item()
        # The reported (truncated) value drops O(ε) tails and need not bound: docs/likelihood_bounds.md §1.
        assert ((as_trained - nelbo).abs() < 0.01 * nelbo).all()


def test_block_nelbo_at_block_equal_length_is_the_mdlm_nelbo():
    """b = L: the block formula equals mdlm_nelbo_row (evaluation.bounds) over every mask pattern."""
    model = _model(L)
    block_value = exact_nelbo(model, L)
    with torch.no_grad():
        nodes, weights = np.polynomial.legendre.leggauss(8)
        mdlm = torch.zeros(len(ALL_X), dtype=torch.float64)
        for t, w in zip(0.5 * (1 - EPS) * nodes + 0.5 * (1 + EPS), weights):
            for mask in itertools.product([False, True], repeat=L):
                masked = torch.tensor(mask).expand(len(ALL_X), L)
                x_t = torch.where(masked, MASK, ALL_X)
                log_mu = torch.log_softmax(model(x_t).double()[..., :REAL], -1).gather(-1, ALL_X[..., None])[..., 0]
                q = (1 - EPS) * t
                prob = q ** sum(mask) * (1 - q) ** (L - sum(mask))
                rows = mdlm_nelbo_row(log_mu, masked, torch.full((len(ALL_X),), t, dtype=torch.float64), None, L) * L
                mdlm += 0.5 * w * prob * rows  # (1 − ε_s)/2 · w / (1 − ε_s)
    torch.testing.assert_close(block_value, mdlm, rtol=1e-9, atol=1e-9)


def _mc_loss(objective, model, method: str, draws: int, repeats: int = 4) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    batch = ALL_X.repeat(repeats, 1)
    with torch.no_grad():
        values = torch.tensor([getattr(objective, method)(model, batch, g)[0].item() for _ in range(draws)])
    return values.mean().item(), values.std().item() / math.sqrt(draws)


@pytest.mark.parametrize("block", [1, 2])
def test_training_objective_monte_carlo_converges_to_the_exact_nelbo(block):
    """MDLMObjective.loss (per-block antithetic times, masks, two-stream forward, 1/t) has mean NELBO / L."""
    model = _model(block)
    exact = exact_nelbo(model, block).mean().item() / L
    mean, se = _mc_loss(MDLMObjective(RunConfig(), V, MASK, 1), model, "loss", 100)
    assert abs(mean - exact) < Z_SIGMAS * se, (mean, exact, se)


def test_clipped_training_times_and_unclipped_validation():
    """train.sampling_eps/_max = [0.5, 1) (BD3-LM's clipped schedule) moves the training loss's mean to
    the clipped integral (9 SE away from the NELBO); validation_loss is the unclipped loss, draw for draw."""
    model = _model(L)
    clipped_cfg = RunConfig()
    clipped_cfg.train.sampling_eps, clipped_cfg.train.sampling_eps_max = 0.5, 1.0
    clipped_objective = MDLMObjective(clipped_cfg, V, MASK, 1)
    exact = exact_nelbo(model, L).mean().item() / L
    clipped = exact_nelbo_clipped(model, L, 0.5, 1.0).mean().item() / L
    mean, se = _mc_loss(clipped_objective, model, "loss", 40, repeats=8)
    assert abs(mean - clipped) < Z_SIGMAS * se < abs(clipped - exact), (mean, clipped, exact, se)
    plain_objective = MDLMObjective(RunConfig(), V, MASK, 1)
    for block in (2, L):
        model = _model(block)
        val = clipped_objective.validation_loss(model, ALL_X, torch.Generator().manual_seed(3))[0]
        assert torch.equal(val, plain_objective.loss(model, ALL_X, torch.Generator().manual_seed(3))[0])


def test_block_times_are_one_per_block_antithetic_and_clipped():
    cfg = RunConfig()
    objective = MDLMObjective(cfg, V, MASK, 1)
    x0 = ALL_X[:64].repeat(1, 2)  # L = 8, blocks of 2: 4 blocks per row, 256 strata
    t, x_t = objective.corrupt_blocks(x0, 2, torch.Generator().manual_seed(1), 0.3, 0.8)
    assert torch.equal(t[:, ::2], t[:, 1::2])  # constant inside a block
    per_block = t[:, ::2].reshape(-1)
    assert per_block.min() >= 0.3 and per_block.max() < 0.8
    strata = ((per_block - 0.3) / 0.5 * per_block.numel()).floor().long()
    assert torch.equal(strata, torch.arange(per_block.numel()))  # one draw per stratum, rows then blocks
    assert ((x_t == MASK) <= (x_t != x0) | (x0 == MASK)).all()


def exact_nelbo_clipped(model, block: int, low: float, high: float) -> torch.Tensor:
    """Mean of the 1/t-weighted loss for t ~ U[low, high) per block (the clipped training loss)."""
    rescale = (1 - low) / (high - low)
    return exact_nelbo(model, block, time_eps=low) * rescale - _tail(model, block, low, high) * rescale


def _tail(model, block: int, low: float, high: float) -> torch.Tensor:
    """The [high, 1) part of ∫_low^1 (normalised by 1 − low), to subtract from the [low, 1) value."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    total = torch.zeros(len(ALL_X), dtype=torch.float64)
    for j in range(L // block):
        log_mu = _log_mu(model, block, j, training=True)
        for t, w in zip(0.5 * (1 - high) * nodes + 0.5 * (1 + high), weights):
            q = (1 - EPS) * t
            for subset, values in log_mu.items():
                if subset:
                    prob = q ** len(subset) * (1 - q) ** (block - len(subset))
                    total += 0.5 * (1 - high) * w * prob * (-values[:, list(subset)].sum(-1) / t) / (1 - low)
    return total


def test_likelihood_evaluation_estimates_the_block_nelbo():
    """`edlm eval`'s per-row terms (its own per-(row, block) stratified noise) average to the exact NELBO."""
    from edlm_dist.evaluation.likelihood import LikelihoodModels, LikelihoodSettings, likelihood_batch_terms

    model = _model(2)
    models = LikelihoodModels(vocab_size=V, seq_len=L, mask_id=MASK, diffusion=model)
    assert models.methods() == ["mdlm"]  # Eq. 13's EDLM terms need one time per row
    rows = ALL_X.repeat(60, 1)
    with torch.no_grad():
        values, weight = likelihood_batch_terms(models, rows, torch.arange(len(rows)), LikelihoodSettings())["mdlm"]
    exact = exact_nelbo(model, 2).mean().item()  # every x equally often
    assert abs(values.mean().item() - exact) < Z_SIGMAS * values.std().item() / math.sqrt(len(values))
    assert weight == L
