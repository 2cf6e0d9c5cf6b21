"""MDLM's diffusion transformer (DiT) with Megatron tensor parallelism (spec §2.1).

Parameter names follow MDLM's ``models/dit.py`` (``vocab_embed``, ``sigma_map.mlp.0``,
``blocks.i.attn_qkv``, ``blocks.i.mlp.0``, ``output_layer.linear`` ...) so converting the released
checkpoint is a rename of ``vocab_embed.embedding`` -> ``vocab_embed.weight`` only. The fused qkv
weight keeps MDLM's ``(three heads d)`` row order; it is split with Megatron ``stride=3`` so every TP
rank owns whole heads of q, k and v.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import ConfigError
from edlm_dist.models.block_attention import block_causal_mask, needs_block_mask, two_stream_mask
from edlm_dist.models.kv_cache import KVCache, run_blocks_cached
from edlm_dist.models.layers import (
    LayerNorm,
    Rotary,
    TimestepEmbedder,
    local_head_attention,
    maybe_checkpoint,
    modulate,
)
from edlm_dist.models.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fill_padded_logits,
    gather_vocab_logits,
    replicated_linear,
    vocab_output_linear,
    vocab_shard_range,
)
from edlm_dist.parallel.sharded_state import tp_rank_size
from edlm_dist.objectives.subs import NEG_INF


def check_tp_shape(model_cfg: ModelConfig, tp_size: int) -> None:
    if model_cfg.n_heads % tp_size or model_cfg.hidden_size % model_cfg.n_heads:
        raise ConfigError(
            f"n_heads={model_cfg.n_heads} / hidden_size={model_cfg.hidden_size} cannot be split over tp={tp_size}; "
            "tp must divide n_heads and n_heads must divide hidden_size"
        )


class DDiTBlock(nn.Module):
    """Pre-LN transformer block; adaLN-Zero when ``cond_dim`` is given (DiT), plain residual when None (AR).

    x = x + gate_msa · Dropout(Attn(modulate(LN1(x))));  x = x + gate_mlp · Dropout(MLP(modulate(LN2(x)))).
    """

    def __init__(self, dim: int, n_heads: int, cond_dim: Optional[int], *, mlp_ratio: int = 4, dropout: float = 0.0,
                 causal: bool = False, use_apex: bool = False, init: bool = True):
        super().__init__()
        tp_size = tp_rank_size()[1]
        self.local_heads = n_heads // tp_size
        self.head_dim = dim // n_heads
        self.causal, self.dropout = causal, dropout
        self.norm1 = LayerNorm(dim, use_apex=use_apex)
        self.attn_qkv = ColumnParallelLinear(dim, 3 * dim, bias=False, stride=3, init=init)
        self.attn_out = RowParallelLinear(dim, dim, bias=False, init=init)
        self.norm2 = LayerNorm(dim, use_apex=use_apex)
        self.mlp = nn.Sequential(
            ColumnParallelLinear(dim, mlp_ratio * dim, bias=True, init=init),
            nn.GELU(approximate="tanh"),
            RowParallelLinear(mlp_ratio * dim, dim, bias=True, init=init),
        )
        # adaLN stays replicated: it maps the (B, C) condition, tiny next to the token matmuls.
        self.adaLN_modulation = replicated_linear(cond_dim, 6 * dim, zero=True) if cond_dim is not None else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: Optional[torch.Tensor],
                attn_mask: Optional[torch.Tensor] = None, kv=None) -> torch.Tensor:
        """``attn_mask``: (L, L) bool for the block-causal denoiser (models/block_attention.py); ``kv``: a
        KV-cache layer handle (models/kv_cache.py) when ``x`` is a chunk after a cached prefix."""
        if self.adaLN_modulation is not None:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.adaLN_modulation(c)[:, None].chunk(6, dim=2))
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        else:
            gate_msa = gate_mlp = 1.0
            h = self.norm1(x)
        batch, length = x.shape[:2]
        qkv = self.attn_qkv(h).view(batch, length, 3, self.local_heads, self.head_dim)
        attn = self.attn_out(local_head_attention(qkv, cos, sin, causal=self.causal, attn_mask=attn_mask, kv=kv))
        x = x + gate_msa * F.dropout(attn, p=self.dropout, training=self.training)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp) if self.adaLN_modulation is not None else self.norm2(x)
        return x + gate_mlp * F.dropout(self.mlp(h), p=self.dropout, training=self.training)


class DDitFinalLayer(nn.Module):
    """adaLN (C→2H, zero) -> weight-only LN -> modulate -> Linear(H→out) with zero weight and bias.

    ``vocab_size`` given: the linear is column-parallel over the (padded) vocabulary. Otherwise it is
    a replicated ``out_features``-wide linear (the energy network's new H→H final layer, spec §6.2).
    """

    def __init__(self, dim: int, cond_dim: int, *, vocab_size: Optional[int] = None, out_features: int = 0,
                 use_apex: bool = False, init: bool = True):
        super().__init__()
        self.norm_final = LayerNorm(dim, use_apex=use_apex)
        if vocab_size is not None:
            self.linear = vocab_output_linear(dim, vocab_size, init=init)
        else:
            self.linear = replicated_linear(dim, out_features, zero=True)
        self.adaLN_modulation = replicated_linear(cond_dim, 2 * dim, zero=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTTrunk(nn.Module):
    """Embedding, sigma map, rotary and DDiT blocks: the base of :class:`DiT` and the energy network.

    Top-level attribute names (``vocab_embed``, ``sigma_map``, ``blocks``) match MDLM's.
    """

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, *, init: bool = True):
        super().__init__()
        check_tp_shape(model_cfg, tp_rank_size()[1])
        dim = model_cfg.hidden_size
        self.time_conditioning = model_cfg.time_conditioning
        self.activation_checkpointing = model_cfg.activation_checkpointing
        self.vocab_embed = VocabParallelEmbedding(vocab_size, dim, init=init)
        self.sigma_map = TimestepEmbedder(model_cfg.cond_dim)
        self.rotary = Rotary(dim // model_cfg.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(dim, model_cfg.n_heads, model_cfg.cond_dim, mlp_ratio=model_cfg.mlp_ratio,
                      dropout=model_cfg.dropout, causal=False, use_apex=model_cfg.use_apex, init=init)
            for _ in range(model_cfg.n_blocks)
        )

    def condition(self, sigma: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """c = SiLU(sigma_map(sigma)); sigma is zeroed when time conditioning is off (spec §2.1)."""
        if not self.time_conditioning:
            sigma = torch.zeros(batch, device=device)
        elif sigma is None:
            raise ConfigError("time_conditioning is on but no sigma was passed; pass sigma (B,) or turn it off")
        elif sigma.shape != (batch,):
            raise ConfigError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        return F.silu(self.sigma_map(sigma))

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The DDiT blocks; ``positions`` (N,) are the rotary positions of x's N tokens (default 0..N-1)."""
        if positions is None:
            cos, sin = self.rotary.cos_sin(x.shape[1], x.device)
        else:
            cos, sin = self.rotary.cos_sin(int(positions.max()) + 1, x.device)
            cos, sin = cos[positions], sin[positions]
        for block in self.blocks:
            x = maybe_checkpoint(block, x, cos, sin, c, attn_mask, enabled=self.activation_checkpointing)
        return x


def check_tokens(tokens: torch.Tensor, name: str = "tokens") -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ConfigError(f"{name} must be an integer tensor of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")


class DiT(DiTTrunk):
    """MDLM denoiser: tokens (B, L) + sigma (B,) -> logits (B, L, V/tp) over this rank's vocab shard.

    ``model.block_size`` b < L makes it the block-causal denoiser of block diffusion (BD3-LM,
    Arriola et al. 2025): attention is bidirectional inside a block of b positions and reaches every
    earlier block, never a later one (masks in :mod:`edlm_dist.models.block_attention`, dense
    boolean masks through SDPA). b = L (the default, ``block_size: 0``) is MDLM exactly: no mask,
    the same kernels and numbers as before. The layers are the same Megatron TP layers either way.
    """

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, length: int, *, init: bool = True):
        super().__init__(model_cfg, vocab_size, init=init)
        self.vocab_size, self.length = vocab_size, length
        self.block_size = resolve_block_size(model_cfg, length)
        self.output_layer = DDitFinalLayer(model_cfg.hidden_size, model_cfg.cond_dim, vocab_size=vocab_size,
                                           use_apex=model_cfg.use_apex, init=init)

    @property
    def is_block_causal(self) -> bool:
        return needs_block_mask(self.length, self.block_size)

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of this rank's logits columns; columns >= vocab_size are TP padding (-1e6)."""
        return vocab_shard_range(self.vocab_size)

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        """An empty prefix cache for block-by-block denoising of up to ``capacity`` (default L) positions."""
        return KVCache(capacity or self.length)

    def forward(self, tokens: torch.Tensor, sigma: Optional[torch.Tensor] = None, *,
                x0: Optional[torch.Tensor] = None, gather_logits: bool = False, cache: Optional[KVCache] = None,
                append: bool | int = True) -> torch.Tensor:
        """Logits of every position of ``tokens``.

        Block-causal model (b < L): without ``x0`` the row is one stream under the block-causal mask,
        which gives block j its training-time logits whenever blocks < j hold clean tokens (what a
        block-by-block sampler has). With ``x0`` (training) ``tokens`` is x_t and the forward runs on
        [x_t ; x0] under the two-stream mask, so every block of x_t is denoised against the clean
        preceding blocks in one pass (BD3-LM's vectorised objective); logits are returned for x_t
        only. For b = L, ``x0`` is ignored.

        With ``cache`` (sampling; docs/block_diffusion.md) ``tokens`` (N, c) sit at positions
        ``cache.length ..`` and see the cached clean prefix plus themselves, block-causally; the prefix
        must end on a block boundary. ``append`` keeps the chunk in the cache (True), leaves the cache
        unchanged (False: a denoising step of the current block), or keeps its first n positions (an
        int: a committed block fused with the next block's first step). Logits equal those of the
        one-stream forward over the whole row to fp32 tolerance.
        """
        check_tokens(tokens)
        batch, length = tokens.shape
        c = self.condition(sigma, batch, tokens.device)
        if cache is not None:
            if cache.length % self.block_size:
                raise ConfigError(f"the cached prefix holds {cache.length} positions, not a whole number of "
                                  f"blocks of {self.block_size}; commit whole blocks only")
            within = self.block_size if self.is_block_causal else "full"
            x = run_blocks_cached(self.blocks, self.vocab_embed(tokens), self.rotary, cache, cond=c, within=within,
                                  append=append)
        elif not needs_block_mask(length, self.block_size):
            x = self.run_blocks(self.vocab_embed(tokens), c)
        elif x0 is None:
            x = self.run_blocks(self.vocab_embed(tokens), c,
                                attn_mask=block_causal_mask(length, self.block_size, tokens.device))
        else:
            check_tokens(x0, "x0")
            if x0.shape != tokens.shape:
                raise ValueError(f"x0 {tuple(x0.shape)} must have the shape of x_t {tuple(tokens.shape)}")
            positions = torch.arange(length, device=tokens.device).repeat(2)  # x0 copy sits at x_t's positions
            x = self.run_blocks(self.vocab_embed(torch.cat([tokens, x0], dim=1)), c,
                                attn_mask=two_stream_mask(length, self.block_size, tokens.device),
                                positions=positions)[:, :length]
        logits = fill_padded_logits(self.output_layer(x, c), self.vocab_size, NEG_INF)
        return gather_vocab_logits(logits, self.vocab_size) if gather_logits else logits


def resolve_block_size(model_cfg: ModelConfig, length: int) -> int:
    """``model.block_size`` with 0 meaning one block of the whole row (MDLM); checked against L."""
    block = model_cfg.block_size or length
    if not 1 <= block <= length:
        raise ConfigError(f"model.block_size={model_cfg.block_size} must be in [1, seq_len={length}] "
                          "(0 = seq_len: MDLM)")
    if block < length and length % block:
        raise ConfigError(f"model.block_size={block} must divide data.seq_len={length}")
    if block < length and model_cfg.time_conditioning:
        raise ConfigError("model.block_size < seq_len needs model.time_conditioning=false: every block has its own "
                          "noise level, so one sigma per row does not exist (BD3-LM trains without it too)")
    return block
