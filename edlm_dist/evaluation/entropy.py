"""Unigram entropy of generated samples (spec §7.2).

Per sample: counts of the model's own token ids over all positions (BOS/EOS included),
H = −Σ_v p_v log2 p_v in bits. Report the mean over samples (paper: data 7.7, MDLM 7.5–7.9).
"""
from __future__ import annotations

import torch
from torch import Tensor

from edlm_dist.errors import DataError


def _row_entropy_bits(row: Tensor) -> Tensor:
    _, counts = torch.unique(row, return_counts=True)
    p = counts.to(torch.float64) / row.numel()
    return -(p * torch.log2(p)).sum()


def unigram_entropy_bits(ids: Tensor) -> float | Tensor:
    """Entropy in bits of each row's empirical token distribution.

    ids: (L,) → a Python float; (B, L) → a float64 tensor of shape (B,).
    """
    if ids.dim() not in (1, 2) or ids.shape[-1] == 0 or ids.is_floating_point():
        raise DataError(
            f"expected integer token ids of shape (L,) or (B, L) with L ≥ 1, got {tuple(ids.shape)} {ids.dtype}"
        )
    if ids.dim() == 1:
        return float(_row_entropy_bits(ids))
    return torch.stack([_row_entropy_bits(row) for row in ids])
