"""DeepSpeed engine over a Megatron tensor-parallel model.

DeepSpeed takes Megatron-core's ``parallel_state`` as its ``mpu`` through :class:`MegatronMPU`,
which adds the two names DeepSpeed 0.19 asks for and parallel_state lacks
(``get_model_parallel_world_size`` / ``get_model_parallel_rank``, STACK_NOTES). The optimizer is
a plain ``torch.optim.AdamW`` (no C++ op compilation on CPU) or apex FusedAdam when present.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import deepspeed
import torch
from megatron.core import parallel_state

from edlm_dist.config.schema import RunConfig, TrainConfig
from edlm_dist.errors import ConfigError


class MegatronMPU:
    """Megatron's parallel_state with the model-parallel aliases DeepSpeed expects."""

    def __getattr__(self, name: str) -> Any:
        return getattr(parallel_state, name)

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()


def resolve_precision(requested: str) -> str:
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return requested


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then constant (MDLM-OWT) or cosine to ``min_lr_ratio`` (paper C.1, text8)."""
    warmup, total, floor = max(train.warmup_steps, 0), train.steps, train.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig, use_apex: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps, weight_decay=train.weight_decay)
    if use_apex and torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, built from source on clusters

            return FusedAdam(params, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(params, **kwargs)


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    train = cfg.train
    accumulation = train.global_batch // (train.micro_batch * dp_size)
    precision = resolve_precision(train.precision)
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip if train.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig, dp_size: int, params=None):
    """Return ``(engine, optimizer, scheduler)`` from ``deepspeed.initialize``."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if resolve_precision(cfg.train.precision) == "fp16":
        raise ConfigError("fp16 is not supported; use train.precision=bf16 or fp32")
    optimizer = build_optimizer(params if params is not None else model.parameters(), cfg.train, cfg.model.use_apex)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler
