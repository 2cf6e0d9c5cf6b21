"""The bootstrap against exact enumeration of its resamples, closed forms, and a coverage check."""
from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch

from edlm_dist.errors import DataError
from edlm_dist.evaluation.intervals import (
    Interval,
    RatioStatistic,
    bootstrap_interval,
    bootstrap_rows,
    bootstrap_samples,
    compare,
    holm_significant,
    median,
    percentile_interval,
    resample_counts,
    seed_labels,
    two_sided_p_value,
)

F64 = torch.float64


def _frequencies(replicates: torch.Tensor) -> Counter:
    return Counter(round(v, 9) for v in replicates.tolist())


def _assert_matches_exact(replicates: torch.Tensor, exact: dict[float, Fraction]) -> None:
    """Every value's Monte-Carlo frequency within 5 binomial standard errors of its exact probability."""
    n = replicates.numel()
    seen = _frequencies(replicates)
    assert set(seen) <= {round(v, 9) for v in exact}  # no value the enumeration cannot produce
    for value, prob in exact.items():
        p = float(prob)
        assert abs(seen.get(round(value, 9), 0) / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, value


def test_one_group_replicates_follow_the_exact_bootstrap_distribution_of_the_mean():
    """n = 3 rows: the bootstrap distribution of the mean is uniform over the 27 ordered resamples."""
    x = [0.0, 1.0, 3.0]
    exact: dict[float, Fraction] = {}
    for resample in itertools.product(x, repeat=3):
        mean = sum(resample) / 3
        exact[mean] = exact.get(mean, Fraction(0)) + Fraction(1, 27)
    stat = RatioStatistic.mean(x)
    reps = stat.replicates(stat.resample_counts(60_000, torch.Generator().manual_seed(0)))
    _assert_matches_exact(reps, exact)

    # the interval's ends are the exact distribution's 2.5 % and 97.5 % quantiles (CDF jumps well away from them)
    interval = bootstrap_interval(stat, n_resamples=60_000, seed=1)
    values = sorted(exact)
    cdf = list(itertools.accumulate(float(exact[v]) for v in values))
    assert interval.low == values[next(i for i, c in enumerate(cdf) if c >= 0.025)]
    assert interval.high == values[next(i for i, c in enumerate(cdf) if c >= 0.975)]
    assert interval.estimate == pytest.approx(4 / 3, rel=1e-15)


def test_rows_bootstrap_of_a_median_matches_exact_enumeration():
    """Median of 3 timings: its bootstrap distribution over the 27 resamples, and the interval's ends."""
    x = [1.0, 2.0, 10.0]
    exact: dict[float, Fraction] = {}
    for resample in itertools.product(x, repeat=3):
        m = sorted(resample)[1]
        exact[m] = exact.get(m, Fraction(0)) + Fraction(1, 27)
    assert exact == {1.0: Fraction(7, 27), 2.0: Fraction(13, 27), 10.0: Fraction(7, 27)}
    interval = bootstrap_rows(x, median, level=0.9, n_resamples=20_000, seed=3)
    assert (interval.estimate, interval.low, interval.high) == (2.0, 1.0, 10.0)  # 5 % and 95 % both inside the tails
    narrow = bootstrap_rows(x, median, level=0.4, n_resamples=20_000, seed=3)  # 30 % and 70 %: the middle atom
    assert (narrow.low, narrow.high) == (2.0, 2.0)


def test_independent_sets_resample_separately_for_a_ratio_of_medians():
    """Two sets of 2 values: the ratio of their medians over the 4 × 4 equally likely resample pairs."""
    a, b = [1.0, 3.0], [2.0, 4.0]
    exact: dict[float, Fraction] = {}
    for ra, rb in itertools.product(itertools.product(a, repeat=2), itertools.product(b, repeat=2)):
        ratio = min(ra) / min(rb)  # torch's lower median of 2 values is their minimum
        exact[ratio] = exact.get(ratio, Fraction(0)) + Fraction(1, 16)
    interval = bootstrap_samples([a, b], lambda x, y: median(x) / median(y), level=0.8, n_resamples=40_000, seed=4)
    values = sorted(exact)
    cdf = list(itertools.accumulate(float(exact[v]) for v in values))
    assert interval.estimate == 0.5
    assert interval.low == values[next(i for i, c in enumerate(cdf) if c >= 0.1)]
    assert interval.high == values[next(i for i, c in enumerate(cdf) if c >= 0.9)]


def test_two_level_replicates_follow_the_exact_distribution_over_seeds_then_rows():
    """Two seeds of two rows each: a resample takes 2 seeds with replacement, then 2 rows of each."""
    groups = [[0.0, 1.0], [4.0, 10.0]]
    exact: dict[float, Fraction] = {}
    for g1, g2 in itertools.product(range(2), repeat=2):
        for rows1, rows2 in itertools.product(itertools.product(groups[g1], repeat=2),
                                              itertools.product(groups[g2], repeat=2)):
            mean = (sum(rows1) + sum(rows2)) / 4
            exact[mean] = exact.get(mean, Fraction(0)) + Fraction(1, 4 * 4 * 4)
    stat = RatioStatistic.mean([v for g in groups for v in g], groups=seed_labels([2, 2]))
    reps = stat.replicates(stat.resample_counts(60_000, torch.Generator().manual_seed(2)))
    _assert_matches_exact(reps, exact)


def test_replicate_variance_matches_the_closed_forms():
    """One group: Var*(mean) = σ̂²/n (σ̂² with 1/n). Seeds of equal size n, S of them:
    Var* = [ (1/S) Σ_g (x̄_g − x̄)² + (1/S) Σ_g σ̂²_g / n ] / S."""
    torch.manual_seed(0)
    x = torch.randn(40, dtype=F64).exp()
    stat = RatioStatistic.mean(x)
    reps = stat.replicates(stat.resample_counts(40_000, torch.Generator().manual_seed(3)))
    closed = x.var(unbiased=False).item() / x.numel()
    assert reps.var().item() == pytest.approx(closed, rel=0.05)  # MC error of a variance: sqrt(2/B) ≈ 0.7 %

    seeds = torch.randn(3, 1, dtype=F64) * 2 + torch.randn(3, 30, dtype=F64)
    stat = RatioStatistic.mean(seeds.reshape(-1), groups=seed_labels([30, 30, 30]))
    reps = stat.replicates(stat.resample_counts(40_000, torch.Generator().manual_seed(4)))
    s = seeds.shape[0]
    between = ((seeds.mean(1) - seeds.mean()) ** 2).mean().item()
    within = seeds.var(1, unbiased=False).mean().item() / seeds.shape[1]
    assert reps.var().item() == pytest.approx((between + within) / s, rel=0.05)


def test_ratio_replicates_equal_the_statistic_of_the_materialised_resample():
    """Counts × rows is a round trip of 'repeat each row count times, recompute exp(Σ nll / Σ tokens)'."""
    torch.manual_seed(1)
    nll, tokens = torch.rand(7, dtype=F64) * 30, torch.randint(1, 20, (7,)).to(F64)
    stat = RatioStatistic.gen_ppl(nll, tokens)
    counts = stat.resample_counts(50, torch.Generator().manual_seed(5))
    assert torch.equal(counts.sum(1), torch.full((50,), 7.0, dtype=F64))
    for row, value in zip(counts, stat.replicates(counts)):
        idx = torch.repeat_interleave(torch.arange(7), row.long())
        assert value.item() == pytest.approx(math.exp(nll[idx].sum().item() / tokens[idx].sum().item()), rel=1e-12)
    assert stat.estimate() == pytest.approx(math.exp(nll.sum().item() / tokens.sum().item()), rel=1e-15)


def test_percentile_interval_covers_the_true_mean_about_as_often_as_its_level():
    """300 normal samples of 60: a 90 % interval should cover the true mean in ≈ 90 % of them
    (the percentile bootstrap undercovers slightly at small n; 3 binomial SEs either side)."""
    gen = torch.Generator().manual_seed(6)
    covered = 0
    trials = 300
    for i in range(trials):
        x = torch.randn(60, generator=gen, dtype=F64) + 5.0
        covered += bootstrap_interval(RatioStatistic.mean(x), level=0.9, n_resamples=1000, seed=i).contains(5.0)
    se = math.sqrt(0.9 * 0.1 / trials)
    assert 0.9 - 3 * se - 0.02 <= covered / trials <= 0.9 + 3 * se


def test_comparison_finds_a_real_difference_and_not_a_null_one():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(200, generator=gen, dtype=F64) + 1.0
    b = torch.randn(200, generator=gen, dtype=F64)
    shifted = compare(RatioStatistic.mean(a), RatioStatistic.mean(b))
    assert shifted.significant and shifted.p_value < 0.01 and shifted.interval.low > 0.5
    assert shifted.interval.estimate == pytest.approx((a.mean() - b.mean()).item(), rel=1e-12)

    ratio = compare(RatioStatistic.gen_ppl(a + 3, torch.ones(200)), RatioStatistic.gen_ppl(b + 3, torch.ones(200)),
                    kind="ratio")
    assert ratio.interval.estimate == pytest.approx(math.exp((a.mean() - b.mean()).item()), rel=1e-12)
    assert ratio.significant and ratio.interval.low > 1.0

    # the null: both halves of one sample; over 200 such splits the test rejects at about its 5 % rate
    rejections = 0
    for i in range(200):
        x = torch.randn(100, generator=gen, dtype=F64)
        rejections += compare(RatioStatistic.mean(x[:50]), RatioStatistic.mean(x[50:]), n_resamples=500,
                              seed=i).significant
    assert rejections / 200 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200) + 0.02


def test_holm_keeps_the_smallest_p_values_that_pass_their_stepped_thresholds():
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05 in p order
    assert holm_significant([0.01, 0.04, 0.012, 0.3]) == [True, False, True, False]
    assert holm_significant([0.013, 0.001]) == [True, True]  # 0.001 ≤ 0.025, then 0.013 ≤ 0.05
    assert holm_significant([0.02, 0.03]) == [True, True]  # 0.02 ≤ 0.025, then 0.03 ≤ 0.05
    assert holm_significant([0.03, 0.03]) == [False, False]  # the smallest already fails 0.025
    assert holm_significant([]) == []


def test_p_value_is_two_sided_floored_and_agrees_with_the_interval():
    reps = torch.arange(1, 101, dtype=F64)  # 1..100
    assert two_sided_p_value(reps, 0.0) == pytest.approx(1 / 100)  # all above: floored at 1/B
    assert two_sided_p_value(reps, 50.5) == pytest.approx(1.0)
    assert two_sided_p_value(reps, 3.5) == pytest.approx(2 * 3 / 100)  # 3 of 100 on the far side
    # p < 0.05 exactly when the 95 % percentile interval excludes the null (away from ties)
    gen = torch.Generator().manual_seed(8)
    for shift in torch.linspace(-4, 4, 41).tolist():
        sample = torch.randn(2000, generator=gen, dtype=F64) + shift
        interval = percentile_interval(0.0, sample, 0.95)
        p = two_sided_p_value(sample, 0.0)
        if abs(p - 0.05) > 0.002:
            assert (p < 0.05) == (not interval.contains(0.0)), shift


def test_same_seed_same_interval_and_the_level_sets_the_width():
    x = torch.linspace(0, 1, 50, dtype=F64) ** 2
    stat = RatioStatistic.mean(x)
    assert bootstrap_interval(stat, seed=3) == bootstrap_interval(stat, seed=3)
    narrow, wide = bootstrap_interval(stat, level=0.5), bootstrap_interval(stat, level=0.99)
    assert wide.low < narrow.low < narrow.estimate < narrow.high < wide.high


def test_interval_formats_and_serialises():
    interval = Interval(12.345, 10.0, 15.5)
    assert interval.format() == "12.35 [10.00, 15.50]"
    assert interval.as_dict() == {"estimate": 12.345, "low": 10.0, "high": 15.5, "level": 0.95}
    assert percentile_interval(1.0, torch.tensor([1.0]), 0.5) == Interval(1.0, 1.0, 1.0, 0.5)


@pytest.mark.parametrize("build,message", [
    (lambda: RatioStatistic.mean([]), "at least one sample"),
    (lambda: RatioStatistic([1.0, 2.0], [1.0]), "one value per row"),
    (lambda: RatioStatistic.mean([1.0, float("nan")]), "NaN"),
    (lambda: RatioStatistic([1.0], [0.0]), "positive sum"),
    (lambda: RatioStatistic.mean([1.0, 2.0], groups=[0]), "group"),
    (lambda: percentile_interval(0.0, torch.zeros(3), 1.5), "level"),
    (lambda: resample_counts(torch.zeros(3, dtype=torch.long), 0, torch.Generator()), "n_resamples"),
    (lambda: compare(RatioStatistic.mean([1.0]), RatioStatistic.mean([1.0]), kind="odds"), "kind"),
    (lambda: bootstrap_rows([], median), "at least one"),
])
def test_bad_input_is_a_one_line_data_error(build, message):
    with pytest.raises(DataError, match=message):
        build()
