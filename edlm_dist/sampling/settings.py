"""The sampler settings: everything that decides the samples besides the models (mirrors ``SampleConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edlm_dist.config.schema import window_interval
from edlm_dist.errors import SamplingError
from edlm_dist.sampling.mdlm import UPDATES

PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLERS = ("mdlm", "edlm", "ar")
BLOCK_PROPOSALS = ("denoiser", "ar_first")  # docs/sampling.md, "Block-wise sampling"


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of the MDLM/EDLM loop (``sampling/engine.py``) and the AR sampler (``sampling/ar_sampler.py``).

    ``temperature`` is the sampler's temperature: EDLM's importance weights exp(-E / tau), the AR
    sampler's logits / tau. ``top_k`` / ``top_p`` truncate the AR sampler's next-token distribution
    (0 / 1.0 = off, the paper's protocol); ``kv_cache`` off recomputes the whole prefix per token
    (the reference's O(L^2) AR sampler, spec §5.7). ``window`` is a number w (IS for t in [1 - w, 1]) or an
    interval (t_lo, t_hi); ``block_size`` > 0 samples block by block (``sampling/blocks.py``).
    """

    sampler: str = "mdlm"
    update: str = "ddpm_cache"
    steps: int = 32
    k: int = 2
    window: float | tuple[float, float] = 0.2  # [1 - w, 1] for a number w, else the interval [t_lo, t_hi]
    temperature: float = 1.0
    redraw_every_step: bool = True
    noise_removal: bool = True
    precision: str = "float64"
    seed: int = 1
    eps: float = 1e-5
    skip_idle_is: bool = True  # EDLM, redraw mode: no IS/denoiser for a row whose step reveals nothing
    top_k: int = 0
    top_p: float = 1.0
    kv_cache: bool = True
    block_size: int = 0  # block-wise sampling (sampling/blocks.py): b positions at a time; 0 = the whole row
    block_proposal: str = "denoiser"  # block-wise EDLM: "ar_first" proposes each block's first token from p_AR
    block_lookahead: bool = False  # block-causal EDLM: next block's first call beside the scoring (sampling/lookahead.py)

    def __post_init__(self) -> None:
        checks = [
            (self.sampler in SAMPLERS, f"sampler '{self.sampler}' is unknown; use one of {list(SAMPLERS)}"),
            (self.update in UPDATES, f"update '{self.update}' is unknown; use one of {list(UPDATES)}"),
            (self.steps >= 1, f"steps must be >= 1 (got {self.steps})"),
            (self.k >= 1, f"k must be >= 1 (got {self.k}): it is the number of importance-sampling proposals"),
            (self.temperature > 0, f"temperature must be > 0 (got {self.temperature})"),
            (self.precision in PRECISIONS, f"precision '{self.precision}' is unknown; use one of {list(PRECISIONS)}"),
            (0.0 < self.eps < 1.0, f"eps must be in (0, 1) (got {self.eps})"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k}); 0 keeps every token"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (got {self.top_p}); 1 keeps every token"),
            (self.sampler == "ar" or (self.top_k == 0 and self.top_p == 1.0),
             "top_k / top_p apply to sampler=ar only; the diffusion samplers draw from mu_theta untruncated"),
            (self.block_size >= 0, f"block_size must be >= 0 (got {self.block_size}); 0 = one block of the whole row"),
            (self.block_proposal in BLOCK_PROPOSALS,
             f"block_proposal '{self.block_proposal}' is unknown; use one of {list(BLOCK_PROPOSALS)}"),
            (not self.block_lookahead or (self.sampler == "edlm" and self.block_size > 0),
             "block_lookahead runs the next block's denoiser call beside EDLM's scoring call; it needs "
             "sampler=edlm and block_size > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(f"sampling setting: {message}")
        try:
            bounds = window_interval(self.window, "window")
        except ValueError as exc:
            raise SamplingError(f"sampling setting: {exc}") from None
        if not isinstance(self.window, (int, float)):
            object.__setattr__(self, "window", bounds)  # hashable and JSON-friendly, whatever sequence was given

    @property
    def window_bounds(self) -> tuple[float, float]:
        """(t_lo, t_hi): IS runs at the grid times t with t_lo <= t <= t_hi (a number w means [1 - w, 1])."""
        return window_interval(self.window)

    @classmethod
    def from_config(cls, sample_cfg) -> "SamplerSettings":
        names = ("sampler", "update", "steps", "k", "window", "temperature", "redraw_every_step", "noise_removal",
                 "precision", "seed", "skip_idle_is", "top_k", "top_p", "kv_cache", "block_size",
                 "block_proposal", "block_lookahead")
        return cls(**{name: getattr(sample_cfg, name) for name in names})

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]
