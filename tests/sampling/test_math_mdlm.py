"""MDLM ancestral update against the closed-form q(x_s | x_t, mu_theta), and the sampling loop (spec §5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.sampling.mdlm import (
    ddpm_update,
    mdlm_sample_loop,
    move_chances,
    noise_removal,
    reveal_probs,
    sampling_timesteps,
)

MASK = 3  # real tokens 0, 1, 2
MU = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)


def _p_x0(x_t: torch.Tensor, mu: torch.Tensor = MU) -> torch.Tensor:
    """SUBS-style predictor: mu at masked positions, one-hot at unmasked ones."""
    p = mu.expand(*x_t.shape, -1).clone()
    unmasked = x_t != MASK
    p[unmasked] = torch.nn.functional.one_hot(x_t[unmasked], MU.numel()).double()
    return p


def test_timesteps_grid():
    grid = sampling_timesteps(4, eps=1e-5)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75000250, 0.500005, 0.25000750, 1e-5], dtype=torch.float64))
    with pytest.raises(SamplingError, match="steps"):
        sampling_timesteps(0)


def test_move_chances_per_update():
    schedule = LogLinearSchedule(1e-3)
    move_t, move_s = move_chances(0.8, 0.6, "ddpm", schedule)
    assert move_t.item() == pytest.approx(0.999 * 0.8) and move_s.item() == pytest.approx(0.999 * 0.6)
    assert move_chances(0.8, 0.6, "ddpm_cache", schedule) == (0.8, 0.6)
    with pytest.raises(SamplingError, match="unknown sampler update"):
        move_chances(0.8, 0.6, "analytic", schedule)
    with pytest.raises(SamplingError, match="schedule"):
        move_chances(0.8, 0.6, "ddpm")


def test_reveal_probs_closed_form():
    x_t = torch.tensor([[MASK, 2], [MASK, MASK]])
    move_t = torch.tensor([0.8, 0.5], dtype=torch.float64)
    move_s = torch.tensor([0.3, 0.5], dtype=torch.float64)  # row 1: nothing can be revealed
    q = reveal_probs(_p_x0(x_t), x_t, move_t, move_s, MASK)
    expected_row0 = torch.tensor([0.5 * 0.5 / 0.8, 0.3 * 0.5 / 0.8, 0.2 * 0.5 / 0.8, 0.3 / 0.8], dtype=torch.float64)
    torch.testing.assert_close(q[0, 0], expected_row0, rtol=1e-12, atol=0)
    torch.testing.assert_close(q[0, 1], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(q[1, 0], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(SamplingError, match="move_s <= move_t"):
        reveal_probs(_p_x0(x_t), x_t, 0.3, 0.8, MASK)


def test_one_ddpm_step_matches_analytic_posterior():
    n = 60000
    x_t = torch.tensor([[MASK, 2]]).expand(n, -1).contiguous()
    move_t, move_s = 0.8, 0.3
    x_s = ddpm_update(_p_x0(x_t), x_t, move_t, move_s, MASK, generator=torch.Generator().manual_seed(0))
    assert bool((x_s[:, 1] == 2).all())  # copy rule
    freq = torch.bincount(x_s[:, 0], minlength=4).double() / n
    analytic = torch.cat([MU[:MASK] * (move_t - move_s) / move_t, torch.tensor([move_s / move_t], dtype=torch.float64)])
    tv = 0.5 * (freq - analytic).abs().sum().item()
    assert tv < 0.01  # expected TV ~ 0.003 for 60k draws over 4 outcomes


def test_copy_rule_holds_even_if_the_predictor_disagrees():
    x_t = torch.tensor([[1, MASK]])
    p = MU.expand(1, 2, -1).clone()  # not carried over: row 0 puts mass on other tokens
    for seed in range(20):
        x_s = ddpm_update(p, x_t, 0.9, 0.1, MASK, generator=torch.Generator().manual_seed(seed))
        assert x_s[0, 0].item() == 1


def test_noise_removal_is_greedy_and_never_the_mask():
    log_mu = torch.log(torch.tensor([[[0.1, 0.2, 0.05, 0.65], [0.7, 0.1, 0.2, 0.0]]], dtype=torch.float64))
    x = noise_removal(log_mu, torch.tensor([[MASK, 2]]), MASK)
    assert x.tolist() == [[1, 2]]  # the mask's 0.65 is ignored; position 1 keeps its token


def _factorised_denoiser(mu_per_position: torch.Tensor, calls: list):
    """An exact denoiser for a factorised data distribution: mu never depends on the context."""

    def denoise(x_t, t):
        calls.append(x_t.clone())
        p = mu_per_position.expand(x_t.shape[0], -1, -1).clone()
        unmasked = x_t != MASK
        p[unmasked] = torch.nn.functional.one_hot(x_t[unmasked], MU.numel()).double()
        return torch.log(p)

    return denoise


MU2 = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.2, 0.2, 0.6, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("update", ["ddpm", "ddpm_cache"])
def test_sample_loop_recovers_a_factorised_target(update):
    # For a factorised target and an exact denoiser, ancestral sampling is exact for any steps.
    n = 20000
    calls: list = []
    x, stats = mdlm_sample_loop(
        _factorised_denoiser(MU2, calls), torch.full((n, 2), MASK), 6, update=update,
        schedule=LogLinearSchedule(), mask_id=MASK, generator=torch.Generator().manual_seed(1),
    )
    assert not bool((x == MASK).any())
    target = {(a, b): (MU2[0, a] * MU2[1, b]).item() for a, b in itertools.product(range(3), range(3))}
    codes = x[:, 0] * 3 + x[:, 1]
    freq = torch.bincount(codes, minlength=9).double() / n
    tv = 0.5 * sum(abs(freq[a * 3 + b].item() - p) for (a, b), p in target.items())
    assert tv < 0.02  # expected ~0.007 for 20k samples over 9 outcomes
    # with 20k rows something changes at every step, so the cache never applies: steps + noise removal
    assert stats["nfe"] == 7 == len(calls)


def test_cache_only_skips_calls_when_nothing_changed():
    calls: list = []
    steps = 64
    x, stats = mdlm_sample_loop(
        _factorised_denoiser(MU2, calls), torch.full((1, 2), MASK), steps, update="ddpm_cache",
        mask_id=MASK, generator=torch.Generator().manual_seed(2),
    )
    assert stats["nfe"] == len(calls)
    # at most 2 reveals for L = 2: first call, one after each change, plus noise removal
    assert stats["nfe"] <= 4 < steps + 1
    for previous, current in zip(calls[:-1], calls[1:-1]):
        assert not torch.equal(previous, current)  # a new call only after the state changed
    # no caching when asked not to, or when the denoiser is time-conditioned
    for kwargs in ({"cache": False}, {"time_conditioning": True}):
        calls.clear()
        _, stats = mdlm_sample_loop(
            _factorised_denoiser(MU2, calls), torch.full((1, 2), MASK), steps, update="ddpm_cache",
            mask_id=MASK, generator=torch.Generator().manual_seed(2), **kwargs,
        )
        assert stats["nfe"] == steps + 1 == len(calls)


def test_sample_loop_is_deterministic_with_a_seed():
    run = lambda: mdlm_sample_loop(  # noqa: E731
        _factorised_denoiser(MU2, []), torch.full((50, 2), MASK), 5, mask_id=MASK,
        generator=torch.Generator().manual_seed(3),
    )[0]
    assert torch.equal(run(), run())
