"""Unigram entropy in bits against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from edlm_dist.errors import DataError
from edlm_dist.evaluation.entropy import unigram_entropy_bits


def test_single_row_hand_computation():
    # counts {7: 2, 3: 1, 50256: 1} → p = (1/2, 1/4, 1/4) → H = 0.5·1 + 2·0.25·2 = 1.5 bits
    assert unigram_entropy_bits(torch.tensor([50256, 7, 7, 3])) == pytest.approx(1.5)
    assert unigram_entropy_bits(torch.tensor([4, 4, 4])) == 0.0


def test_batch_rows_and_specials_count():
    ids = torch.tensor([
        [0, 1, 2, 3, 4, 5, 6, 7],  # 8 distinct → 3 bits
        [9, 9, 9, 9, 9, 9, 9, 1],  # p = (7/8, 1/8)
        [50256, 5, 5, 50256, 5, 5, 5, 50256],  # specials included: p = (3/8, 5/8)
    ])
    h = unigram_entropy_bits(ids)
    assert h.dtype == torch.float64 and h.shape == (3,)
    binary = lambda q: -(q * math.log2(q) + (1 - q) * math.log2(1 - q))  # noqa: E731
    torch.testing.assert_close(h, torch.tensor([3.0, binary(1 / 8), binary(3 / 8)], dtype=torch.float64))
    # rows are independent of each other
    assert h[1].item() == pytest.approx(unigram_entropy_bits(ids[1]))


def test_bad_input():
    with pytest.raises(DataError, match="token ids"):
        unigram_entropy_bits(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(DataError, match="token ids"):
        unigram_entropy_bits(torch.rand(4))
