"""Tensor-parallel environment and sharded state: which TP group we are in, and full <-> shard tensors.

Megatron splits a parameter over the TP ranks along ``partition_dim`` (strided by
``partition_stride`` for fused [q|k|v] blocks) and marks it ``tensor_model_parallel``; the
vocabulary is padded to a multiple of the TP degree (:data:`VOCAB_ROWS_ATTR` records the real
rows). Everything here turns such shards into TP-independent "full" tensors and back, so weights
move between TP degrees: :func:`gather_full_tensor`, :func:`shard_full_tensor`,
:func:`full_state_dict`, :func:`load_full_state_dict`, :func:`full_grads`, :func:`grad_norm`, and
under ZeRO-3 :func:`gathered_parameters` / :func:`full_tensors`. When no Megatron TP group exists
(a plain single process) every function works as TP=1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state

from edlm_dist.errors import CheckpointError

VOCAB_ROWS_ATTR = "edlm_vocab_rows"  # set on vocab-sharded params: number of real (unpadded) rows


# ----------------------------------------------------------------------------- TP environment
def tp_group():
    """The Megatron tensor-parallel group, or None when running as a single dense process."""
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def tp_rank_size(group=None) -> tuple[int, int]:
    group = tp_group() if group is None else group
    return (0, 1) if group is None else (group.rank(), group.size())


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``tp_size`` >= ``vocab_size`` (Megatron splits the vocab evenly)."""
    return -(-vocab_size // tp_size) * tp_size


# ----------------------------------------------------------------------------- shard <-> full
def is_tp_sharded(param: torch.Tensor) -> bool:
    """True for parameters split across TP ranks (Megatron's ``tensor_model_parallel`` flag)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """Shape of the whole (unpadded) tensor this rank holds a shard of."""
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp_size
        if hasattr(param, VOCAB_ROWS_ATTR):
            shape[param.partition_dim] = getattr(param, VOCAB_ROWS_ATTR)
    return tuple(shape)


def shard_full_tensor(param: torch.Tensor, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of ``full`` laid out like ``param`` (Megatron's strided split)."""
    if not is_tp_sharded(param):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    padded = param.shape[dim] * size
    if full.shape[dim] < padded:  # vocabulary padding rows are zeros
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    chunks = torch.split(full, padded // (size * stride), dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def gather_full_tensor(param: torch.Tensor, local: torch.Tensor, group=None) -> torch.Tensor:
    """Reassemble the whole tensor from every rank's ``local`` shard (a collective when TP>1)."""
    rank, size = tp_rank_size(group)
    if not is_tp_sharded(param):
        return local.clone()
    group = tp_group() if group is None else group
    if size > 1:
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local.contiguous(), group=group)
    else:
        shards = [local]
    dim, stride = param.partition_dim, param.partition_stride
    pieces = [s.chunk(stride, dim=dim) for s in shards]  # shard r holds chunks r, r+size, ...
    full = torch.cat([pieces[r][j] for j in range(stride) for r in range(size)], dim=dim)
    rows = getattr(param, VOCAB_ROWS_ATTR, None)
    return full.narrow(dim, 0, rows) if rows is not None else full


def full_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """TP-independent state dict (collective over the TP group): padding trimmed, shards joined."""
    return {name: gather_full_tensor(p, p.detach(), group) for name, p in model.named_parameters()}


def full_grads(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Whole gradients of every parameter that has one (collective over the TP group)."""
    return {name: gather_full_tensor(p, p.grad, group) for name, p in model.named_parameters() if p.grad is not None}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy a full (TP-independent) state dict into this rank's shards; no communication."""
    rank, size = tp_rank_size()
    for name, param in model.named_parameters():
        if name not in state:
            if strict:
                raise CheckpointError(f"full state dict lacks '{name}'; it was saved from a different model kind or size")
            continue
        src = state[name]
        if tuple(src.shape) != full_shape(param, size):
            raise CheckpointError(
                f"'{name}' has shape {tuple(src.shape)} but the model expects {full_shape(param, size)}; "
                "check model size and vocabulary"
            )
        param.copy_(shard_full_tensor(param, src.to(param.dtype), rank, size))


def grad_norm(model: nn.Module, group=None) -> torch.Tensor:
    """L2 norm of the whole model's gradient: sharded grads summed over TP, replicated ones once.

    Replicated parameters (LayerNorms, adaLN, sigma-MLP, row-parallel biases, energy heads) hold
    the same gradient on every TP rank, so counting them on each rank would inflate the norm.
    """
    grads = [(p.grad.detach(), is_tp_sharded(p)) for p in model.parameters() if p.grad is not None]
    device = grads[0][0].device if grads else torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sharded, replicated]
    for grad, sharded in grads:
        sums[0 if sharded else 1] += grad.double().pow(2).sum()
    group = tp_group() if group is None else group
    if group is not None and group.size() > 1:
        sharded_sum = sums[:1].clone()
        dist.all_reduce(sharded_sum, group=group)
        sums = torch.cat([sharded_sum, sums[1:]])
    return sums.sum().sqrt()


def gathered_parameters(module: torch.nn.Module, modifier_rank=None):
    """Full parameters inside the context under ZeRO-3 (a no-op otherwise).

    With ``modifier_rank`` set, that rank's in-place changes are kept when the context exits.
    """
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitions parameters
        # Only ZeRO-3 engines (which imported DeepSpeed) get here; a top-level import would add
        # DeepSpeed's import time to every model import.
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def full_tensors(module: torch.nn.Module, local: Optional[list[torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of ``module``'s parameters, or of ``local`` (same order, e.g. an EMA shadow or the
    fp32 masters of a bf16 model), gathered in the dtype they have: an fp32 shadow is not rounded to the
    bf16 of the parameters it belongs to."""
    out = {}
    with gathered_parameters(module):
        for i, (name, param) in enumerate(module.named_parameters()):
            value = param.detach() if local is None else local[i]
            out[name] = gather_full_tensor(param, value, None).float().cpu().contiguous()
    return out
