"""Exponential moving average of the trainable weights (spec §4.5).

MDLM's EMA: decay ``min(decay, (1 + n) / (10 + n))`` after the n-th optimizer update, tracking
only parameters that require grad. Evaluation and sampling swap the shadow in and restore the
raw weights afterwards. Under ZeRO-3 the caller gathers the partitioned parameters around
:meth:`update` and :meth:`swap_in` (see the trainer).

The shadow is fp32 and follows the fp32 values of the weights: in bf16 training the caller passes
the optimizer's fp32 masters (``values``), not the bf16 copies the model computes with, whose
rounding would freeze the average whenever an update is smaller than a bf16 step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, values: Optional[list[torch.Tensor]] = None):
        """``values``: the fp32 value of each trainable parameter (default: the parameters themselves)."""
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.num_updates = 0
        source = values if values is not None else [p.detach() for p in self.params]
        self.shadow = [v.detach().clone().float() for v in source]

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, values: Optional[list[torch.Tensor]] = None) -> None:
        """One EMA step towards ``values`` (the fp32 weights after an update; default: the parameters)."""
        if not self.enabled:
            return
        self.num_updates += 1
        decay = self.current_decay()
        for shadow, value in zip(self.shadow, values if values is not None else self.params):
            shadow.mul_(decay).add_(value.detach().float(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def swap_in(self, gather: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (no-op when EMA is disabled).

        ``gather`` makes partitioned (ZeRO-3) parameters whole while they are read and written.
        """
        if not self.enabled:
            yield
            return
        with gather(), torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for shadow, param in zip(self.shadow, self.params):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with gather(), torch.no_grad():
                for saved, param in zip(backup, self.params):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.num_updates = int(state["num_updates"])
        for shadow, saved in zip(self.shadow, state["shadow"]):
            if shadow.shape != saved.shape:
                raise ValueError(f"EMA tensor shape {tuple(saved.shape)} != model {tuple(shadow.shape)}")
            shadow.copy_(saved)
