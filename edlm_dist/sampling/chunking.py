"""How many rows one model forward takes: one rule for the denoiser and the energies.

On CPU, model forwards over at most ``CPU_CHUNK_TOKENS`` tokens (rows * L) keep the small demo
models' activations in cache: EDLM-AR (k=8) samples 1.3x faster than with one 256 x 32-token
energy forward (docs/frontier.md). On GPU only the caller's memory limit applies.
"""

from __future__ import annotations

from typing import Iterator

import torch

CPU_CHUNK_TOKENS = 1024


def rows_per_forward(device: torch.device, length: int, limit: int) -> int:
    """Rows per model forward: at most ``limit``; on CPU also at most CPU_CHUNK_TOKENS tokens."""
    if device.type == "cpu":
        limit = min(limit, CPU_CHUNK_TOKENS // max(1, length))
    return max(1, limit)


def rows_within_memory(device: torch.device, bytes_per_row: int, cpu_bytes: int) -> int:
    """Rows whose working set fits: on CUDA half of the memory free now, elsewhere ``cpu_bytes``."""
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else cpu_bytes
    return max(1, budget // max(1, bytes_per_row))


def row_chunks(n: int, rows_per_chunk: int) -> Iterator[slice]:
    """Consecutive slices of at most ``rows_per_chunk`` rows covering ``range(n)``."""
    for start in range(0, n, rows_per_chunk):
        yield slice(start, min(n, start + rows_per_chunk))
