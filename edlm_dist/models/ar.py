"""Autoregressive baseline / AR energy backbone with Megatron tensor parallelism (spec §2.2).

Same skeleton as the DiT with causal attention, no sigma map and no adaLN (residual scale 1),
final ``LN -> Linear(H→V, bias)`` with zero init. The forward returns raw vocab-sharded logits;
mask-column suppression is left to the objectives (they get :meth:`ARTransformer.vocab_range`),
and :meth:`ARTransformer.log_probs` gives the suppressed, normalised full distribution for
inference (MDLM's AR sets the mask logit to -1000 and log-softmaxes; we use -1e6 like SUBS).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from edlm_dist.config.schema import ModelConfig
from edlm_dist.models.dit import DDiTBlock, check_tokens, check_tp_shape
from edlm_dist.models.kv_cache import KVCache, run_blocks_cached
from edlm_dist.models.layers import LayerNorm, Rotary, maybe_checkpoint
from edlm_dist.models.tp_layers import (
    VocabParallelEmbedding,
    fill_padded_logits,
    gather_vocab_logits,
    vocab_output_linear,
    vocab_shard_range,
)
from edlm_dist.objectives.subs import NEG_INF, suppress_mask_logit
from edlm_dist.parallel.sharded_state import tp_rank_size


class ARFinalLayer(nn.Module):
    """LN_final -> column-parallel Linear(H→V) (zero weight and bias), no modulation."""

    def __init__(self, dim: int, vocab_size: int, *, use_apex: bool = False, init: bool = True):
        super().__init__()
        self.norm_final = LayerNorm(dim, use_apex=use_apex)
        self.linear = vocab_output_linear(dim, vocab_size, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class ARTransformer(nn.Module):
    """Causal transformer: tokens (B, L) -> next-token logits (B, L, V/tp) (position i predicts i+1)."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, length: int, *, init: bool = True):
        super().__init__()
        check_tp_shape(model_cfg, tp_rank_size()[1])
        dim = model_cfg.hidden_size
        self.vocab_size, self.length = vocab_size, length
        self.activation_checkpointing = model_cfg.activation_checkpointing
        self.vocab_embed = VocabParallelEmbedding(vocab_size, dim, init=init)
        self.rotary = Rotary(dim // model_cfg.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(dim, model_cfg.n_heads, None, mlp_ratio=model_cfg.mlp_ratio, dropout=model_cfg.dropout,
                      causal=True, use_apex=model_cfg.use_apex, init=init)
            for _ in range(model_cfg.n_blocks)
        )
        self.output_layer = ARFinalLayer(dim, vocab_size, use_apex=model_cfg.use_apex, init=init)

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of this rank's logits columns; columns >= vocab_size are TP padding (-1e6)."""
        return vocab_shard_range(self.vocab_size)

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        """An empty KV cache for incremental decoding of up to ``capacity`` (default: the model's L) positions."""
        return KVCache(capacity or self.length)

    def forward(self, tokens: torch.Tensor, *, gather_logits: bool = False, cache: Optional[KVCache] = None,
                append: bool = True, last_only: bool = False) -> torch.Tensor:
        """Logits of every position of ``tokens`` (of the last one only with ``last_only``: decoding).

        With a cache, ``tokens`` (N, c) sit at positions ``cache.length ..`` and attend causally to the
        prefix and to each other (models/kv_cache.py); ``append=False`` leaves the cache unchanged.
        """
        check_tokens(tokens)
        x = self.vocab_embed(tokens)
        if cache is not None:
            x = run_blocks_cached(self.blocks, x, self.rotary, cache, within="causal", append=append)
        else:
            cos, sin = self.rotary.cos_sin(tokens.shape[1], tokens.device)
            for block in self.blocks:
                x = maybe_checkpoint(block, x, cos, sin, None, enabled=self.activation_checkpointing)
        logits = fill_padded_logits(self.output_layer(x[:, -1:] if last_only else x), self.vocab_size, NEG_INF)
        return gather_vocab_logits(logits, self.vocab_size) if gather_logits else logits

    def log_probs(self, tokens: torch.Tensor, mask_id: int, *, cache: Optional[KVCache] = None,
                  append: bool = True, last_only: bool = False) -> torch.Tensor:
        """Full (B, L, V) float32 log p(x_{i+1} = · | x_{≤i}) with the mask token never predicted."""
        logits = self.forward(tokens, gather_logits=True, cache=cache, append=append, last_only=last_only).float()
        return torch.log_softmax(suppress_mask_logit(logits, mask_id), dim=-1)
