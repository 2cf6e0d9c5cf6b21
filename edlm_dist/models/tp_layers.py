"""Megatron-core tensor-parallel layers shared by the DiT, AR and energy models (spec §2.1).

Every model gets its TP layers from here, so there is one place that builds Megatron layers:

* :class:`VocabParallelEmbedding`, :class:`ColumnParallelLinear`, :class:`RowParallelLinear` are
  Megatron's ``tensor_parallel`` layers built with ``use_cpu_initialization=True`` and fp32
  parameters: the full weight is drawn on every rank from the default generator and then split,
  so the same seed gives the same full model at any TP degree. Their ``forward`` returns one
  tensor. When no Megatron TP group exists (a plain single-process script or test, no
  ``torch.distributed``) they run as the equivalent dense layer, which is what TP=1 computes.
* Biases are drawn like ``torch.nn.Linear`` (U(±1/√fan_in), as in MDLM) instead of Megatron's
  zeros; weights use ``nn.Linear``'s kaiming-uniform(a=√5) init.
* The vocabulary is padded to a multiple of the TP degree (no padding at TP=1). Padded logit
  columns are filled with -1e6 by the models and trimmed by
  :func:`edlm_dist.parallel.sharded_state.gather_full_tensor`, so a "full" state dict never
  contains padding and moves between TP degrees.
* :func:`replicated_linear`: the plain layers every TP rank holds whole (adaLN, energy heads).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel

from edlm_dist.parallel.sharded_state import (
    VOCAB_ROWS_ATTR,
    padded_vocab_size,
    shard_full_tensor,
    tp_group,
    tp_rank_size,
)


def megatron_config(tp_size: int, *, init: bool = True) -> ModelParallelConfig:
    """CPU-side fp32 initialisation: identical full weights at any TP for the same seed."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=init,
        params_dtype=torch.float32,
    )


def torch_linear_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default weight init: kaiming-uniform with a=√5, i.e. U(±1/√fan_in)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def zeros_init(weight: torch.Tensor) -> None:
    nn.init.zeros_(weight)

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


def replicated_linear(in_features: int, out_features: int, *, bias: bool = True, zero: bool = False) -> nn.Linear:
    """A plain ``nn.Linear`` that every TP rank holds whole (adaLN, energy heads)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    if zero:
        nn.init.zeros_(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
    return layer
