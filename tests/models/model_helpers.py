"""Tiny model configs and randomised weights shared by the model tests."""

from __future__ import annotations

import math

import torch

from edlm_dist.config.schema import ModelConfig
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_state_dict, load_full_state_dict

V, L, B = 37, 8, 3


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"hidden_size": 32, "n_blocks": 2, "n_heads": 4, "cond_dim": 16, "dropout": 0.0, **kw})


def randomise_weights(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter, the zero-initialised adaLN and output layers included, random full values
    drawn on the CPU (the same at any TP degree and on any device), so no output or gradient is
    trivially zero."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * (0.6 / math.sqrt(v.shape[-1])) if v.dim() == 2
                 else 1.0 + 0.2 * torch.randn(v.shape, generator=g) if "norm" in k
                 else 0.2 * torch.randn(v.shape, generator=g)) for k, v in full_state_dict(model).items()}
    load_full_state_dict(model, state)


def randomised(kind: str, cfg: ModelConfig, seed: int = 0, *, vocab: int = V, length: int = L):
    """A model whose zero-initialised layers (adaLN, output) hold random values too."""
    torch.manual_seed(seed)
    model = build_model(kind, cfg, vocab, length)
    randomise_weights(model, seed + 1)
    return model


def tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
