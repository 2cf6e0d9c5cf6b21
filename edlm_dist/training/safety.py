"""What keeps a bad step out of a checkpoint: the loss guard (NaN/Inf, divergence) and the state check.

* :func:`check_loss` runs on every micro-batch *before* the backward pass, on all ranks at once (one
  all-reduce): a NaN/Inf loss stops the run before it touches the weights; a finite loss above
  ``train.divergence_loss`` (default ``100 x ln V``, far above the ``ln V`` of an untrained model) stops it
  too (``train.on_divergence=stop``) or logs a warning (``warn``).
* :func:`nonfinite_state` looks at the state itself -- the model's weights, the optimizer's master weights
  and moments, the EMA shadow -- on every rank. The trainer runs it before writing a checkpoint (a state with
  NaN/Inf is never saved, so ``latest`` always names a finite one) and after loading one.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from edlm_dist.config.schema import TrainConfig
from edlm_dist.errors import TrainingError

STATE_PARTS = ("model weights", "optimizer master weights", "optimizer moments", "EMA weights")


def divergence_limit(train: TrainConfig, vocab_size: int) -> float:
    """The loss above which a run counts as diverged: ``train.divergence_loss``, or 100 x ln V."""
    return train.divergence_loss or 100.0 * math.log(max(vocab_size, 2))


def check_loss(loss: torch.Tensor, *, step: int, limit: float, policy: str, last_good: Callable[[], str], log,
               warned: bool) -> bool:
    """Raise TrainingError for a NaN/Inf loss on any rank, and for a diverged one under ``policy="stop"``;
    returns True once a divergence warning has been logged (``warned`` says whether one was already)."""
    value = loss.detach().float().reshape(())
    flags = torch.stack([(~torch.isfinite(value)).float(), (value.abs() > limit).float()]).reshape(2)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    non_finite, diverged = (bool(v) for v in flags.tolist())
    if non_finite:
        raise TrainingError(f"loss is {value.item()} at step {step}; stopped before the update, last good checkpoint: "
                            f"{last_good()}; lower train.lr or check the data")
    if diverged and policy == "stop":
        raise TrainingError(f"loss {value.item():.4g} at step {step} is above train.divergence_loss={limit:.4g}: the "
                            f"run diverged; stopped before the update, last good checkpoint: {last_good()}; lower "
                            "train.lr (or set train.on_divergence=warn to go on)")
    if diverged and not warned:
        log.warning("loss %.4g at step %d is above train.divergence_loss=%.4g: the run is diverging "
                    "(train.on_divergence=warn keeps going); consider a lower train.lr", value.item(), step, limit)
        return True
    return warned


def _innermost_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO keeps its fp32 master partitions there)."""
    seen = optimizer
    while getattr(seen, "optimizer", None) is not None and seen.optimizer is not seen:
        seen = seen.optimizer
    return seen


def _state_tensors(module: torch.nn.Module, optimizer, ema_shadow: Optional[list]) -> Iterator[tuple[int, torch.Tensor]]:
    for p in module.parameters():
        yield 0, p.detach()
    inner = _innermost_optimizer(optimizer) if optimizer is not None else None
    if inner is not None:
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                yield 1, p.detach()
        for state in getattr(inner, "state", {}).values():
            for value in state.values():
                if torch.is_tensor(value):
                    yield 2, value.detach()
    for shadow in ema_shadow or []:
        yield 3, shadow


@torch.no_grad()
def nonfinite_state(module: torch.nn.Module, optimizer, ema_shadow: Optional[list],
                    device: torch.device) -> str:
    """'' when every part of the training state is finite on every rank, else which parts are not
    (collective: every rank must call it)."""
    counts = torch.zeros(len(STATE_PARTS), dtype=torch.float64, device=device)
    for part, tensor in _state_tensors(module, optimizer, ema_shadow):
        if tensor.numel() and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            counts[part] += 1
    if dist.is_initialized():
        dist.all_reduce(counts)
    bad = [f"{name}: {int(n)} tensor{'s' if n > 1 else ''}" for name, n in zip(STATE_PARTS, counts.tolist()) if n]
    return "; ".join(bad)
