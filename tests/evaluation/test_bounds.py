"""Likelihood-bound math against exact enumeration on tiny vocabularies (float64 throughout).

Models here are tables over V^L with V = 3 real tokens (+ a mask id 3) and L ≤ 3, small enough
to enumerate every sequence, every mask pattern and every ordering.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from edlm_dist.errors import SamplingError
from edlm_dist.evaluation.bounds import (
    edlm_row_nelbo,
    importance_ess,
    leave_one_out_logsumexp,
    log_partition_estimates,
    mdlm_nelbo_row,
)

F64 = torch.float64
V, MASK = 3, 3
SCHEDULE_EPS = 1e-3  # mask probability (1 − ε)·t, spec §3
TIME_EPS = 1e-3  # t ~ U[ε_s, 1), spec §3
Z_SIGMAS = 4.0  # statistical tolerance: 4 standard errors of a Monte-Carlo mean


# ---------------------------------------------------------------- Theorem 1 (log Z estimators)


def _factorised_model(seed: int, length: int = 3, energy_scale: float = 1.5):
    """Factorised pθ over V^L, an arbitrary energy table and the exact log Z by enumeration."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(length, V, generator=g, dtype=F64), dim=-1)
    states = torch.tensor(list(itertools.product(range(V), repeat=length)))
    log_p = torch.log(probs[torch.arange(length), states]).sum(-1)
    energy = energy_scale * torch.randn(V**length, generator=g, dtype=F64)
    log_z = torch.logsumexp(log_p - energy, dim=0).item()
    return log_p, energy, log_z


def _exact_expectations(log_p, energy, n):
    """E[lower], E[upper] for n iid samples, summing over all (V^L)^n sample tuples."""
    tuples = torch.tensor(list(itertools.product(range(log_p.numel()), repeat=n)))
    prob = log_p[tuples].sum(-1).exp()
    est = log_partition_estimates(-energy[tuples])
    return (prob * est.lower).sum().item(), (prob * est.upper).sum().item()


def _mc_estimates(log_p, energy, n, repeats, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(log_p.exp(), repeats * n, replacement=True, generator=g).view(repeats, n)
    return log_partition_estimates(-energy[idx])


def _mean_se(x):
    return x.mean().item(), x.std().item() / math.sqrt(x.numel())


def test_estimators_match_direct_formulas_and_leave_one_out_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 6, generator=g, dtype=F64) * 3
    x[0, 0] = torch.tensor([800.0, -800.0, 799.0, 0.0, 800.0, -5.0])  # extreme spread and a tied max
    est = log_partition_estimates(x.float())  # float32 input is promoted
    n = x.shape[-1]
    # Direct O(n²) leave-one-out: mask the diagonal of an (n, n) expansion.
    off_diag = x.unsqueeze(-2).expand(*x.shape, n).clone()
    off_diag = off_diag.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    loo_ref = torch.logsumexp(off_diag, dim=-1)
    torch.testing.assert_close(leave_one_out_logsumexp(x), loo_ref, rtol=1e-12, atol=1e-12)
    x32 = x.float().double()
    lower_ref = torch.logsumexp(x32, -1) - math.log(n)
    loo_mean_ref = (torch.logsumexp(off_diag.float().double(), -1) - math.log(n - 1)).mean(-1)
    assert est.lower.dtype == F64 and est.lower.shape == (5, 7)
    torch.testing.assert_close(est.lower, lower_ref)
    torch.testing.assert_close(est.loo, loo_mean_ref)
    torch.testing.assert_close(est.upper, (2 * n - 1) * lower_ref - 2 * (n - 1) * loo_mean_ref)
    torch.testing.assert_close(est.plugin, x32[..., 0])
    # Small-case hand check: x = [0, log 3] → Ẑ_2 = 2, Ẑ_1 (LOO) = mean(log 3, log 1).
    hand = log_partition_estimates(torch.tensor([0.0, math.log(3.0)]))
    assert hand.lower.item() == pytest.approx(math.log(2.0))
    assert hand.loo.item() == pytest.approx(0.5 * math.log(3.0))
    assert hand.upper.item() == pytest.approx(3 * math.log(2.0) - 2 * 0.5 * math.log(3.0))


def test_single_sample_collapses_to_plugin():
    x = torch.tensor([[0.3], [-2.0]], dtype=F64)
    est = log_partition_estimates(x)
    torch.testing.assert_close(est.upper, x[:, 0])
    torch.testing.assert_close(est.lower, x[:, 0])
    torch.testing.assert_close(est.plugin, x[:, 0])
    assert torch.isnan(est.loo).all()


def test_bad_energies_raise():
    with pytest.raises(SamplingError, match="NaN"):
        log_partition_estimates(torch.tensor([0.0, float("nan")]))
    with pytest.raises(SamplingError, match="at least one sample"):
        log_partition_estimates(torch.zeros(3, 0))
    # E = +inf (weight 0) is allowed and simply drops out.
    est = log_partition_estimates(torch.tensor([0.0, float("-inf")], dtype=F64))
    assert est.lower.item() == pytest.approx(math.log(0.5))


def test_theorem1_exact_expectations_small_n():
    """E[lower] ≤ log Z holds for every n (Jensen); checked exactly by enumerating all sample tuples."""
    log_p, energy, log_z = _factorised_model(seed=0)
    lower2, upper2 = _exact_expectations(log_p, energy, 2)
    lower3, upper3 = _exact_expectations(log_p, energy, 3)
    assert lower2 < lower3 < log_z < upper3 < upper2
    # Monte-Carlo means agree with the exact expectations within the standard error.
    for n, lo, up in ((2, lower2, upper2), (3, lower3, upper3)):
        est = _mc_estimates(log_p, energy, n, repeats=40_000, seed=n)
        (m_lo, se_lo), (m_up, se_up) = _mean_se(est.lower), _mean_se(est.upper)
        assert abs(m_lo - lo) < Z_SIGMAS * se_lo
        assert abs(m_up - up) < Z_SIGMAS * se_up


def test_upper_estimate_is_only_asymptotically_an_upper_bound():
    """Theorem 1 holds for n > N only: on this heavier-tailed table E[upper_2] < log Z (exact enumeration)."""
    log_p, energy, log_z = _factorised_model(seed=2, energy_scale=2.0)
    lower2, upper2 = _exact_expectations(log_p, energy, 2)
    lower3, upper3 = _exact_expectations(log_p, energy, 3)
    assert lower2 < upper2 < log_z  # the "upper" estimate undershoots at n = 2 ...
    assert lower3 < log_z < upper3  # ... and is above log Z from n = 3 on this table
    # upper = 2·J − lower with the jackknife J = n·lower − (n−1)·loo, whose bias is O(1/n²):
    # the upper and lower biases are mirror images to first order.
    est = _mc_estimates(log_p, energy, 64, repeats=4_000, seed=0)
    jackknife = 64 * est.lower - 63 * est.loo
    torch.testing.assert_close(est.upper, 2 * jackknife - est.lower)
    (m_j, se_j), (m_lo, _) = _mean_se(jackknife), _mean_se(est.lower)
    assert abs(m_j - log_z) < Z_SIGMAS * se_j < log_z - m_lo


def test_theorem1_sandwich_and_bias_shrinks_with_n():
    """mean(lower) ≤ log Z ≤ mean(upper) within 4 standard errors, and both biases shrink with n."""
    log_p, energy, log_z = _factorised_model(seed=0)
    bias_lower, bias_upper = [], []
    for n in (2, 4, 16, 64):
        est = _mc_estimates(log_p, energy, n, repeats=4_000, seed=100 + n)
        (m_lo, se_lo), (m_up, se_up) = _mean_se(est.lower), _mean_se(est.upper)
        assert m_lo <= log_z + Z_SIGMAS * se_lo
        assert m_up >= log_z - Z_SIGMAS * se_up
        bias_lower.append((log_z - m_lo, se_lo))
        bias_upper.append((m_up - log_z, se_up))
    for biases in (bias_lower, bias_upper):
        for (b_small_n, se_a), (b_large_n, se_b) in zip(biases, biases[1:]):
            assert abs(b_large_n) < abs(b_small_n) + Z_SIGMAS * math.hypot(se_a, se_b)
        # From n = 2 to n = 64 the O(1/n) bias falls by far more than the noise.
        assert abs(biases[-1][0]) + Z_SIGMAS * biases[-1][1] < 0.25 * abs(biases[0][0])


def test_importance_ess():
    torch.testing.assert_close(importance_ess(torch.zeros(2, 16, dtype=F64)), torch.full((2,), 16.0, dtype=F64))
    assert importance_ess(torch.tensor([0.0, -1000.0, -1000.0])).item() == pytest.approx(1.0)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # weights ∝ exp(−E): −E = log w
    assert importance_ess(torch.log(w)).item() == pytest.approx(1.0 / (w**2).sum().item())


# ------------------------------------------------------------- MDLM continuous-time NELBO


def _encode(x_t):
    """Index of a partially-masked sequence over {0, 1, 2, MASK} in a (V+1)^L table."""
    return sum(int(tok) * (V + 1) ** i for i, tok in enumerate(x_t))


def _denoiser_table(seed: int, length: int):
    """An arbitrary SUBS denoiser: log μθ(·|x_t) for every x_t in {0..V−1, MASK}^L, shape ((V+1)^L, L, V)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(2.0 * torch.randn((V + 1) ** length, length, V, generator=g, dtype=F64), dim=-1)
    for x_t in itertools.product(range(V + 1), repeat=length):
        for i, tok in enumerate(x_t):
            if tok != MASK:  # carry-over: unmasked positions copy x_t
                table[_encode(x_t), i] = float("-inf")
                table[_encode(x_t), i, tok] = 0.0
    return table


def _orderings_log_probs(table, x0):
    """log Π_k μθ(x0^{σ_k} | x0 with σ_{<k} revealed) for every ordering σ of the positions."""
    length = len(x0)
    out = []
    for order in itertools.permutations(range(length)):
        x_t, total = [MASK] * length, 0.0
        for pos in order:
            total += table[_encode(x_t), pos, x0[pos]].item()
            x_t[pos] = x0[pos]
        out.append(total)
    return torch.tensor(out, dtype=F64)


def _exact_nll(table, x0):
    """−log p(x0) of the sampler that reveals one token at a time in uniformly random order."""
    lp = _orderings_log_probs(table, x0)
    return -(torch.logsumexp(lp, 0) - math.log(lp.numel())).item()


def _masks(length):
    return torch.tensor(list(itertools.product([False, True], repeat=length)))


def _mask_probs(masks, move):
    """P(mask pattern) when each position is masked independently with probability `move`."""
    m = masks.to(F64)
    return (move**m * (1 - move) ** (1 - m)).prod(-1)


def _mask_expectation_mdlm(table, x0, t, schedule_eps):
    """E over the 2^L mask patterns at fixed t of the per-sequence MDLM term (mdlm_nelbo_row · L)."""
    masks = _masks(len(x0))
    x0_t = torch.tensor(x0)
    x_t = torch.where(masks, MASK, x0_t)
    codes = torch.tensor([_encode(row.tolist()) for row in x_t])
    log_mu = table[codes[:, None], torch.arange(len(x0)), x0_t.expand_as(masks)]
    prob = _mask_probs(masks, float((1 - schedule_eps) * t))
    rows = mdlm_nelbo_row(log_mu, masks, torch.full((len(masks),), float(t), dtype=F64), None, len(x0))
    return (prob * rows).sum().item() * len(x0)


def _quadrature(fn, lo, hi, nodes=12):
    """Gauss-Legendre on [lo, hi]; exact here because every integrand is a low-degree polynomial in t."""
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    ts = 0.5 * (hi - lo) * xs + 0.5 * (hi + lo)
    return 0.5 * (hi - lo) * sum(w * fn(t) for t, w in zip(ts, ws))


def _exact_nelbo(table, x0, time_eps=TIME_EPS, schedule_eps=SCHEDULE_EPS):
    """E_{t~U[ε_s,1), mask}[L · mdlm_nelbo_row], the released code's validation NLL for one row."""
    integral = _quadrature(lambda t: _mask_expectation_mdlm(table, x0, t, schedule_eps), time_eps, 1.0)
    return integral / (1.0 - time_eps)


def _mc_nelbo(table, x0, rows, seed):
    """Monte-Carlo: one (t, mask) draw per row, t ~ U[ε_s, 1), mask prob (1 − ε)t, weight 1/t."""
    g = torch.Generator().manual_seed(seed)
    length = len(x0)
    t = (1 - TIME_EPS) * torch.rand(rows, generator=g, dtype=F64) + TIME_EPS
    masked = torch.rand(rows, length, generator=g, dtype=F64) < ((1 - SCHEDULE_EPS) * t)[:, None]
    x0_t = torch.tensor(x0).expand(rows, length)
    x_t = torch.where(masked, MASK, x0_t)
    codes = (x_t * (V + 1) ** torch.arange(length)).sum(-1)
    log_mu = table[codes[:, None], torch.arange(length), x0_t]
    per_seq = mdlm_nelbo_row(log_mu, masked, t, 1.0 / t, length) * length
    return _mean_se(per_seq)


def test_generative_distribution_normalises():
    table = _denoiser_table(seed=3, length=3)
    total = sum(math.exp(-_exact_nll(table, x0)) for x0 in itertools.product(range(V), repeat=3))
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("length", [2, 3])
def test_zero_eps_nelbo_equals_any_order_ar_loss(length):
    """With ε = ε_s = 0 the 1/t-weighted integral is exactly E_σ[−log Π μθ] (any-order AR loss).

    That loss bounds −log E_σ[Π μθ] = the exact NLL by Jensen.
    """
    table = _denoiser_table(seed=length, length=length)
    for x0 in itertools.product(range(V), repeat=length):
        nelbo = _exact_nelbo(table, x0, time_eps=0.0, schedule_eps=0.0)
        any_order = -_orderings_log_probs(table, x0).mean().item()
        assert nelbo == pytest.approx(any_order, rel=1e-10)
        assert nelbo >= _exact_nll(table, x0)


@pytest.mark.parametrize("length", [2, 3])
def test_mdlm_monte_carlo_nelbo_bounds_exact_nll_and_converges(length):
    table = _denoiser_table(seed=10 + length, length=length)
    for k, x0 in enumerate(itertools.product(range(V), repeat=length)):
        nll = _exact_nll(table, x0)
        exact = _exact_nelbo(table, x0)
        mean, se = _mc_nelbo(table, x0, rows=20_000, seed=k)
        assert abs(mean - exact) < Z_SIGMAS * se  # MC converges to the quadrature value
        assert exact >= nll
        assert mean >= nll - Z_SIGMAS * se


# ------------------------------------------------------------- EDLM row NELBO (Eq. 13)


def test_edlm_row_nelbo_formula_and_mdlm_special_case():
    g = torch.Generator().manual_seed(5)
    log_mu = torch.log_softmax(torch.randn(4, 6, 3, generator=g, dtype=F64), -1)[..., 0]
    masked = torch.rand(4, 6, generator=g) < 0.5
    t = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=F64)
    log_p_row = torch.where(masked, log_mu, torch.zeros_like(log_mu)).sum(-1)  # carry-over row sum
    zeros = torch.zeros(4, dtype=F64)
    torch.testing.assert_close(
        edlm_row_nelbo(log_p_row, zeros, zeros, t, None, 6), mdlm_nelbo_row(log_mu, masked, t, None, 6)
    )
    energy, log_z, weight = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64), 1 / t
    expected = weight * (-log_p_row + energy + log_z) / 6
    torch.testing.assert_close(edlm_row_nelbo(log_p_row, energy, log_z, t, weight, 6), expected)
    with pytest.raises(SamplingError, match="shape"):
        edlm_row_nelbo(log_p_row, energy[:3], log_z, t, None, 6)
    with pytest.raises(SamplingError, match=r"\(0, 1\]"):
        edlm_row_nelbo(log_p_row, energy, log_z, torch.zeros(4, dtype=F64), None, 6)


def test_eq13_joint_likelihood_is_not_a_bound():
    """Spec §6.6 toy: L = 2, x^1 = x^2 uniform over V, the EBM is the exact posterior.

    Exact NLL = log V. Eq. 13 with the joint log p_{θ,φ}(x0|x_t) has expectation (log V)/2;
    the marginal-based masked-diffusion NELBO (mdlm_nelbo_row with exact marginals) gives log V.
    """
    x0 = (1, 1)
    masks = _masks(2)
    uniform = -math.log(V)
    # Residual EBM on a uniform factorised pθ: E = 0 on equal pairs, +inf otherwise. log Z by enumeration:
    pairs = list(itertools.product(range(V), repeat=2))
    energy = {p: (0.0 if p[0] == p[1] else math.inf) for p in pairs}

    def joint_terms(mask):
        consistent = [p for p in pairs if all(m or p[i] == x0[i] for i, m in enumerate(mask))]
        log_p_theta = lambda p: uniform * int(sum(mask))  # noqa: E731 - carry-over: only masked positions
        log_z = math.log(sum(math.exp(log_p_theta(p) - energy[p]) for p in consistent))
        return log_p_theta(x0), energy[x0], log_z

    terms = torch.tensor([joint_terms(m.tolist()) for m in masks], dtype=F64)
    # Exact marginals of the true posterior: 1/V if both masked, 1 if the partner is revealed.
    marg = torch.where(masks.all(-1, keepdim=True), torch.tensor(uniform, dtype=F64), torch.tensor(0.0, dtype=F64))
    marg = marg.expand(-1, 2)

    def expect(row_fn, t):
        prob = _mask_probs(masks, float(t))
        return (prob * row_fn(torch.full((len(masks),), float(t), dtype=F64))).sum().item() * 2

    joint = _quadrature(lambda t: expect(lambda tt: edlm_row_nelbo(*terms.T, tt, None, 2), t), 0.0, 1.0)
    marginal = _quadrature(lambda t: expect(lambda tt: mdlm_nelbo_row(marg, masks, tt, None, 2), t), 0.0, 1.0)
    assert marginal == pytest.approx(math.log(V), rel=1e-12)
    assert joint == pytest.approx(0.5 * math.log(V), rel=1e-12)


def test_carry_over_ar_energy_is_self_normalised_and_gives_ar_likelihood():
    """Spec §6.6: with the coAR energy log Z = 0 exactly and E_mask[row] = (1 − ε)·NLL_AR / L at every t."""
    length = 3
    g = torch.Generator().manual_seed(7)
    ar_logits = torch.randn(*([V + 1] * length), V, generator=g, dtype=F64)  # p_AR(x^i | x^{<i}) via padded prefix

    def log_p_ar(x, i):
        prefix = tuple(x[:i]) + (MASK,) * (length - i)  # MASK here just pads the unused prefix slots
        return torch.log_softmax(ar_logits[prefix], -1)[x[i]].item()

    table = _denoiser_table(seed=8, length=length)
    x0 = (2, 0, 1)
    nll_ar = -sum(log_p_ar(x0, i) for i in range(length))
    for t in (0.05, 0.4, 0.97):
        move = (1 - SCHEDULE_EPS) * t
        expected_row = 0.0
        for mask in _masks(length).tolist():
            x_t = [MASK if m else x0[i] for i, m in enumerate(mask)]
            log_mu = table[_encode(x_t)]

            def coar_energy(x):  # −Σ_masked log p_AR + Σ_masked log μθ (Eq. 9 with carry-over)
                return sum(-log_p_ar(x, i) + log_mu[i, x[i]].item() for i in range(length) if mask[i])

            consistent = [
                x for x in itertools.product(range(V), repeat=length)
                if all(m or x[i] == x0[i] for i, m in enumerate(mask))
            ]
            log_p_theta = lambda x: sum(log_mu[i, x[i]].item() for i in range(length) if mask[i])  # noqa: E731
            log_z = math.log(sum(math.exp(log_p_theta(x) - coar_energy(x)) for x in consistent))
            assert log_z == pytest.approx(0.0, abs=1e-12)
            as_row = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
            row = edlm_row_nelbo(
                as_row(log_p_theta(x0)), as_row(coar_energy(x0)), as_row(log_z), as_row(t), None, length
            )
            row = row.item()
            prob = math.prod(move if m else 1 - move for m in mask)
            expected_row += prob * row
        assert expected_row == pytest.approx((1 - SCHEDULE_EPS) * nll_ar / length, rel=1e-10)
