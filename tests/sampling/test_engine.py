"""The sampling engine's wiring (spec §5, §6.5): one IS step converges to p_theta·exp(-E) as k grows,
one ddpm step matches q(x_s | x_t, mu_theta), lower energy wins, rows only choose among their own
proposals, caching only while nothing changed, window / ESS / redraw-vs-reuse bookkeeping.

The denoiser is a fixed factorised stub, so every expectation is a closed form or an enumeration.
"""

from __future__ import annotations

import dataclasses

import itertools

import pytest
import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.engine import SamplerSettings, sample_batch
from edlm_dist.sampling.mdlm import sampling_timesteps
from edlm_dist.sampling.streams import stream_seed

MASK = 3  # real tokens 0, 1, 2
MU = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)  # mu_theta per position (L = 2)
ENERGY = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.5, -0.7, 0.9, -2.0, 0.4], dtype=torch.float64)  # code 3*x0 + x1


class StubDenoiser:
    """Factorised mu_theta that ignores x_t except for SUBS carry-over; records every call."""

    def __init__(self, mu: torch.Tensor, time_conditioning: bool = False):
        logits = torch.cat([mu.log(), torch.zeros(mu.shape[0], 1, dtype=mu.dtype)], dim=-1)  # mask column
        self.logits, self.time_conditioning, self.calls = logits, time_conditioning, []

    def __call__(self, x_t, t):
        self.calls.append(x_t.clone())
        return subs_log_probs(self.logits.expand(x_t.shape[0], -1, -1), x_t, MASK)


def table_energy(x0, x_t, log_mu_tokens, t):
    return ENERGY[3 * x0[:, 0] + x0[:, 1]]


def _codes(tokens: torch.Tensor) -> torch.Tensor:
    """Empirical law over the 9 sequences (+ a 10th bucket for rows that kept a mask)."""
    code = torch.where((tokens == MASK).any(-1), torch.full_like(tokens[:, 0], 9), 3 * tokens[:, 0] + tokens[:, 1])
    return torch.bincount(code, minlength=10).to(torch.float64) / tokens.shape[0]


def _exact_sir(proposal: torch.Tensor, energy: torch.Tensor, k: int) -> torch.Tensor:
    """P(selected = y) for k i.i.d. candidates resampled ∝ exp(-E), by enumeration of all 9^k tuples."""
    tuples = torch.tensor(list(itertools.product(range(9), repeat=k)))
    weights = torch.exp(-energy)[tuples]
    share = proposal[tuples].prod(dim=1, keepdim=True) * weights / weights.sum(dim=1, keepdim=True)
    return torch.zeros(9, dtype=torch.float64).index_add_(0, tuples.flatten(), share.flatten())


def _tv(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def _one_is_step(k: int, rows: int, seed: int = 0):
    settings = SamplerSettings(sampler="edlm", steps=1, k=k, window=1.0, noise_removal=False, seed=seed)
    return sample_batch(StubDenoiser(MU), settings, range(rows), length=2, mask_id=MASK, energy_fn=table_energy)


def test_one_is_step_converges_to_the_energy_tilted_product():
    rows = 3000
    proposal = torch.outer(MU[0], MU[1]).flatten()
    target = proposal * torch.exp(-ENERGY)
    target = target / target.sum()
    empirical_tv = {}
    for k in (1, 2, 4, 16):
        law = _codes(_one_is_step(k, rows).tokens)
        # t = 1 -> s = 1e-5 reveals each position with probability 1 - 1e-5: a kept mask is ~never seen.
        assert law[9] <= 2.0 / rows
        if k <= 4:  # matches the exact finite-k SIR law, outcome by outcome within 4.5 sigma
            exact = _exact_sir(proposal, ENERGY, k)
            sigma = (exact * (1 - exact) / rows).sqrt()
            assert bool(((law[:9] - exact).abs() <= 4.5 * sigma + 1e-12).all()), (k, law, exact)
        empirical_tv[k] = _tv(law[:9], target)
    # Exact TVs to the target: 0.443 (k=1), 0.281 (2), 0.142 (4), ~0.04 (16); MC noise is ~0.02 at 3000 rows.
    assert empirical_tv[1] > empirical_tv[2] + 0.08 > empirical_tv[4] + 0.16 > empirical_tv[16] + 0.2
    assert empirical_tv[16] < 0.08


def test_lower_energy_wins_and_rows_only_choose_their_own_proposals():
    """Row b carries marker c = x_t[b, 0]; its energy is 0 iff x0[1] == (c + 1) % 3, else 4. Every row must
    pick its own good token with the exact SIR probability sum_n Bin(n; k, 1/3) n / (n + (k - n) e^-4)."""
    k, per_marker = 8, 600
    mu = torch.full((2, 3), 1.0 / 3.0, dtype=torch.float64)
    markers = torch.arange(3).repeat_interleave(per_marker)
    x_t = torch.stack([markers, torch.full_like(markers, MASK)], dim=1)

    def marker_energy(x0, x_t_rows, log_mu_tokens, t):
        good = x0[:, 1] == (x_t_rows[:, 0] + 1) % 3
        return torch.where(good, 0.0, 4.0).to(torch.float64)

    settings = SamplerSettings(sampler="edlm", steps=1, k=k, window=1.0, noise_removal=False)
    out = sample_batch(StubDenoiser(mu), settings, range(len(markers)), length=2, mask_id=MASK, x_init=x_t,
                       energy_fn=marker_energy).tokens
    assert torch.equal(out[:, 0], markers)  # carried over
    binomial = torch.distributions.Binomial(k, torch.tensor(1.0 / 3.0))
    n = torch.arange(k + 1, dtype=torch.float64)
    p_good = float((binomial.log_prob(n).exp().double() * n / (n + (k - n) * torch.exp(torch.tensor(-4.0)))).sum())
    assert p_good > 0.9  # the lower energy is preferred (the reference's +E sign would give < 1/3)
    sigma = (p_good * (1 - p_good) / per_marker) ** 0.5
    for marker in range(3):
        rows = out[markers == marker]
        rate = float((rows[:, 1] == (marker + 1) % 3).double().mean())
        assert abs(rate - p_good) < 4.5 * sigma, (marker, rate, p_good)


@pytest.mark.parametrize("update", ["ddpm", "ddpm_cache"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_one_ddpm_step_matches_the_analytic_posterior(update, precision):
    """x_t = [0, m, m] at grid step 1 of T = 4 (t = 0.75, s = 0.5): each masked position stays masked with
    probability s/t and becomes v with mu_v (1 - s/t) (Eq. 5; (1-eps) cancels in the ratio for ddpm)."""
    mu = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    rows, steps = 6000, 4
    grid = sampling_timesteps(steps)
    t = float(grid[1])
    s = t - (1 - 1e-5) / steps
    stay = s / t
    x_t = torch.tensor([[0, MASK, MASK]]).expand(rows, -1)
    settings = SamplerSettings(sampler="mdlm", update=update, steps=steps, noise_removal=False, precision=precision)
    out = sample_batch(StubDenoiser(mu), settings, range(rows), length=3, mask_id=MASK, x_init=x_t,
                       step_range=(1, 2)).tokens
    assert bool((out[:, 0] == 0).all())
    per_position = [torch.cat([mu[i] * (1 - stay), torch.tensor([stay], dtype=torch.float64)]) for i in (1, 2)]
    exact = torch.outer(per_position[0], per_position[1]).flatten()  # 16 joint outcomes, code 4*x1 + x2
    law = torch.bincount(4 * out[:, 1] + out[:, 2], minlength=16).double() / rows
    sigma = (exact * (1 - exact) / rows).sqrt()
    assert bool(((law - exact).abs() <= 4.5 * sigma + 1e-12).all()), (law, exact)
    assert _tv(law, exact) < 0.03


def _changes_before_each_step(trace: list[int], start_hash: int) -> int:
    states = [start_hash] + trace[:-1]  # the state each step starts from
    return sum(a != b for a, b in zip(states, states[1:]))


def test_cache_is_used_only_while_nothing_changed_and_never_with_time_conditioning():
    from edlm_dist.fingerprint import state_hash

    steps = 48
    start = torch.full((1, 2), MASK)
    stub = StubDenoiser(MU)
    settings = SamplerSettings(sampler="mdlm", update="ddpm_cache", steps=steps, seed=3, noise_removal=False)
    out = sample_batch(stub, settings, [0], length=2, mask_id=MASK, trace=True)
    expected_calls = 1 + _changes_before_each_step(out.step_hashes, state_hash(start))
    assert len(stub.calls) == out.nfe == expected_calls  # one call per distinct state the loop started from
    assert all(not torch.equal(a, b) for a, b in zip(stub.calls, stub.calls[1:]))  # never recomputed needlessly
    assert expected_calls < steps / 4  # with L = 2 almost every step reveals nothing
    for update, time_conditioning in (("ddpm", False), ("ddpm_cache", True)):
        stub = StubDenoiser(MU, time_conditioning=time_conditioning)
        settings = SamplerSettings(sampler="mdlm", update=update, steps=steps, seed=3, noise_removal=False)
        sample_batch(stub, settings, [0], length=2, mask_id=MASK)
        assert len(stub.calls) == steps  # no cache: every step calls the denoiser


def test_noise_removal_is_greedy_on_masked_positions_only():
    """No grid step, only the final greedy step: masked positions get argmax mu (never the mask), carried
    tokens stay, and rows without a mask are not sent to the denoiser."""
    x = torch.tensor([[MASK, MASK], [2, MASK], [1, 0]])
    stub = StubDenoiser(MU)
    out = sample_batch(stub, SamplerSettings(steps=4), range(3), length=2, mask_id=MASK, x_init=x,
                       step_range=(0, 0))
    assert out.tokens.tolist() == [[0, 2], [2, 2], [1, 0]]  # argmax of MU rows: 0 and 2
    assert [c.tolist() for c in stub.calls] == [[[MASK, MASK], [2, MASK]]] and out.nfe == 1


def test_caching_does_not_change_the_samples():
    """Per-row caching is exact: a denoiser that ignores t gives the same rows with or without it."""
    settings = SamplerSettings(sampler="mdlm", update="ddpm_cache", steps=16, seed=5)
    cached = sample_batch(StubDenoiser(MU), settings, range(64), length=2, mask_id=MASK).tokens
    uncached = sample_batch(StubDenoiser(MU, time_conditioning=True), settings, range(64), length=2,
                            mask_id=MASK).tokens
    assert torch.equal(cached, uncached)


def test_samples_do_not_depend_on_the_batch_split():
    settings = SamplerSettings(sampler="edlm", steps=6, k=3, window=0.6, seed=11)
    whole = sample_batch(StubDenoiser(MU), settings, range(10), length=2, mask_id=MASK, energy_fn=table_energy)
    parts = [sample_batch(StubDenoiser(MU), settings, ids, length=2, mask_id=MASK, energy_fn=table_energy).tokens
             for ids in (range(0, 3), range(3, 10))]
    assert torch.equal(whole.tokens, torch.cat(parts))
    other_seed = sample_batch(StubDenoiser(MU), SamplerSettings(sampler="edlm", steps=6, k=3, window=0.6, seed=12),
                              range(10), length=2, mask_id=MASK, energy_fn=table_energy)
    assert not torch.equal(whole.tokens, other_seed.tokens)
    assert stream_seed(1, 2, 3, 4, 5) != stream_seed(1, 2, 3, 4, 6)


def test_window_and_ess_bookkeeping():
    """window 0.5 on T = 4 (t = 1, .75, .5, .25): IS at the first three steps. Constant energies give
    uniform weights, so ESS = k exactly; the first step (t = 1) is IS even for window 0. ``skip_idle_is`` off:
    every window step runs IS; on, a row-step that reveals nothing is counted as skipped instead."""
    k, steps = 5, 4

    def flat(x0, x_t, log_mu_tokens, t):
        return torch.full((x0.shape[0],), 2.5, dtype=torch.float64)

    settings = SamplerSettings(sampler="edlm", steps=steps, k=k, window=0.5, skip_idle_is=False)
    out = sample_batch(StubDenoiser(MU), settings, range(3), length=2, mask_id=MASK, energy_fn=flat)
    skipping = sample_batch(StubDenoiser(MU), dataclasses.replace(settings, skip_idle_is=True), range(3), length=2,
                            mask_id=MASK, energy_fn=flat)
    assert torch.equal(skipping.tokens, out.tokens) and skipping.idle_skips > 0
    assert int(skipping.row_is_steps.sum()) + skipping.idle_skips == 3 * 3
    assert out.ess_per_step[3] is None and all(abs(v - k) < 1e-9 for v in out.ess_per_step[:3])
    assert out.energy_evaluations == 3 * 3 * k
    assert torch.allclose(out.row_mean_ess, torch.full((3,), float(k), dtype=torch.float64))
    zero = sample_batch(StubDenoiser(MU), SamplerSettings(sampler="edlm", steps=steps, k=k, window=0.0,
                                                          skip_idle_is=False), range(3),
                        length=2, mask_id=MASK, energy_fn=flat)
    assert [v is not None for v in zero.ess_per_step] == [True, False, False, False]
    # ESS of non-uniform weights: 1 / sum w^2 with w = softmax(-E) of the 9-entry table -> k = 1 gives 1.
    assert all(v == pytest.approx(1.0) for v in _one_is_step(1, 4).ess_per_step)


def test_reuse_runs_is_only_after_a_change_and_redraw_runs_it_every_step():
    from edlm_dist.fingerprint import state_hash

    k, steps = 2, 40
    start = torch.full((1, 2), MASK)
    redraw = sample_batch(StubDenoiser(MU), SamplerSettings(sampler="edlm", steps=steps, k=k, window=1.0, seed=2,
                                                            skip_idle_is=False),
                          [0], length=2, mask_id=MASK, energy_fn=table_energy)
    assert redraw.energy_evaluations == k * steps
    reuse = sample_batch(StubDenoiser(MU), SamplerSettings(sampler="edlm", steps=steps, k=k, window=1.0, seed=2,
                                                           redraw_every_step=False),
                         [0], length=2, mask_id=MASK, energy_fn=table_energy, trace=True)
    changes = _changes_before_each_step(reuse.step_hashes, state_hash(start))
    assert reuse.energy_evaluations == k * (1 + changes)  # a fresh pool only at step 0 and after a change
    assert reuse.energy_evaluations < redraw.energy_evaluations


def test_nan_energy_and_missing_energy_are_one_line_errors():
    def nan_energy(x0, x_t, log_mu_tokens, t):
        return torch.full((x0.shape[0],), float("nan"), dtype=torch.float64)

    settings = SamplerSettings(sampler="edlm", steps=2, k=2, window=1.0)
    with pytest.raises(SamplingError, match="NaN/Inf") as info:
        sample_batch(StubDenoiser(MU), settings, [0], length=2, mask_id=MASK, energy_fn=nan_energy)
    assert "\n" not in str(info.value)
    with pytest.raises(SamplingError, match="needs an energy function"):
        sample_batch(StubDenoiser(MU), settings, [0], length=2, mask_id=MASK)
    for bad in ({"k": 0}, {"window": 1.5}, {"steps": 0}, {"precision": "fp8"}, {"temperature": 0.0}):
        with pytest.raises(SamplingError):
            SamplerSettings(**bad)
