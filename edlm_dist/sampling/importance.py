"""EDLM self-normalised importance sampling of x0 (paper Alg. 1 / §4.4, spec §6.5, §6.8 #1 #6 #10).

One step at time t -> s: draw k candidates x0^(j) ~ p_theta(x0 | x_t) = prod_i mu_theta^i, weight
them by ``w_j ∝ exp(-E(x0^(j), x_t) / tau)`` (the PAPER's sign; the released code uses +E), pick
one candidate x0* with probability w_j, and take the posterior step q(x_s | x_t, x0*).
As k grows the chosen x0* is distributed as ``p_theta(x0 | x_t) exp(-E) / Z`` (sampling-importance-
resampling). Candidates are laid out (B, k, L) and flattened batch-major (row b*k + j), so each
batch element only ever chooses among its own candidates (the reference's k-major tiling read
back with ``view(B, k)`` mixes rows for B > 1, spec §6.5).

Which steps run this (window t in [1 - w, 1], re-draw every step as Alg. 1 or only after a
change as the reference) is decided by the caller's loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.sampling.categorical import sample_categorical
from edlm_dist.sampling.energies import EnergyFn, log_mu_at_candidates
from edlm_dist.sampling.mdlm import check_move_chances, per_row_values


def log_importance_weights(energies: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Normalised log weights ``log softmax(-E / tau)`` over the k candidates, (B, k) -> (B, k) float64.

    Lower energy = more weight (paper Alg. 1 line 8). NaN/Inf energies raise SamplingError.
    """
    if energies.dim() != 2:
        raise SamplingError(f"energies must be (B, k), got shape {tuple(energies.shape)}")
    if not temperature > 0:
        raise SamplingError(f"importance-sampling temperature must be > 0, got {temperature}")
    if not bool(torch.isfinite(energies).all()):
        bad = int((~torch.isfinite(energies)).sum())
        raise SamplingError(
            f"{bad} of {energies.numel()} candidate energies are NaN/Inf; check the energy model "
            "(weights, dtype overflow) before importance sampling"
        )
    return torch.log_softmax(-energies.to(torch.float64) / temperature, dim=-1)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum_j w_j^2 of normalised importance weights, (B, k) -> (B,), in [1, k].

    This is the standard (Kish) ESS. The paper's Appendix C.2 / Eq. 17 instead normalises the
    energies themselves (e_i / sum e), which is not an ESS of the weights (spec §6.8 #16).
    """
    return torch.exp(-torch.logsumexp(2.0 * log_w, dim=-1))


def resample_index(log_w: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one candidate index per batch row with probability w_j, (B, k) -> (B,) (float64 race)."""
    return sample_categorical(log_w.to(torch.float64).exp(), generator=generator, dtype=torch.float64)


def posterior_step_from_x0(
    x0_star: torch.Tensor,
    x_t: torch.Tensor,
    move_t,
    move_s,
    mask_id: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_s ~ q(x_s | x_t, x0 = x0*) (paper Eq. 4; Alg. 1 line 12 with its typo fixed, spec §6.8 #7).

    Each masked position is revealed to x0*'s token with probability (move_t - move_s) / move_t
    and stays masked otherwise; unmasked positions keep x_t.
    """
    u = torch.rand(x_t.shape, generator=generator, dtype=torch.float64, device=x_t.device)
    return torch.where(reveal_positions(x_t, u, move_t, move_s, mask_id), x0_star, x_t)


def reveal_positions(x_t: torch.Tensor, uniforms: torch.Tensor, move_t, move_s, mask_id: int) -> torch.Tensor:
    """(B, L) bool: the masked positions that q(x_s | x_t, x0*) reveals (Eq. 4), given U(0, 1) ``uniforms``
    (B, L) float64: reveal where u < (move_t - move_s) / move_t. It does not depend on x0*."""
    batch = x_t.shape[0]
    move_t = per_row_values(move_t, batch, dtype=torch.float64, device=x_t.device)
    move_s = per_row_values(move_s, batch, dtype=torch.float64, device=x_t.device)
    check_move_chances(move_t, move_s)
    return (x_t == mask_id) & (uniforms < (move_t - move_s) / move_t)


def draw_proposals(
    p_x0: torch.Tensor,
    x_t: torch.Tensor,
    k: int,
    mask_id: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """k candidates per batch row from prod_i p_x0[b, i] -> (B, k, L) (paper Alg. 1 line 6).

    One (B, L) draw at a time, so memory stays at one (B, L, V) copy whatever k is. The mask
    token is never proposed and unmasked positions copy x_t (carry-over).
    """
    probs = p_x0.to(dtype=dtype, copy=True)
    probs[..., mask_id] = 0.0
    unmasked = x_t != mask_id
    draws = [
        torch.where(unmasked, x_t, sample_categorical(probs, generator=generator, dtype=dtype)) for _ in range(k)
    ]
    return torch.stack(draws, dim=1)


def importance_sampling_step(
    p_x0: torch.Tensor,
    x_t: torch.Tensor,
    move_t,
    move_s,
    mask_id: int,
    k: int,
    energy_fn: EnergyFn,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    t: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One EDLM denoising step with importance sampling (single-device reference, paper Alg. 1 lines 6-12).

    Args:
        p_x0: (B, L, V) mu_theta(x0 | x_t) probabilities (SUBS: one-hot at unmasked positions).
        energy_fn: an :data:`~edlm_dist.sampling.energies.EnergyFn` called on
            ``(candidates (B*k, L), x_t_repeated (B*k, L), log mu_theta at the candidates, t)``; row b*k + j
            holds candidate j of batch element b and ``x_t.repeat_interleave(k, 0)[b*k + j] = x_t[b]``.
        t: the step's time, for time-conditioned energies (NaN when not given).
    Returns:
        (x_s, x0_star, info) with info = {"log_weights" (B, k), "energies" (B, k), "ess" (B,), "index" (B,)}.
    """
    if k < 1:
        raise SamplingError(f"importance sampling needs k >= 1 candidates, got {k}")
    batch, length = x_t.shape
    candidates = draw_proposals(p_x0, x_t, k, mask_id, generator=generator, dtype=dtype)
    flat = candidates.reshape(batch * k, length)
    log_mu_tokens = log_mu_at_candidates(torch.log(p_x0), flat, k)
    times = torch.full((batch * k,), float("nan") if t is None else float(t), device=x_t.device)
    energies = energy_fn(flat, x_t.repeat_interleave(k, dim=0), log_mu_tokens, times)
    if energies.numel() != batch * k:
        raise SamplingError(f"energy_fn must return one energy per candidate ({batch * k}), got {tuple(energies.shape)}")
    energies = energies.reshape(batch, k)
    log_w = log_importance_weights(energies, temperature)
    index = resample_index(log_w, generator=generator)
    x0_star = candidates[torch.arange(batch, device=x_t.device), index]
    x_s = posterior_step_from_x0(x0_star, x_t, move_t, move_s, mask_id, generator=generator)
    info = {"log_weights": log_w, "energies": energies.detach(), "ess": effective_sample_size(log_w), "index": index}
    return x_s, x0_star, info
