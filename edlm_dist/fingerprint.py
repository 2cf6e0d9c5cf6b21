"""Exact fingerprints of token tensors: "is x_t identical on every rank?" checks and sampling traces.

It sits below every other package so that the sampling loop (which records traces) and the
distributed proposal exchange (which compares ranks) share it without importing each other.
"""

from __future__ import annotations

import hashlib

import torch


def state_hash(x: torch.Tensor) -> int:
    """Exact 64-bit fingerprint of a tensor's values (BLAKE2b of its bytes)."""
    return int.from_bytes(hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest(),
                          "little")
