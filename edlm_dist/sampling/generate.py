"""One entry point for every sampler: MDLM, EDLM (any energy) and AR, with fixed tokens and any row length.

:class:`Generator` holds what the samplers need (denoiser, energy, proposal exchange, AR model) and
:meth:`Generator.generate` turns start states into samples: rows of the model's length go straight to
the sampler (whole-row or block-wise, ``sampling/blocks.py``), longer rows through the semi-autoregressive windows of :mod:`edlm_dist.sampling.long_text`.
Fixed tokens are simply the non-mask entries of the start state (:mod:`edlm_dist.sampling.conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.sampling.ar_sampler import sample_ar_batch
from edlm_dist.sampling.blocks import sample_rows
from edlm_dist.sampling.engine import Denoiser, EnergyFn, Proposals, SampleBatch
from edlm_dist.sampling.long_text import generate_long
from edlm_dist.sampling.settings import SamplerSettings


@dataclass
class Generator:
    """The models and settings of one sampling run; ``context`` is the models' row length L."""

    settings: SamplerSettings
    context: int
    mask_id: int
    bos_id: int
    eos_id: int
    device: torch.device
    denoiser: Optional[Denoiser] = None  # mdlm / edlm
    energy_fn: Optional[EnergyFn] = None  # edlm
    proposals: Optional[Proposals] = None  # edlm: LocalProposals or DistributedProposals
    ar_model: Optional[torch.nn.Module] = None  # ar

    def __post_init__(self) -> None:
        needs = {"ar": ("ar_model", "an AR model"), "mdlm": ("denoiser", "a denoiser"),
                 "edlm": ("denoiser", "a denoiser")}[self.settings.sampler]
        if getattr(self, needs[0]) is None:
            raise SamplingError(f"sampler '{self.settings.sampler}' needs {needs[1]}")

    def window(self, x_init: torch.Tensor, sample_ids: list[int]) -> SampleBatch:
        """Sample rows of at most ``context`` tokens from the start state ``x_init`` (mask = free)."""
        if self.settings.sampler == "ar":
            return sample_ar_batch(self.ar_model, self.settings, sample_ids, length=x_init.shape[1],
                                   mask_id=self.mask_id, bos_id=self.bos_id, device=self.device, x_init=x_init)
        return sample_rows(self.denoiser, self.settings, sample_ids, length=x_init.shape[1], mask_id=self.mask_id,
                           device=self.device, energy_fn=self.energy_fn, proposals=self.proposals, x_init=x_init)

    def generate(self, sample_ids: Sequence[int], x_init: torch.Tensor, *, stride: int = 0) -> SampleBatch:
        """Samples for ``sample_ids`` from start states (B, N); N > context uses windows of ``stride`` new
        tokens (0: context // 2)."""
        ids = [int(i) for i in sample_ids]
        if x_init.shape[0] != len(ids):
            raise SamplingError(f"{len(ids)} sample ids but {x_init.shape[0]} start states")
        if x_init.shape[1] <= self.context:
            return self.window(x_init, ids)
        return generate_long(self.window, x_init, ids, context=self.context, stride=stride or self.context // 2,
                             bos_id=self.bos_id, eos_id=self.eos_id, causal=self.settings.sampler == "ar")
