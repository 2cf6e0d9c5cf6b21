"""The cross-entropy hook the (single-device) objectives take, made tensor-parallel.

At TP>1 the logits are sharded over the vocabulary, so the loss uses Megatron's
``vocab_parallel_cross_entropy`` (no label smoothing: Megatron 0.16's smoothing is wrong at
TP>1, STACK_NOTES). At TP=1 the objectives' dense default is used.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def vocab_parallel_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_cross_entropy(logits.float(), targets)


def cross_entropy_for(tp_size: int) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    return vocab_parallel_ce if tp_size > 1 else None
