"""EDLM's NCE energy network E_φ(x_t, x_0) on a DiT trunk (spec §6.2, paper §4).

    e_t, e_0 = Emb(x_t), Emb(x_0)                      shared (vocab-parallel) embedding
    h = vocab_proj([e_t ; e_0])                        Linear(2H → H, bias), replicated
    c = SiLU(sigma_map(σ)), σ zeroed unless time conditioning is on
    h = DDiT blocks (bidirectional) -> new DDitFinalLayer(H → H), zero-initialised
    E = head(mean_L h),  head = Linear(H→H) -> ReLU -> Linear(H→1, no bias)

``vocab_proj``, the final layer and the head are replicated ``nn.Linear``s: together 2.6M
parameters at H=768 acting on a replicated activation, so splitting them would only add
communication. The trunk (embedding, sigma map, blocks) is initialised from a trained DiT with
:meth:`EnergyModel.init_from_diffusion`. The final layer is zero (pooled feature ≡ 0) and the head
is initialised like ``nn.Linear`` (as the reference code does), hence E is one input-independent
constant at init: importance weights are then uniform and EDLM reduces to MDLM.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import CheckpointError
from edlm_dist.models.dit import DDitFinalLayer, DiTTrunk, check_tokens
from edlm_dist.models.tp_layers import replicated_linear
from edlm_dist.parallel.sharded_state import full_shape, shard_full_tensor, tp_rank_size

TRUNK_PREFIXES = ("vocab_embed.", "sigma_map.", "blocks.")


class EnergyModel(DiTTrunk):
    """E_φ(x_t, x_0, σ) -> (B,) energies; low energy = looks like data."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, length: int, *, init: bool = True):
        super().__init__(model_cfg, vocab_size, init=init)
        dim = model_cfg.hidden_size
        self.vocab_size, self.length = vocab_size, length
        self.vocab_proj = replicated_linear(2 * dim, dim)
        self.output_layer = DDitFinalLayer(dim, model_cfg.cond_dim, out_features=dim, use_apex=model_cfg.use_apex,
                                           init=init)
        # Default-initialised head (reference code). Zeroing its last layer as well as the final
        # layer would be a saddle: E would be 0 for every input, and the NCE gradient
        # sigma(E+) dE+ - sigma(-E-) dE- would vanish on every parameter.
        self.energy_head = nn.Sequential(replicated_linear(dim, dim), nn.ReLU(),
                                         replicated_linear(dim, 1, bias=False))

    def forward(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_tokens(x_t, "x_t")
        check_tokens(x0, "x0")
        if x_t.shape != x0.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and x0 {tuple(x0.shape)} must have the same shape (B, L)")
        h = self.vocab_proj(torch.cat([self.vocab_embed(x_t), self.vocab_embed(x0)], dim=-1))
        c = self.condition(sigma, x_t.shape[0], x_t.device)
        h = self.output_layer(self.run_blocks(h, c), c)
        pooled = h.float().mean(dim=1)  # all L positions, no masking (spec §6.2)
        return self.energy_head(pooled).squeeze(-1).float()

    @torch.no_grad()
    def init_from_diffusion(self, dit_state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy embedding, sigma map and blocks from a DiT state dict (spec §6.2: E_φ starts from MDLM).

        Accepts this rank's shards (a DiT built at the same TP degree) or full tensors (e.g. from
        :func:`edlm_dist.parallel.sharded_state.full_state_dict`), per tensor.
        """
        rank, size = tp_rank_size()
        copied = 0
        for name, param in self.named_parameters():
            if not name.startswith(TRUNK_PREFIXES):
                continue
            if name not in dit_state_dict:
                raise CheckpointError(f"diffusion state dict lacks '{name}'; pass the state dict of a DiT of the same size")
            src = dit_state_dict[name]
            if tuple(src.shape) == tuple(param.shape):
                param.copy_(src)
            elif tuple(src.shape) == full_shape(param, size):
                param.copy_(shard_full_tensor(param, src.to(param.dtype), rank, size))
            else:
                raise CheckpointError(
                    f"diffusion '{name}' has shape {tuple(src.shape)}, energy net expects {tuple(param.shape)} "
                    f"(shard) or {full_shape(param, size)} (full); model sizes or vocabularies differ"
                )
            copied += 1
        if copied == 0:
            raise CheckpointError("init_from_diffusion copied nothing; the energy model has no trunk parameters")
