"""Float64 reductions of Python numbers over a process group (metrics summed across ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_float64(values: list[float], group=None, device: torch.device | str = "cpu") -> list[float]:
    """Sum a list of floats over the ranks of ``group`` in float64; returns the list unchanged when
    torch.distributed is not initialised (single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()
