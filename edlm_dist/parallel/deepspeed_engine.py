"""DeepSpeed engine over a Megatron tensor-parallel model.

DeepSpeed takes Megatron-core's ``parallel_state`` as its ``mpu`` through :class:`MegatronMPU`,
which adds the two names DeepSpeed 0.19 asks for and parallel_state lacks
(``get_model_parallel_world_size`` / ``get_model_parallel_rank``, STACK_NOTES). The optimizer is
a plain ``torch.optim.AdamW`` (no C++ op compilation on CPU) or apex FusedAdam when present and usable.

bf16 follows MDLM's bf16-mixed numerics: fp32 master weights, gradients accumulated over the
micro-batches in fp32 (``data_types.grad_accum_dtype``) and reduced across data-parallel ranks in
fp32 (``communication_data_type``). DeepSpeed offers fp32 accumulation with bf16 weights only under
ZeRO >= 1, so bf16 at ``train.zero_stage=0`` runs as ZeRO-1 (:func:`effective_zero_stage`): same
update, optimizer states split over the data-parallel ranks.
"""

from __future__ import annotations

import logging
import math
import os
import types
from typing import Any, Callable, Iterable, Optional

import torch

# DeepSpeed picks its accelerator once, when it is imported: say which before it does (a stale
# DS_ACCELERATOR=cpu on a GPU machine would leave the module on the CPU while batches go to the GPU).
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from edlm_dist.config.schema import RunConfig, TrainConfig  # noqa: E402
from edlm_dist.errors import ConfigError  # noqa: E402
from edlm_dist.parallel.devices import device_rank  # noqa: E402

log = logging.getLogger(__name__)


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


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig, use_apex: bool,
                    device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """AdamW; apex FusedAdam on GPU when asked for and usable (an apex built without its CUDA extensions
    imports fine and fails in the constructor: that falls back too, with a warning)."""
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps, weight_decay=train.weight_decay)
    if use_apex and device is not None and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, built from source on clusters

            return FusedAdam(params, adam_w_mode=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError("... requires cuda extensions")
            log.warning("apex FusedAdam is not usable (%s); using torch.optim.AdamW",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return torch.optim.AdamW(params, **kwargs)


def effective_zero_stage(train: TrainConfig) -> int:
    """The ZeRO stage DeepSpeed runs: bf16 needs >= 1 for fp32 gradient accumulation (module docstring)."""
    if resolve_precision(train.precision) == "bf16" and train.zero_stage == 0:
        return 1
    return train.zero_stage


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    train = cfg.train
    accumulation = train.global_batch // (train.micro_batch * dp_size)
    bf16 = resolve_precision(train.precision) == "bf16"
    config = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip if train.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": effective_zero_stage(train)},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16:  # fp32 accumulation over the micro-batches and fp32 gradient reduction, as MDLM's bf16-mixed
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def build_engine(model: torch.nn.Module, cfg: RunConfig, dp_size: int, params=None,
                 device: Optional[torch.device] = None):
    """Return ``(engine, optimizer, scheduler)`` from ``deepspeed.initialize``.

    DeepSpeed makes ``LOCAL_RANK`` the current GPU unless told otherwise; under a scheduler that
    binds one GPU per task that ordinal does not exist. ``device`` (the rank's device from
    :func:`edlm_dist.parallel.devices.run_device`) is passed as its ``device_rank`` instead.
    """
    if resolve_precision(cfg.train.precision) == "fp16":
        raise ConfigError("fp16 is not supported; use train.precision=bf16 or fp32")
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    optimizer = build_optimizer(params if params is not None else model.parameters(), cfg.train, cfg.model.use_apex,
                                device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        args=types.SimpleNamespace(device_rank=device_rank(device)),
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler


def fp32_master_params(engine) -> list[torch.Tensor]:
    """This rank's full-precision value of every trainable parameter of ``engine.module``, in order.

    In bf16 the module holds bf16 copies; the optimizer holds the fp32 masters (partitioned over the
    data-parallel ranks under ZeRO). ``safe_get_full_fp32_param`` reassembles each one, a collective
    over the data-parallel group: every rank must call this together. In fp32 the parameters are the masters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = [p for p in engine.module.parameters() if p.requires_grad]
    if not engine.bfloat16_enabled():
        return [p.detach() for p in params]
    masters = [safe_get_full_fp32_param(p) for p in params]
    if any(m is None for m in masters):
        raise RuntimeError("DeepSpeed exposes no fp32 master weights for this engine (bf16 needs ZeRO >= 1)")
    return masters
