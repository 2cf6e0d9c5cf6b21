"""Backbones with Megatron tensor parallelism: MDLM DiT, AR transformer, EDLM energy net (spec §2, §6.2)."""

from __future__ import annotations

from edlm_dist.models.ar import ARTransformer
from edlm_dist.models.build import build_model, count_parameters, estimate_memory, flops_per_token
from edlm_dist.models.dit import DiT
from edlm_dist.models.energy import EnergyModel
from edlm_dist.parallel.sharded_state import full_state_dict, grad_norm, is_tp_sharded, load_full_state_dict

__all__ = [
    "ARTransformer", "DiT", "EnergyModel", "build_model", "count_parameters", "estimate_memory",
    "flops_per_token", "full_state_dict", "grad_norm", "is_tp_sharded", "load_full_state_dict",
]
