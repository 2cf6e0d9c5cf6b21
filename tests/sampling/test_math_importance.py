"""EDLM importance sampling (Alg. 1): exact selection distributions by enumeration, weights, ESS,
batch grouping, posterior step (spec §6.5, §6.8 #1 #7 #10)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from edlm_dist.errors import SamplingError
from edlm_dist.sampling.energies import oracle_energy
from edlm_dist.sampling.importance import (
    draw_proposals,
    effective_sample_size,
    importance_sampling_step,
    log_importance_weights,
    posterior_step_from_x0,
    resample_index,
)

MASK = 3  # real tokens 0, 1, 2; L = 2 -> 9 sequences, code = 3 * x[0] + x[1]
MU2 = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.2, 0.2, 0.6, 0.0]], dtype=torch.float64)
PROPOSAL = torch.outer(MU2[0, :3], MU2[1, :3]).flatten()  # p_theta(x0 | all-masked x_t) over the 9 codes
ENERGY = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.5, -0.7, 0.9, -2.0, 0.4], dtype=torch.float64)


def _target(proposal, energy):
    unnormalised = proposal * torch.exp(-energy)
    return unnormalised / unnormalised.sum()


def _tv(p, q) -> float:
    return 0.5 * (p - q).abs().sum().item()


def _exact_selection_by_enumeration(proposal, energy, k):
    """P(selected = y) for SIR with k i.i.d. candidates, summed over all len(proposal)**k tuples."""
    n = proposal.numel()
    tuples = torch.tensor(list(itertools.product(range(n), repeat=k)))  # (n^k, k)
    tuple_prob = proposal[tuples].prod(dim=1)
    weights = torch.exp(-energy)[tuples]
    share = weights / weights.sum(dim=1, keepdim=True)
    selection = torch.zeros(n, dtype=torch.float64)
    selection.index_add_(0, tuples.flatten(), (tuple_prob[:, None] * share).flatten())
    return selection


def _exact_selection_by_laplace(proposal, energy, k, points: int = 40001):
    """Same distribution for any k: P(y) = k p(y) w(y) E[1/(w(y) + S_{k-1})] with
    1/a = int_0^inf e^{-ua} du, so E[1/(w + S)] = int e^{-uw} phi(u)^{k-1} du, phi(u) = E[e^{-uW}].
    Integrated on u = e^v with the trapezoid rule (smooth integrand, checked against enumeration)."""
    w = torch.exp(-energy)
    v = torch.linspace(-40.0, math.log(80.0 / w.min().item()), points, dtype=torch.float64)
    u = torch.exp(v)
    phi = (proposal[None, :] * torch.exp(-u[:, None] * w[None, :])).sum(dim=1)
    integrand = torch.exp(-u[:, None] * w[None, :]) * phi[:, None] ** (k - 1) * u[:, None]
    integral = torch.trapezoid(integrand, v, dim=0)
    return k * proposal * w * integral


def test_laplace_formula_agrees_with_enumeration():
    for k in (1, 2, 3, 4):
        enumerated = _exact_selection_by_enumeration(PROPOSAL, ENERGY, k)
        torch.testing.assert_close(enumerated.sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(_exact_selection_by_laplace(PROPOSAL, ENERGY, k), enumerated, rtol=1e-8, atol=1e-10)
    # k = 1 selects the only candidate: the proposal itself
    torch.testing.assert_close(_exact_selection_by_enumeration(PROPOSAL, ENERGY, 1), PROPOSAL)


def test_selection_converges_to_the_energy_tilted_target():
    target = _target(PROPOSAL, ENERGY)
    tvs = {k: _tv(_exact_selection_by_laplace(PROPOSAL, ENERGY, k), target) for k in (1, 2, 4, 16, 64, 256)}
    ks = sorted(tvs)
    assert all(tvs[a] > tvs[b] for a, b in zip(ks, ks[1:])), tvs
    assert tvs[1] > 0.3  # the proposal is far from the target ...
    assert tvs[16] < 0.06 and tvs[64] < 0.015 and tvs[256] < 0.004  # ... SIR bias shrinks like 1/k
    assert tvs[64] * 64 == pytest.approx(tvs[256] * 256, rel=0.1)


@pytest.mark.parametrize("k", [4, 16])
def test_importance_step_matches_exact_selection(k):
    # oracle energy: p_theta * exp(-E) ∝ p_true, an arbitrary distribution over the 9 sequences
    p_true = torch.tensor([0.02, 0.3, 0.05, 0.1, 0.01, 0.2, 0.07, 0.15, 0.1], dtype=torch.float64)
    log_proposal = torch.log(PROPOSAL)
    energy_table = -torch.log(p_true) + log_proposal

    def energy_fn(candidates, x_t_rep, *_):
        codes = candidates[:, 0] * 3 + candidates[:, 1]
        log_mu_tokens = torch.stack([torch.log(MU2[0, candidates[:, 0]]), torch.log(MU2[1, candidates[:, 1]])], dim=1)
        energies = oracle_energy(torch.log(p_true[codes]), log_mu_tokens)
        torch.testing.assert_close(energies, energy_table[codes])
        return energies

    n = 30000
    x_t = torch.full((n, 2), MASK)
    p_x0 = MU2.expand(n, -1, -1)
    x_s, x0_star, info = importance_sampling_step(
        p_x0, x_t, 1.0, 0.0, MASK, k, energy_fn, generator=torch.Generator().manual_seed(k)
    )
    assert torch.equal(x_s, x0_star)  # move_s = 0 reveals everything
    assert info["log_weights"].shape == (n, k) and info["ess"].shape == (n,)
    freq = torch.bincount(x0_star[:, 0] * 3 + x0_star[:, 1], minlength=9).double() / n
    exact = _exact_selection_by_laplace(PROPOSAL, energy_table, k)
    assert _tv(freq, exact) < 0.02  # expected ~0.006 for 30k draws over 9 outcomes
    # and the selection is much closer to p_true than the proposal is
    assert _tv(freq, p_true) < 0.5 * _tv(PROPOSAL, p_true)


def test_lower_energy_gets_more_weight():
    log_w = log_importance_weights(torch.tensor([[0.0, 1.0], [5.0, -5.0]]))
    w = log_w.exp()
    assert w[0, 0] > w[0, 1] and w[1, 1] > w[1, 0]  # paper sign exp(-E), not the reference's exp(+E)
    assert w[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=torch.float64))
    # temperature flattens the weights
    hot = log_importance_weights(torch.tensor([[0.0, 1.0]]), temperature=10.0).exp()
    assert hot[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.1)))
    # the resampler follows the weights
    counts = torch.bincount(resample_index(log_w[:1].expand(20000, -1), generator=torch.Generator().manual_seed(0)))
    assert counts[0].item() / 20000 == pytest.approx(w[0, 0].item(), abs=0.015)


def test_effective_sample_size():
    k = 8
    equal = log_importance_weights(torch.full((2, k), 3.7))
    torch.testing.assert_close(effective_sample_size(equal), torch.full((2,), float(k), dtype=torch.float64))
    dominated = log_importance_weights(torch.tensor([[0.0] + [1000.0] * (k - 1)]))
    assert effective_sample_size(dominated).item() == pytest.approx(1.0, abs=1e-12)
    two_equal = log_importance_weights(torch.tensor([[0.0, 0.0, 1000.0, 1000.0]]))
    assert effective_sample_size(two_equal).item() == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_energies_raise(bad):
    with pytest.raises(SamplingError, match="NaN/Inf"):
        log_importance_weights(torch.tensor([[0.0, bad]]))
    with pytest.raises(SamplingError, match="temperature"):
        log_importance_weights(torch.tensor([[0.0, 1.0]]), temperature=0.0)


def test_candidates_stay_with_their_batch_element():
    # Rows alternate x_t = [0, m] and [1, m]: candidate j of row b always starts with x_t[b, 0].
    # Energies strongly prefer candidates starting with 1, so any cross-row mix-up (the reference's
    # k-major layout read with view(B, k)) would make "0" rows pick "1" candidates.
    k, pairs = 3, 10000
    x_t = torch.tensor([[0, MASK], [1, MASK]]).repeat(pairs, 1)
    p_x0 = MU2.expand(x_t.shape[0], -1, -1).clone()
    p_x0[:, 0] = torch.nn.functional.one_hot(x_t[:, 0], 4).double()
    energy = torch.tensor([[0.5, -0.5, 1.0], [-50.0, -49.0, -51.0]], dtype=torch.float64)  # E(a, b)

    def energy_fn(candidates, x_t_rep, *_):
        assert torch.equal(candidates[:, 0], x_t_rep[:, 0])  # x_t repeated batch-major, aligned
        return energy[candidates[:, 0], candidates[:, 1]]

    x_s, x0_star, info = importance_sampling_step(
        p_x0, x_t, 1.0, 0.0, MASK, k, energy_fn, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(x0_star[:, 0], x_t[:, 0]) and torch.equal(x_s[:, 0], x_t[:, 0])
    for a in (0, 1):
        rows = x_t[:, 0] == a
        freq = torch.bincount(x0_star[rows, 1], minlength=3).double() / pairs
        exact = _exact_selection_by_enumeration(MU2[1, :3], energy[a], k)
        assert _tv(freq, exact) < 0.025  # expected ~0.008 for 10k draws over 3 outcomes


def test_draw_proposals_layout_and_carry_over():
    x_t = torch.tensor([[2, MASK], [MASK, 0]])
    p_x0 = torch.tensor([[[0, 0, 1, 0], [0.2, 0.2, 0.2, 0.4]], [[0.5, 0.5, 0, 0], [1, 0, 0, 0]]], dtype=torch.float64)
    cand = draw_proposals(p_x0, x_t, 500, MASK, generator=torch.Generator().manual_seed(3))
    assert cand.shape == (2, 500, 2)
    assert bool((cand[0, :, 0] == 2).all()) and bool((cand[1, :, 1] == 0).all())
    assert not bool((cand == MASK).any())  # the mask column is zeroed before drawing
    assert set(cand[1, :, 0].tolist()) == {0, 1}


def test_posterior_step_reveals_with_the_right_probability():
    n = 40000
    x_t = torch.tensor([[MASK, MASK, 2]]).expand(n, -1)
    x0_star = torch.tensor([[0, 1, 2]]).expand(n, -1)
    x_s = posterior_step_from_x0(x0_star, x_t, 0.8, 0.2, MASK, generator=torch.Generator().manual_seed(4))
    assert bool((x_s[:, 2] == 2).all())
    for i, token in ((0, 0), (1, 1)):
        assert set(x_s[:, i].tolist()) == {token, MASK}  # revealed tokens are x0*'s
        assert (x_s[:, i] == token).double().mean().item() == pytest.approx((0.8 - 0.2) / 0.8, abs=0.01)
    # per-row move chances
    rows = posterior_step_from_x0(
        x0_star[:2], x_t[:2], torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.5]), MASK,
        generator=torch.Generator().manual_seed(5),
    )
    assert rows[0].tolist() == [0, 1, 2] and rows[1].tolist() == [MASK, MASK, 2]
