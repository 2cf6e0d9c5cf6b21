"""Single-device building blocks of the backbones: LayerNorm, adaLN modulation, the sigma embedder,
rotary position embedding, attention over this rank's heads and activation checkpointing (spec §2.1).

None of these is split across tensor-parallel ranks: every TP rank holds them whole (the TP layers
are in :mod:`edlm_dist.models.tp_layers`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------- replicated pieces
def _apex_layer_norm():
    """apex's fused LayerNorm when apex and its compiled CUDA extension are both importable, else None.

    apex imports ``fused_layer_norm_cuda`` lazily, at the first forward: an apex installed without its
    CUDA extensions (a plain ``pip install`` of the source tree) imports fine and then fails mid-training.
    Importing the extension here moves that failure to construction, where it falls back to torch.
    """
    import importlib

    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm  # NVIDIA apex (cluster builds)

        importlib.import_module("fused_layer_norm_cuda")
        return fused_layer_norm
    except Exception:  # noqa: BLE001 - ImportError, or an extension built for another torch/CUDA (OSError)
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
            # Computed on the CPU whatever the device (the same angles at any device), then moved.
            cpu = torch.device("cpu")
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=cpu)
                                            / self.head_dim))
            freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=cpu), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)  # (L, d): angle i and i + d/2 pair up
            self._cache[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, heads, d) by position; computed in fp32 (like flash-attn's kernel), cast back."""
    xf = x.float()
    out = xf * cos[None, :, None, :] + rotate_half(xf) * sin[None, :, None, :]
    return out.to(x.dtype)


def local_head_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, causal: bool,
                         attn_mask: torch.Tensor | None = None, kv=None) -> torch.Tensor:
    """SDPA over this rank's heads. ``qkv`` (B, L, 3, heads, d) -> (B, L, heads·d).

    Rotary on q and k only; scale 1/√d; no dropout; flash kernel on GPU under bf16 autocast.
    ``kv`` (a :class:`edlm_dist.models.kv_cache.LayerCache`): the L tokens are a chunk that attends to
    the cached prefix plus itself (``cos``/``sin`` are then the chunk's positions); ``causal`` is unused
    because the cache's in-chunk mask decides.
    ``attn_mask`` (L, L) bool, True = may attend (the block-causal denoiser, models/block_attention.py):
    SDPA then takes its masked kernel (no flash); ``causal`` is ignored with a mask.
    """
    batch, length = qkv.shape[:2]
    q, k, v = qkv.unbind(dim=2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv is not None:
        out = kv.attend(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    return out.transpose(1, 2).reshape(batch, length, -1)



def maybe_checkpoint(fn: Callable, *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Recompute ``fn`` in backward when enabled (non-reentrant; restores the RNG for dropout)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
