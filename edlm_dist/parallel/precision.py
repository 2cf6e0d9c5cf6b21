"""Inference precision of model forwards (sampling, evaluation): bf16 autocast and TF32 on CUDA.

``auto`` is bf16 autocast on CUDA (flash attention, bf16 GEMMs, as in training) and fp32 on CPU,
where bf16 GEMMs are slower than fp32 ones. The models keep their numerically sensitive parts in
fp32 under autocast (LayerNorm, sigma embedding, log-softmax after ``.float()``); the categorical
draws and importance weights run in float64 on whatever the forwards return (sample.precision).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_model_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; fp32 / bf16 as given."""
    if precision not in MODEL_PRECISIONS:
        raise ValueError(f"model precision '{precision}' is unknown; use one of {list(MODEL_PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def inference_precision(device: torch.device, precision: str) -> Iterator[str]:
    """Run the enclosed forwards at ``precision`` (resolved; yielded). On CUDA fp32 matmuls may use TF32
    inside the block (10-bit mantissa products, fp32 accumulation); the previous settings come back after."""
    resolved = resolve_model_precision(precision, device)
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved == "bf16"):
            yield resolved
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
