"""The tolerance rule of tests/tolerances.py against real rounding: float32 sums in other orders and
blockings stay inside it, and one wrong term does not."""
from __future__ import annotations

import pytest
import torch

from tests.tolerances import approx_across, assert_close_across, tolerance


@pytest.mark.parametrize("n", [7, 100, 4096, 50_257])
def test_float32_sums_in_any_order_stay_within_the_rule(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64).exp()  # positive terms: no cancellation
    exact = x.sum()
    x32 = x.float()
    orders = [x32, x32.flip(0), x32[torch.randperm(n, generator=g)]]
    results = [torch.cumsum(o, 0)[-1] for o in orders]  # sequential
    results += [o.sum() for o in orders]  # ATen's vectorised, blocked sum
    results += [(o[None] @ torch.ones(n, 1)).reshape(()) for o in orders]  # BLAS (MKL) dot
    for r in results:
        assert_close_across(r.double(), exact, dtype=torch.float32, reduction_size=n)
    # the sign of the largest term flipped is a bug the rule must see
    wrong = x.clone()
    wrong[x.argmax()] *= -1
    with pytest.raises(AssertionError):
        assert_close_across(wrong.float().sum().double(), exact, dtype=torch.float32, reduction_size=n)


def test_rule_values():
    assert tolerance(torch.float32, 1) == (2.0**-23, 2.0**-23)
    rtol, atol = tolerance(torch.float64, 10_000, scale=3.0)
    assert rtol == pytest.approx(1000 * 2.0**-52) and atol == pytest.approx(3 * rtol)
    assert tolerance(torch.float32, 10_000)[0] == pytest.approx(1000 * 2.0**-23)  # 10·√n < n from n = 100 on
    assert 1.0 + 1e-5 == approx_across(1.0, dtype=torch.float32, reduction_size=100)
    assert 1.0 + 1e-5 != approx_across(1.0, dtype=torch.float64, reduction_size=100)
    with pytest.raises(ValueError):
        tolerance(torch.float32, 0)
