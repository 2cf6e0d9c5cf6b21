"""How close two floating-point results must be: the one rule every numeric test uses.

Every numeric assertion in tests/ is one of two kinds.

* **Bitwise by design.** Both sides run the same code, on the same machine, in one run, on the
  same shapes: a resumed run against the uninterrupted one, N ranks against one rank where the
  design makes them compute identically, a cached path against the uncached one, a seed replayed.
  Compare with ``torch.equal`` / ``==``: any difference is a bug, not rounding.
* **Across implementations.** The two sides compute the same quantity differently: an fp32 model
  against a float64 reference, another batch shape or reduction order, another CPU's kernels (MKL
  picks AVX-512, AVX2 or SSE4.2 code by CPU; ATen vectorises by CPU capability; threads split
  reductions). Their difference is rounding, and rounding is bounded by the dtype and the length of
  the reductions: use :func:`tolerance`, :func:`assert_close_across` or :func:`approx_across`.

The bound. A sum or inner product of n terms computed in precision u = eps/2, in any order, errs
by at most γ_n·Σ|terms|, γ_n = n·u/(1 − n·u) (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §3.1, §4.2). That worst case grows like n; treating the rounding errors as
independent and mean-zero, the error is at most λ·√n·u·Σ|terms| except with probability below
2n·exp(−λ²/2) (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4); λ = 10 makes that
probability < 1e-16 for every n ≤ 10⁵. Two implementations that both obey a bound differ by at most
twice it, so the relative tolerance is ``min(n, 10·√n) · eps(dtype)`` (the deterministic bound
while it is the tighter one, n < 100), and the absolute one is that times the magnitude of the
terms (``scale``), which covers results that cancel to near zero. For a network, n is the sum of
the reduction lengths along its longest path (per layer: the inner dimension of each matmul, the
softmax's length, ...), which assumes O(1)-conditioned layers: true of the small, freshly
initialised or briefly trained models in these tests. The bound holds on every CPU and kernel,
while a real bug (a wrong index, term, sign or mask) moves a result by orders of magnitude more.
"""
from __future__ import annotations

import math

import pytest
import torch

LAMBDA = 10.0  # standard deviations of the probabilistic bound (Higham & Mary 2019)
EPS = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


def tolerance(dtype: torch.dtype, reduction_size: int, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for a result computed in ``dtype`` through reductions of ``reduction_size`` terms
    of magnitude about ``scale``, compared with the same quantity computed another way."""
    if reduction_size < 1:
        raise ValueError(f"reduction_size must be ≥ 1, got {reduction_size}")
    rtol = min(reduction_size, LAMBDA * math.sqrt(reduction_size)) * EPS[dtype]
    return rtol, rtol * float(scale)


def assert_close_across(actual, expected, *, dtype: torch.dtype, reduction_size: int, scale: float | None = None,
                        msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the rule's tolerance; ``dtype`` is the lower precision the
    two sides were computed in, ``scale`` defaults to the largest |expected| (at least 1)."""
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual)
    if scale is None:
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    rtol, atol = tolerance(dtype, reduction_size, scale)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=msg)


def approx_across(expected, *, dtype: torch.dtype, reduction_size: int, scale: float | None = None):
    """``pytest.approx(expected)`` with the rule's tolerance (scale defaults to max(1, |expected|))."""
    if scale is None:
        scale = max(1.0, abs(float(expected)))
    rtol, atol = tolerance(dtype, reduction_size, scale)
    return pytest.approx(expected, rel=rtol, abs=atol)


def network_reduction_size(cfg, seq_len: int, vocab_size: int) -> int:
    """n for one forward of our DiT / AR / energy transformer (``cfg``: a ModelConfig), summed along
    its longest path: per block two norms, QKV, the attention scores and their softmax-weighted sum
    over ``seq_len``, the output projection and the 4× MLP (≈ 11·hidden + 2·seq_len), then the final
    norm and head (2·hidden) and a log-softmax over ``vocab_size``."""
    hidden = int(cfg.hidden_size)
    return int(cfg.n_blocks) * (11 * hidden + 2 * seq_len) + 2 * hidden + vocab_size
