"""Tensor-parallel building blocks shared by the DiT, AR and energy models (spec §2.1).

Every model gets its TP layers from here, so there is one place that knows about Megatron-core:

* :class:`VocabParallelEmbedding`, :class:`ColumnParallelLinear`, :class:`RowParallelLinear` are
  Megatron's ``tensor_parallel`` layers built with ``use_cpu_initialization=True`` and fp32
  parameters: the full weight is drawn on every rank from the default generator and then split,
  so the same seed gives the same full model at any TP degree. Their ``forward`` returns one
  tensor. When no Megatron TP group exists (a plain single-process script or test, no
  ``torch.distributed``) they run as the equivalent dense layer, which is what TP=1 computes.
* Biases are drawn like ``torch.nn.Linear`` (U(±1/√fan_in), as in MDLM) instead of Megatron's
  zeros; weights use ``nn.Linear``'s kaiming-uniform(a=√5) init.
* The vocabulary is padded to a multiple of the TP degree (no padding at TP=1). Padded logit
  columns are filled with -1e6 by the models and trimmed by :func:`gather_full_tensor`, so a
  "full" state dict never contains padding and moves between TP degrees.
* Helpers for sharded state: :func:`is_tp_sharded`, :func:`grad_norm`, :func:`full_state_dict`,
  :func:`load_full_state_dict`, :func:`full_grads`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

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


def megatron_config(tp_size: int, *, init: bool = True) -> ModelParallelConfig:
    """CPU-side fp32 initialisation: identical full weights at any TP for the same seed."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=init,
        params_dtype=torch.float32,
    )


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``tp_size`` >= ``vocab_size`` (Megatron splits the vocab evenly)."""
    return -(-vocab_size // tp_size) * tp_size


def torch_linear_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default weight init: kaiming-uniform with a=√5, i.e. U(±1/√fan_in)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def zeros_init(weight: torch.Tensor) -> None:
    nn.init.zeros_(weight)


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


# ----------------------------------------------------------------------------- TP layers
class _PlainStateDict:
    """Drop Megatron's empty ``_extra_state`` entries: state dicts hold tensors only (safetensors-friendly)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()  # Megatron's hook inserts `_extra_state: None` on load


def _init_bias_like_torch(bias: torch.Tensor, fan_in: int, full_size: int, group) -> None:
    """U(±1/√fan_in) drawn for the whole bias, then this rank's shard kept (TP-independent)."""
    bound = 1.0 / math.sqrt(fan_in)
    full = torch.empty(full_size).uniform_(-bound, bound)
    rank, size = tp_rank_size(group)
    with torch.no_grad():
        bias.copy_(shard_full_tensor(bias, full, rank, size))


class ColumnParallelLinear(_PlainStateDict, tensor_parallel.ColumnParallelLinear):
    """Y = X Wᵀ + b with W split by output rows; ``stride`` keeps fused [q|k|v] blocks per rank."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, init_method: Callable = torch_linear_init,
                 zero_bias: bool = False, stride: int = 1, init: bool = True):
        group = tp_group()
        super().__init__(in_features, out_features, config=megatron_config(tp_rank_size(group)[1], init=init),
                         init_method=init_method, bias=bias, gather_output=False, stride=stride, tp_group=group)
        self._drop_extra_state_hook()
        if bias and init and not zero_bias:
            _init_bias_like_torch(self.bias, in_features, out_features, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:  # single dense process
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class RowParallelLinear(_PlainStateDict, tensor_parallel.RowParallelLinear):
    """Y = X Wᵀ + b with W split by input columns; the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, init: bool = True):
        group = tp_group()
        super().__init__(in_features, out_features, config=megatron_config(tp_rank_size(group)[1], init=init),
                         init_method=torch_linear_init, bias=bias, input_is_parallel=True, skip_bias_add=False,
                         tp_group=group)
        self._drop_extra_state_hook()
        if bias and init:
            _init_bias_like_torch(self.bias, in_features, out_features, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class VocabParallelEmbedding(_PlainStateDict, tensor_parallel.VocabParallelEmbedding):
    """Token embedding split by vocabulary rows; kaiming-uniform(a=√5) ≈ U(±1/√H) (spec §2.1)."""

    def __init__(self, vocab_size: int, dim: int, *, init: bool = True):
        group = tp_group()
        size = tp_rank_size(group)[1]

        def init_real_rows(weight: torch.Tensor) -> None:
            # Draw exactly vocab_size rows so the padding never shifts the RNG stream across TP degrees.
            weight.zero_()
            torch_linear_init(weight[:vocab_size])

        super().__init__(padded_vocab_size(vocab_size, size), dim, init_method=init_real_rows,
                         config=megatron_config(size, init=init), tp_group=group)
        self._drop_extra_state_hook()
        self.vocab_size = vocab_size
        setattr(self.weight, VOCAB_ROWS_ATTR, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(tokens, self.weight)
        return super().forward(tokens)


def vocab_output_linear(dim: int, vocab_size: int, *, init: bool = True) -> ColumnParallelLinear:
    """Column-parallel Linear(H → padded V) with zero weight and bias (logits exactly 0 at init)."""
    padded = padded_vocab_size(vocab_size, tp_rank_size()[1])
    layer = ColumnParallelLinear(dim, padded, bias=True, init_method=zeros_init, zero_bias=True, init=init)
    setattr(layer.weight, VOCAB_ROWS_ATTR, vocab_size)
    setattr(layer.bias, VOCAB_ROWS_ATTR, vocab_size)
    return layer


def vocab_shard_range(vocab_size: int, group=None) -> tuple[int, int]:
    """[start, end) of this rank's logits columns in the padded vocabulary."""
    rank, size = tp_rank_size(group)
    per_rank = padded_vocab_size(vocab_size, size) // size
    return rank * per_rank, (rank + 1) * per_rank


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """All-gather vocab-sharded logits (autograd-aware) and drop the padding columns."""
    group = tp_group() if group is None else group
    if group is not None and group.size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=group)
    return logits[..., :vocab_size]


def fill_padded_logits(logits: torch.Tensor, vocab_size: int, fill: float, group=None) -> torch.Tensor:
    """Set this shard's columns >= vocab_size (TP padding) to ``fill`` so no probability lands there."""
    start, end = vocab_shard_range(vocab_size, group)
    if end <= vocab_size:
        return logits
    pad = torch.arange(start, end, device=logits.device) >= vocab_size
    return logits.masked_fill(pad, fill)


# ----------------------------------------------------------------------------- replicated pieces
def _apex_layer_norm():
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm  # NVIDIA apex (cluster builds)

        return fused_layer_norm
    except ImportError:
        return None


class LayerNorm(nn.Module):
    """Weight-only LayerNorm (no bias), eps 1e-5, computed in fp32 with autocast off (spec §2.1)."""

    def __init__(self, dim: int, eps: float = 1e-5, use_apex: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps = dim, eps
        self._apex = _apex_layer_norm() if use_apex else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self._apex is not None and x.is_cuda:
                y = self._apex(x.float(), (self.dim,), self.eps)
            else:
                y = F.layer_norm(x.float(), (self.dim,), eps=self.eps)
            return y * self.weight.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift (DiT; spec §2.1)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """sigma -> 256 sinusoidal features [cos, sin] -> Linear(256→C) -> SiLU -> Linear(C→C), fp32."""

    def __init__(self, cond_dim: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def sinusoid(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        # Kept in fp32 even when the parameters are stored in bf16 (spec §2.1: sigma-MLP in fp32).
        with torch.autocast(device_type=sigma.device.type, enabled=False):
            h = self.sinusoid(sigma, self.frequency_size)
            first, last = self.mlp[0], self.mlp[2]
            h = F.silu(F.linear(h, first.weight.float(), first.bias.float()))
            return F.linear(h, last.weight.float(), last.bias.float())


# ----------------------------------------------------------------------------- rotary + attention
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention, base 10000) for q and k; cached per length."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
            freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)  # (L, d): angle i and i + d/2 pair up
            self._cache[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, heads, d) by position; computed in fp32 (like flash-attn's kernel), cast back."""
    xf = x.float()
    out = xf * cos[None, :, None, :] + rotate_half(xf) * sin[None, :, None, :]
    return out.to(x.dtype)


def local_head_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, causal: bool,
                         kv=None) -> torch.Tensor:
    """SDPA over this rank's heads. ``qkv`` (B, L, 3, heads, d) -> (B, L, heads·d).

    Rotary on q and k only; scale 1/√d; no dropout; flash kernel on GPU under bf16 autocast.
    ``kv`` (a :class:`edlm_dist.models.kv_cache.LayerCache`): the L tokens are a chunk that attends to
    the cached prefix plus itself (``cos``/``sin`` are then the chunk's positions); ``causal`` is unused
    because the cache's in-chunk mask decides.
    """
    batch, length = qkv.shape[:2]
    q, k, v = qkv.unbind(dim=2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv is not None:
        out = kv.attend(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, length, -1)


def replicated_linear(in_features: int, out_features: int, *, bias: bool = True, zero: bool = False) -> nn.Linear:
    """A plain ``nn.Linear`` that every TP rank holds whole (adaLN, energy heads)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    if zero:
        nn.init.zeros_(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
    return layer


def maybe_checkpoint(fn: Callable, *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Recompute ``fn`` in backward when enabled (non-reentrant; restores the RNG for dropout)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)

