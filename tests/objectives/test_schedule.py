"""Log-linear schedule closed forms, antithetic time sampling and forward masking (spec §3)."""

from __future__ import annotations

import math

import pytest
import torch

from edlm_dist.errors import ConfigError
from edlm_dist.objectives.schedule import LogLinearSchedule, mask_tokens, sample_times


def test_closed_forms_match_definitions():
    eps = 1e-3
    schedule = LogLinearSchedule(eps)
    t = torch.tensor([1e-3, 0.1, 0.37, 0.5, 0.999, 1.0], dtype=torch.float64, requires_grad=True)
    sigma = schedule.total_noise(t)
    expected_sigma = torch.tensor([-math.log(1 - (1 - eps) * v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(sigma.detach(), expected_sigma, rtol=1e-12, atol=0)
    # rate is the derivative of the total noise
    (autograd_rate,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(schedule.rate(t).detach(), autograd_rate, rtol=1e-12, atol=0)
    t = t.detach()
    # the mask probability is 1 - e^{-sigma} = (1 - eps) t
    torch.testing.assert_close(schedule.move_chance(t), -torch.expm1(-schedule.total_noise(t)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(schedule.move_chance(t), (1 - eps) * t, rtol=0, atol=0)
    # NELBO weight sigma'/expm1(sigma) = 1/t
    ratio = schedule.rate(t) / torch.expm1(schedule.total_noise(t))
    torch.testing.assert_close(schedule.loss_weight(t), ratio, rtol=1e-9, atol=0)
    torch.testing.assert_close(schedule.loss_weight(t), 1.0 / t, rtol=0, atol=0)
    # never fully masked at t = 1 during training
    assert schedule.move_chance(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(1 - eps)


def test_bad_eps_raises():
    with pytest.raises(ConfigError, match="eps"):
        LogLinearSchedule(0.0)


@pytest.mark.parametrize("n", [1, 5, 16])
def test_antithetic_times_one_per_stratum(n):
    sampling_eps = 1e-3
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        t = sample_times(n, antithetic=True, sampling_eps=sampling_eps, generator=g, dtype=torch.float64)
        assert t.shape == (n,)
        assert bool((t >= sampling_eps).all()) and bool((t < 1).all())
        u = (t - sampling_eps) / (1 - sampling_eps)
        strata = torch.floor(u * n).long()
        # example i lies in stratum i (before the mod wraps, which never happens for u in [0,1))
        assert strata.tolist() == list(range(n))


def test_plain_times_are_uniform_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1 = sample_times(20000, antithetic=False, generator=g1, dtype=torch.float64)
    t2 = sample_times(20000, antithetic=False, generator=g2, dtype=torch.float64)
    assert torch.equal(t1, t2)
    assert bool((t1 >= 1e-3).all()) and bool((t1 < 1).all())
    # uniform on [1e-3, 1): mean 0.5005, sd of the mean ~ 0.002
    assert abs(t1.mean().item() - (1 + 1e-3) / 2) < 0.01
    # stratified draws: the mean of n=8 times is within 1/(2n) of 1/2 (plain draws have sd ~0.1)
    means = [sample_times(8, generator=torch.Generator().manual_seed(s), dtype=torch.float64).mean().item() for s in range(50)]
    assert max(abs(m - 0.5005) for m in means) <= 1 / 16 + 1e-3


def test_mask_rate_matches_move_chance():
    g = torch.Generator().manual_seed(0)
    mask_id = 7
    x0 = torch.randint(0, 7, (5, 20000), generator=g)
    move = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = mask_tokens(x0, move, mask_id, generator=g)
    masked = x_t == mask_id
    rates = masked.double().mean(dim=1)
    # binomial sd <= sqrt(0.25/20000) = 0.0035; 0.015 is > 4 sd
    torch.testing.assert_close(rates, move, rtol=0, atol=0.015)
    assert rates[0].item() == 0.0 and rates[-1].item() == 1.0
    # unmasked positions keep their token
    assert torch.equal(x_t[~masked], x0[~masked])
    # (B, 1) move chances work too, a wrong shape is rejected
    assert torch.equal(mask_tokens(x0, move[:, None], mask_id, generator=torch.Generator().manual_seed(1)),
                       mask_tokens(x0, move, mask_id, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ConfigError, match="one move chance per row"):
        mask_tokens(x0, move[:3], mask_id)
