"""Confidence intervals for every reported figure: the percentile bootstrap, over samples and seeds.

A Gen PPL, an entropy, a time per sample or a speed-up is a statistic of a finite set of rows (the
samples), often pooled over a few seeds. Its interval is the percentile bootstrap (Efron &
Tibshirani 1993, ch. 13): draw resamples of the rows with replacement, recompute the statistic on
each, and report the α/2 and 1 − α/2 quantiles of those replicates. Where the rows come from
several seeds the resampling is two-level (Davison & Hinkley 1997, §3.8): first the seeds with
replacement, then the rows within each chosen seed, so the interval also covers the spread between
seeds, not only the sampling noise within one.

Every statistic here is a ratio of row sums, transformed: Σ numerator / Σ denominator over the rows
(a plain mean when the denominator is 1 per row), e.g. Gen PPL = exp(Σ_rows NLL / Σ_rows scored
tokens), token-weighted as the point estimate is. A resample is then a vector of row multiplicities
(counts), and all replicates are one matrix product: no Python loop over resamples.

Two independent sets of rows (MDLM's samples and EDLM's at the same T) are compared by resampling
each independently and taking the replicates of their difference (or ratio): the interval of the
difference, and the two-sided bootstrap p-value of "no difference" (the smallest 1 − level at which
that interval would still exclude it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edlm_dist.errors import DataError

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided confidence interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, spec: str = "{:.2f}") -> str:
        """'12.34 [11.02, 13.90]' (estimate, then the interval)."""
        return f"{spec.format(self.estimate)} [{spec.format(self.low)}, {spec.format(self.high)}]"

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


@dataclass(frozen=True)
class Comparison:
    """Statistic of A against statistic of B: their difference (or ratio) with its interval."""

    kind: str  # "difference" (A − B) or "ratio" (A / B)
    interval: Interval
    p_value: float  # two-sided bootstrap p-value of "no difference" (0 for a difference, 1 for a ratio)

    @property
    def significant(self) -> bool:
        """The interval excludes "no difference" (equivalently p < 1 − level)."""
        null = 1.0 if self.kind == "ratio" else 0.0
        return not self.interval.contains(null)

    def as_dict(self) -> dict:
        return {"kind": self.kind, **self.interval.as_dict(), "p_value": self.p_value,
                "significant": self.significant}


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class RatioStatistic:
    """transform(Σ numerator / Σ denominator) over rows; ``groups`` labels each row's seed (or None)."""

    numerator: Tensor
    denominator: Tensor
    groups: Tensor | None = None
    transform: Callable[[Tensor], Tensor] = field(default=_identity)

    def __post_init__(self) -> None:
        num = torch.as_tensor(self.numerator, dtype=torch.float64).reshape(-1)
        den = torch.as_tensor(self.denominator, dtype=torch.float64).reshape(-1)
        if num.numel() == 0:
            raise DataError("a confidence interval needs at least one sample; generate or score some rows first")
        if den.shape != num.shape:
            raise DataError(f"numerator and denominator need one value per row, got {num.numel()} and {den.numel()}")
        if not (torch.isfinite(num).all() and torch.isfinite(den).all()):
            raise DataError("a row value is NaN or infinite; drop or fix the rows that produced it")
        if (den < 0).any() or float(den.sum()) <= 0:
            raise DataError("denominators must be ≥ 0 with a positive sum (e.g. scored tokens per row)")
        object.__setattr__(self, "numerator", num)
        object.__setattr__(self, "denominator", den)
        if self.groups is not None:
            groups = torch.as_tensor(self.groups).reshape(-1)
            if groups.shape != num.shape:
                raise DataError(f"need one group (seed) label per row, got {groups.numel()} for {num.numel()} rows")
            object.__setattr__(self, "groups", torch.unique(groups, return_inverse=True)[1])

    @classmethod
    def mean(cls, values, groups=None) -> RatioStatistic:
        """The plain mean of per-row values (entropy, seconds per sample, ...)."""
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        return cls(values, torch.ones_like(values), groups)

    @classmethod
    def gen_ppl(cls, nll_sums, scored_tokens, groups=None) -> RatioStatistic:
        """exp(Σ NLL / Σ scored tokens): the token-weighted generative perplexity of the rows."""
        return cls(nll_sums, scored_tokens, groups, torch.exp)

    def estimate(self) -> float:
        return float(self.transform(self.numerator.sum() / self.denominator.sum()))

    def replicates(self, counts: Tensor) -> Tensor:
        """The statistic of each resample, given row multiplicities ``counts`` of shape (B, rows)."""
        with torch.no_grad():
            return self.transform((counts @ self.numerator) / (counts @ self.denominator))

    def resample_counts(self, n_resamples: int, generator: torch.Generator) -> Tensor:
        """Row multiplicities (B, rows) of ``n_resamples`` bootstrap resamples of these rows."""
        return resample_counts(self.groups if self.groups is not None else torch.zeros_like(self.numerator,
                                                                                              dtype=torch.long),
                               n_resamples, generator)


def resample_counts(groups: Tensor, n_resamples: int, generator: torch.Generator) -> Tensor:
    """How often each row appears in each of ``n_resamples`` bootstrap resamples, shape (B, rows), float64.

    One group: each resample draws as many rows as there are, uniformly with replacement. Several
    groups (``groups[i]`` = the seed of row i, labels 0..G−1): each resample draws G groups with
    replacement, and for every drawn group as many of its rows as it has, with replacement.
    """
    if n_resamples < 1:
        raise DataError(f"n_resamples must be ≥ 1, got {n_resamples}")
    groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    n_groups = int(groups.max()) + 1
    members = [torch.nonzero(groups == g).reshape(-1) for g in range(n_groups)]
    counts = torch.zeros(n_resamples, groups.numel(), dtype=torch.float64)
    if n_groups == 1:
        draws = [torch.zeros(n_resamples, dtype=torch.long)]
    else:
        draws = list(torch.randint(n_groups, (n_groups, n_resamples), generator=generator))
    for drawn in draws:  # one slot per group drawn; each slot holds one whole group, rows resampled
        for g, rows in enumerate(members):
            chosen = torch.nonzero(drawn == g).reshape(-1)
            if chosen.numel() == 0:
                continue
            picks = rows[torch.randint(rows.numel(), (chosen.numel(), rows.numel()), generator=generator)]
            counts[chosen] += torch.zeros(chosen.numel(), groups.numel(), dtype=torch.float64).scatter_add_(
                1, picks, torch.ones(picks.shape, dtype=torch.float64))
    return counts


def percentile_interval(estimate: float, replicates: Tensor, level: float = DEFAULT_LEVEL) -> Interval:
    """The α/2 and 1 − α/2 quantiles of the bootstrap replicates around the point estimate."""
    if not 0.0 < level < 1.0:
        raise DataError(f"confidence level must be in (0, 1), got {level}")
    reps = replicates.to(torch.float64)
    alpha = 1.0 - level
    low, high = torch.quantile(reps, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return Interval(float(estimate), low, high, level)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def bootstrap_interval(statistic: RatioStatistic, *, level: float = DEFAULT_LEVEL,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of one statistic (seeded: the same rows give the same interval)."""
    counts = statistic.resample_counts(n_resamples, _generator(seed))
    return percentile_interval(statistic.estimate(), statistic.replicates(counts), level)


def compare(a: RatioStatistic, b: RatioStatistic, *, kind: str = "difference", level: float = DEFAULT_LEVEL,
            n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Comparison:
    """A against B (independent sets of rows): A − B or A / B, its interval and two-sided p-value."""
    if kind not in ("difference", "ratio"):
        raise DataError(f"comparison kind must be 'difference' or 'ratio', got {kind!r}")
    gen = _generator(seed)
    rep_a = a.replicates(a.resample_counts(n_resamples, gen))
    rep_b = b.replicates(b.resample_counts(n_resamples, gen))
    if kind == "ratio":
        estimate, reps, null = a.estimate() / b.estimate(), rep_a / rep_b, 1.0
    else:
        estimate, reps, null = a.estimate() - b.estimate(), rep_a - rep_b, 0.0
    return Comparison(kind, percentile_interval(estimate, reps, level), two_sided_p_value(reps, null))


def two_sided_p_value(replicates: Tensor, null: float) -> float:
    """2 · min(P*(rep ≤ null), P*(rep ≥ null)), capped at 1 and floored at 1/B: the smallest 1 − level
    at which the percentile interval of the B replicates would still exclude ``null``, so p < 1 − level
    and "significant" agree (a Monte-Carlo p-value below 1/B cannot be resolved)."""
    n = replicates.numel()
    below = int((replicates <= null).sum()) / n
    above = int((replicates >= null).sum()) / n
    return min(1.0, max(2.0 * min(below, above), 1.0 / n))


def bootstrap_samples(samples: Sequence, statistic: Callable[..., Tensor], *, level: float = DEFAULT_LEVEL,
                      n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile interval of a statistic of independent sets of values that is not a ratio of sums
    (a median of repeated timings, a ratio of two medians): each set is resampled on its own and
    ``statistic(*resampled)`` maps the resampled sets, (B, n_i) each, to (B,)."""
    if n_resamples < 1:
        raise DataError(f"n_resamples must be ≥ 1, got {n_resamples}")
    sets = [torch.as_tensor(values, dtype=torch.float64).reshape(-1) for values in samples]
    if not sets or any(v.numel() == 0 or not torch.isfinite(v).all() for v in sets):
        raise DataError("a confidence interval needs at least one finite value per set; measure again")
    gen = _generator(seed)
    resampled = [v[torch.randint(v.numel(), (n_resamples, v.numel()), generator=gen)] for v in sets]
    estimate = float(statistic(*(v[None] for v in sets))[0])
    return percentile_interval(estimate, statistic(*resampled), level)


def bootstrap_rows(values, statistic: Callable[[Tensor], Tensor], **options) -> Interval:
    """:func:`bootstrap_samples` of one set of values."""
    return bootstrap_samples([values], statistic, **options)


def median(values: Tensor) -> Tensor:
    """The lower median along the last dimension (torch's convention), for :func:`bootstrap_rows`."""
    return values.median(dim=-1).values


def holm_significant(p_values: Sequence[float], alpha: float = 1 - DEFAULT_LEVEL) -> list[bool]:
    """Which of a family of tests stay significant at family-wise error ``alpha`` (Holm 1979): the
    i-th smallest p-value (i = 1..m) must be ≤ alpha / (m − i + 1), and every smaller one too."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    keep = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        keep[i] = True
    return keep


def seed_labels(sizes: Sequence[int]) -> Tensor:
    """Row labels 0,0,…,1,1,… for rows that come from consecutive seeds of the given sizes."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.long))

