"""Exponential-race categorical sampler: frequencies, precision paths, determinism (spec §5.3, §6.7)."""

from __future__ import annotations

import pytest
import torch

from edlm_dist.errors import SamplingError
from edlm_dist.sampling.categorical import sample_categorical, sample_categorical_from_log_probs

P = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0], dtype=torch.float64)
DRAWS = 100_000


def _chi_square(samples: torch.Tensor, p: torch.Tensor) -> tuple[float, torch.Tensor]:
    counts = torch.bincount(samples.flatten(), minlength=p.numel()).double()
    support = p > 0
    expected = p[support] * samples.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), counts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frequencies_match_probabilities(dtype):
    g = torch.Generator().manual_seed(0)
    samples = sample_categorical(P.expand(DRAWS, -1), generator=g, dtype=dtype)
    assert samples.shape == (DRAWS,) and samples.dtype == torch.long
    chi2, counts = _chi_square(samples, P)
    # 5 categories with mass -> 4 degrees of freedom; P(chi2_4 > 23.5) ~ 1e-4
    assert chi2 < 23.5
    assert counts[-1].item() == 0  # probability 0 is never drawn
    tv = 0.5 * (counts / DRAWS - P).abs().sum().item()
    assert tv < 0.01


def test_unnormalised_probs_give_identical_draws():
    scaled = (P * 7.3).expand(1000, -1)
    a = sample_categorical(scaled, generator=torch.Generator().manual_seed(1))
    b = sample_categorical(P.expand(1000, -1), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_seeded_generator_is_deterministic_and_seeds_differ():
    probs = torch.rand(4, 3, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = sample_categorical(probs, generator=torch.Generator().manual_seed(3))
    b = sample_categorical(probs, generator=torch.Generator().manual_seed(3))
    c = sample_categorical(probs, generator=torch.Generator().manual_seed(4))
    assert a.shape == (4, 3) and torch.equal(a, b) and not torch.equal(a, c)


def test_chunking_does_not_change_the_distribution():
    g = torch.Generator().manual_seed(5)
    samples = sample_categorical(P.expand(20000, -1), generator=g, max_chunk_elements=7)  # 1 row per chunk
    chi2, _ = _chi_square(samples, P)
    assert chi2 < 23.5
    # deterministic for a fixed chunk size
    again = sample_categorical(P.expand(20000, -1), generator=torch.Generator().manual_seed(5), max_chunk_elements=7)
    assert torch.equal(samples, again)


def test_log_space_race_matches_probability_race():
    log_p = torch.log(P)  # includes -inf for the impossible token
    probs_draw = sample_categorical(P.expand(5000, -1), generator=torch.Generator().manual_seed(6))
    log_draw = sample_categorical_from_log_probs(log_p.expand(5000, -1), generator=torch.Generator().manual_seed(6))
    assert torch.equal(probs_draw, log_draw)  # same noise, monotone transform, float64


def test_bf16_probabilities_keep_their_tail():
    # bf16 probabilities like the reference's p_x0: the float64 race still reaches the 1e-4 entry
    p = torch.tensor([0.9, 0.0999, 0.0001], dtype=torch.bfloat16)
    samples = sample_categorical(p.expand(200000, -1), generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(samples, minlength=3)
    assert 5 <= counts[2].item() <= 45  # Poisson with mean ~20 (sd 4.5)
    freq = counts.double() / 200000
    torch.testing.assert_close(freq, p.double() / p.double().sum(), rtol=0, atol=0.005)


def test_integer_dtype_is_rejected():
    with pytest.raises(SamplingError, match="floating dtype"):
        sample_categorical(P, dtype=torch.int64)
