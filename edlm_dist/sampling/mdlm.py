"""MDLM ancestral sampling: time grid, q(x_s | x_t, mu_theta) updates, caching, noise removal (spec §5).

With alpha_t = 1 - move_t, paper Eq. 5 for a masked position reads
``q(x_s | x_t) = (move_s / move_t) * [mask] + ((move_t - move_s) / move_t) * mu_theta(x0 | x_t)``
and unmasked positions are copied (``x_s = x_t``).
"""

from __future__ import annotations

from typing import Callable

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.sampling.categorical import sample_categorical

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UPDATES = ("ddpm", "ddpm_cache")


def sampling_timesteps(
    steps: int, eps: float = 1e-5, *, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """MDLM's grid ``linspace(1, eps, steps + 1)`` (spec §5.1); step i goes from t_i to t_i - (1 - eps)/steps."""
    if steps < 1:
        raise SamplingError(f"sampling needs steps >= 1, got {steps}")
    return torch.linspace(1.0, eps, steps + 1, dtype=dtype, device=device)


def per_row_values(value, batch: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """A float, 0-dim tensor or (B,) tensor as a (B, 1) column (one value per batch row)."""
    value = torch.as_tensor(value, dtype=dtype, device=device)
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise SamplingError(f"expected a scalar or one value per row ({batch},), got shape {tuple(value.shape)}")
    return value[:, None]


def check_move_chances(move_t: torch.Tensor, move_s: torch.Tensor) -> None:
    if bool((move_t <= 0).any() | (move_s < 0).any() | (move_s > move_t).any()):
        raise SamplingError(
            "move chances must satisfy 0 <= move_s <= move_t and move_t > 0 (s is the later, less noisy time); "
            f"got move_t={move_t.flatten().tolist()[:4]}, move_s={move_s.flatten().tolist()[:4]}"
        )


def move_chances(t, s, update: str, schedule: LogLinearSchedule | None = None):
    """(move_t, move_s) for a step t -> s (spec §5.2, §5.3).

    ``ddpm`` uses the schedule's mask probability 1 - e^{-sigma} = (1 - eps) t; ``ddpm_cache``
    uses t and s directly (MDLM's default sampler, valid for the log-linear schedule).
    """
    if update == "ddpm":
        if schedule is None:
            raise SamplingError("update 'ddpm' needs the noise schedule; pass schedule=LogLinearSchedule(...)")
        t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        return -torch.expm1(-schedule.total_noise(t)), -torch.expm1(-schedule.total_noise(s))
    if update == "ddpm_cache":
        return t, s
    raise SamplingError(f"unknown sampler update {update!r}; choose one of {UPDATES}")


def reveal_probs(
    p_x0: torch.Tensor, x_t: torch.Tensor, move_t, move_s, mask_id: int
) -> torch.Tensor:
    """q(x_s | x_t) of paper Eq. 5 as a (B, L, V) probability tensor (spec §5.2).

    Masked positions: ``mu_theta * (move_t - move_s) / move_t`` on real tokens and
    ``move_s / move_t`` on the mask entry (rows sum to one when mu_theta does over real tokens;
    its mask column is ignored). Unmasked positions: one-hot on x_t's token.
    ``move_t``/``move_s`` are floats or (B,) tensors.
    """
    batch = p_x0.shape[0]
    dtype = torch.promote_types(p_x0.dtype, torch.float32)
    move_t = per_row_values(move_t, batch, dtype=dtype, device=p_x0.device)
    move_s = per_row_values(move_s, batch, dtype=dtype, device=p_x0.device)
    check_move_chances(move_t, move_s)
    stay = (move_s / move_t)[:, :, None]  # (B, 1, 1)
    q = p_x0.to(dtype) * (1.0 - stay)
    q[..., mask_id] = stay[:, :, 0]
    unmasked = (x_t != mask_id).unsqueeze(-1)
    # One-hot on unmasked rows without a boolean-index host sync: zero the row, then write 1 at
    # x_t (at masked rows x_t == mask_id, so the scatter rewrites the mask entry with itself).
    q.masked_fill_(unmasked, 0.0)
    index = x_t.unsqueeze(-1)
    q.scatter_(-1, index, torch.where(unmasked, torch.ones_like(stay), q.gather(-1, index)))
    return q


def ddpm_update(
    p_x0: torch.Tensor,
    x_t: torch.Tensor,
    move_t,
    move_s,
    mask_id: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One ancestral step x_t -> x_s ~ q(x_s | x_t, mu_theta) (spec §5.2/5.3); the race runs in ``dtype``.

    Copy rule: positions unmasked in x_t keep their token; masked positions take the draw,
    which may be the mask token (stay masked).
    """
    q = reveal_probs(p_x0.to(dtype), x_t, move_t, move_s, mask_id)
    draw = sample_categorical(q, generator=generator, dtype=dtype)
    return torch.where(x_t != mask_id, x_t, draw)


def noise_removal(log_mu: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Final greedy step (spec §5.4): still-masked positions get ``argmax`` of mu_theta (never the
    mask token); unmasked positions keep their token."""
    index = torch.tensor([mask_id], device=log_mu.device)
    greedy = log_mu.index_fill(-1, index, float("-inf")).argmax(dim=-1)
    return torch.where(x_t == mask_id, greedy, x_t)


_greedy_noise_removal = noise_removal  # mdlm_sample_loop's flag shadows the name


def mdlm_sample_loop(
    denoise_fn: DenoiseFn,
    x_init: torch.Tensor,
    steps: int,
    *,
    update: str = "ddpm_cache",
    schedule: LogLinearSchedule | None = None,
    mask_id: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    noise_removal: bool = True,
    cache: bool = True,
    time_conditioning: bool = False,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, dict]:
    """MDLM sampling loop (spec §5.1-5.4) around a model-agnostic denoiser.

    Args:
        denoise_fn: ``(x_t (B, L), t (B,) float32) -> log mu_theta (B, L, V)`` with SUBS applied.
        x_init: (B, L) start state, normally all ``mask_id``.
        cache: re-use the previous denoiser output while x_t did not change (MDLM ``ddpm_cache``).
            Only valid for a denoiser that ignores t, so it is never done when ``time_conditioning``.
    Returns:
        (x_0, stats) with ``stats["nfe"]`` = number of denoiser calls (noise removal included).
    """
    if update not in UPDATES:
        raise SamplingError(f"unknown sampler update {update!r}; choose one of {UPDATES}")
    use_cache = cache and not time_conditioning
    timesteps = sampling_timesteps(steps, eps)
    dt = (1.0 - eps) / steps
    batch = x_init.shape[0]
    x = x_init
    p_x0 = None
    nfe = 0
    for i in range(steps):
        t = float(timesteps[i])
        s = t - dt
        if p_x0 is None:
            p_x0 = denoise_fn(x, torch.full((batch,), t, device=x.device)).to(dtype).exp()
            nfe += 1
        move_t, move_s = move_chances(t, s, update, schedule)
        x_next = ddpm_update(p_x0, x, move_t, move_s, mask_id, generator=generator, dtype=dtype)
        if not (use_cache and torch.equal(x_next, x)):
            p_x0 = None  # something was revealed (or t matters): the denoiser must see the new state
        x = x_next
    if noise_removal:
        log_mu = denoise_fn(x, torch.full((batch,), float(timesteps[-1]), device=x.device))
        nfe += 1
        x = _greedy_noise_removal(log_mu, x, mask_id)
    return x, {"nfe": nfe, "steps": steps}
