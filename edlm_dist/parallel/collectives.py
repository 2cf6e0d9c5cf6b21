"""Reductions of Python numbers over a process group: metrics, flags and stop signals.

Every tensor handed to a collective here is built on :func:`edlm_dist.parallel.devices.collective_device`
of the group (NCCL reduces GPU tensors only), so callers pass numbers, never tensors or devices.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from edlm_dist.parallel.devices import collective_device

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_values(values: list[float], group=None, *, op: str = "sum",
                      dtype: torch.dtype = torch.float64) -> list[float]:
    """Reduce a list of numbers over ``group`` (``op`` in sum | max | min); unchanged without torch.distributed."""
    if not _initialised():
        return list(values)
    tensor = torch.tensor(values, dtype=dtype, device=collective_device(group))
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.tolist()


def all_reduce_float64(values: list[float], group=None, device: Optional[torch.device | str] = None) -> list[float]:
    """Sum a list of floats over the ranks of ``group`` in float64 (``device`` defaults to the group's)."""
    if device is None or not _initialised():
        return all_reduce_values(values, group)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True when ``flag`` is set on any rank of ``group`` (every rank gets the same answer)."""
    return all_reduce_values([1.0 if flag else 0.0], group, op="max")[0] > 0


def max_over_ranks(value: float, group=None) -> float:
    return all_reduce_values([float(value)], group, op="max")[0]
