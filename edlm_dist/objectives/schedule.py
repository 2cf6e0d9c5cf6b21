"""Log-linear noise schedule, training-time sampling and forward masking (spec §3).

MDLM's ``LogLinearNoise(eps=1e-3)``: the mask probability grows linearly in t,
``move_chance(t) = 1 - exp(-sigma(t)) = (1 - eps) t``, so a row is never fully masked
at t = 1 during training (alpha_1 = eps). The continuous-time NELBO weight
``sigma'(t) / expm1(sigma(t))`` simplifies to exactly ``1 / t`` (MDLM issue #9).
"""

from __future__ import annotations

import torch

from edlm_dist.errors import ConfigError


NELBO_SAMPLING_EPS = 1e-3
"""Lower end of t for the validation NELBO (MDLM's sampling_eps, spec §3): the number runs compare."""


class LogLinearSchedule:
    """sigma(t) = -log(1 - (1 - eps) t) for t in [0, 1] (spec §3).

    All methods accept tensors (any shape) and return tensors of the same shape and dtype.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"noise schedule eps must lie in (0, 1), got {eps}; the paper uses 1e-3")
        self.eps = float(eps)

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = -log(1 - (1 - eps) t); log1p keeps precision for small t."""
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """sigma'(t) = (1 - eps) / (1 - (1 - eps) t)."""
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - e^{-sigma(t)} = (1 - eps) t (closed form, exact)."""
        return (1.0 - self.eps) * t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight sigma'(t) / expm1(sigma(t)), which is exactly 1 / t for this schedule (spec §4.2).

        Returned in closed form: the ratio of the two float expressions loses digits near t = 0.
        """
        return 1.0 / t

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps})"


def sample_times(
    n: int,
    *,
    antithetic: bool = True,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sampling_eps_max: float = 1.0,
) -> torch.Tensor:
    """Draw n training times t in [sampling_eps, sampling_eps_max) (MDLM ``_sample_t``, spec §3).

    With ``antithetic`` the unit interval is split into n strata and example i gets one
    uniform draw from stratum i (``u_i = (u_i / n + i / n) mod 1``), which lowers the variance
    of the per-micro-batch loss. n is the LOCAL (per-device micro-batch) size, as in MDLM; the
    block-diffusion objective draws one time per (row, block), n = rows x blocks (BD3-LM).
    ``sampling_eps_max`` < 1 (with ``sampling_eps`` raised) is BD3-LM's clipped schedule
    (docs/likelihood_bounds.md §5): a training-only choice, never the validation NELBO.
    """
    if n < 1:
        raise ConfigError(f"sample_times needs n >= 1 examples, got {n}")
    if not 0.0 <= sampling_eps < sampling_eps_max <= 1.0:
        raise ConfigError(f"need 0 <= sampling_eps < sampling_eps_max <= 1, got {sampling_eps} and "
                          f"{sampling_eps_max}; MDLM uses 1e-3 and 1")
    # Drawn where the generator lives (the trainer's noise stream is a CPU generator), then moved: a CUDA run
    # draws the same numbers as a CPU run and never hands a CPU generator to a CUDA kernel.
    u = torch.rand(n, generator=generator, device=_generator_device(generator, device), dtype=dtype).to(device)
    if antithetic:
        offsets = torch.arange(n, device=u.device, dtype=dtype) / n
        u = torch.remainder(u / n + offsets, 1.0)
    return (sampling_eps_max - sampling_eps) * u + sampling_eps


def mask_tokens(
    x0: torch.Tensor,
    move_chance: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward corruption q(x_t | x_0) (MDLM ``q_xt``): mask each token of row b independently with
    probability ``move_chance[b]`` (one time per row), or ``move_chance[b, i]`` (one time per block).

    Args:
        x0: (B, L) clean token ids.
        move_chance: (B,) or (B, 1) mask probabilities, e.g. ``schedule.move_chance(t)``, or (B, L)
            per-position ones (block diffusion: each block's own time, repeated over the block).
    """
    if x0.dim() != 2:
        raise ConfigError(f"mask_tokens expects x0 of shape (B, L), got {tuple(x0.shape)}")
    move_chance = torch.as_tensor(move_chance, device=x0.device)
    move_chance = move_chance.to(torch.promote_types(move_chance.dtype, torch.float32))
    if move_chance.dim() == 2 and move_chance.shape[1] == 1:
        move_chance = move_chance[:, 0]
    if move_chance.shape not in ((x0.shape[0],), tuple(x0.shape)):
        raise ConfigError(f"mask_tokens expects one move chance per row ({x0.shape[0]},) or per position "
                          f"{tuple(x0.shape)}, got {tuple(move_chance.shape)}")
    u = torch.rand(x0.shape, generator=generator, device=_generator_device(generator, x0.device),
                   dtype=move_chance.dtype).to(x0.device)
    masked = u < (move_chance[:, None] if move_chance.dim() == 1 else move_chance)
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def _generator_device(generator: torch.Generator | None, device) -> torch.device | str | None:
    """Where a draw from ``generator`` must happen: its own device (None: the target device)."""
    return generator.device if generator is not None else device
