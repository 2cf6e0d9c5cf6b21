"""Energy math for EDLM importance sampling (paper §4.2, Eq. 9, spec §6.2, §6.3, checklist #7).

Every energy is an :data:`EnergyFn`:
``(x0 (N, L), x_t (N, L), log_mu_tokens (N, L), t (N,)) -> (N,) float64``, where
``log_mu_tokens[n, i] = log mu_theta(x0[n, i] | x_t[n])`` comes from the SAME diffusion output that
proposed x0 (0 at carried-over positions). Low energy = preferred (weights ∝ exp(-E / tau)).

The training-free energies are ``E(x0, x_t) = -log q_proxy(x0 | x_t) + log p_theta(x0 | x_t)`` (up
to a constant per x_t), so that ``p_theta * exp(-E)`` ∝ q_proxy: the importance sampler then targets
the proxy. Everything is in LOG space; the reference's sampling path summed probabilities mu_theta
instead of log mu_theta (spec §6.3 bug), we do not.

The energies of trained models (AR/coAR, NCE, the exact oracle) that evaluate this math are in
:mod:`edlm_dist.sampling.model_energies`; their block-wise views in
:mod:`edlm_dist.sampling.prefix_energies`.
"""

from __future__ import annotations

from typing import Callable

import torch

EnergyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x0 (N, L), x_t (N, L), log_mu_tokens (N, L), t (N,)) -> energies (N,)``: the one energy signature
of the sampler, the single-device reference step and the likelihood evaluation."""


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ar_energy(
    log_p_ar_tokens: torch.Tensor,
    log_mu_tokens: torch.Tensor,
    x_t: torch.Tensor,
    mask_id: int,
    *,
    carry_over: bool,
) -> torch.Tensor:
    """AR residual energy ``E = -sum AR part + sum_i log mu_theta(x0^i | x_t)`` -> (B,) (paper Eq. 9).

    Args:
        log_p_ar_tokens: (B, L); column i >= 1 holds log p_AR(x0^i | x0^{<i}); column 0 is ignored
            (the first token is never scored).
        log_mu_tokens: (B, L) log mu_theta(x0^i | x_t); 0 at unmasked positions by carry-over.
        carry_over: coAR (paper §4.2.1) counts only masked positions in the AR part, i.e.
            p_coAR(x0^i | .) = 1 for tokens carried over from x_t; without it every position
            i >= 1 counts (EDLM-AR).
    """
    if log_p_ar_tokens.shape != x_t.shape or log_mu_tokens.shape != x_t.shape:
        raise ValueError(
            f"ar_energy expects (B, L) inputs; got log_p_ar {tuple(log_p_ar_tokens.shape)}, "
            f"log_mu {tuple(log_mu_tokens.shape)}, x_t {tuple(x_t.shape)}"
        )
    ar_terms = _at_least_float32(log_p_ar_tokens)[:, 1:]
    if carry_over:
        masked = x_t[:, 1:] == mask_id
        ar_terms = torch.where(masked, ar_terms, torch.zeros_like(ar_terms))
    return -ar_terms.sum(dim=-1) + _at_least_float32(log_mu_tokens).sum(dim=-1)


def oracle_energy(log_p_true: torch.Tensor, log_mu_tokens: torch.Tensor) -> torch.Tensor:
    """``E = -log p_true(x0) + sum_i log mu_theta(x0^i | x_t)`` -> (B,): makes p_theta * exp(-E) ∝ p_true,
    for tests and toy targets whose sequence log-probability is known exactly."""
    return -_at_least_float32(log_p_true) + _at_least_float32(log_mu_tokens).sum(dim=-1)


def log_mu_at_candidates(log_mu: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """log mu_theta at the tokens of batch-major candidates without repeating log_mu k times.

    Args:
        log_mu: (B, L, V); candidates: (B*k, L) laid out as in ``importance_sampling_step``
            (row b*k + j = candidate j of batch element b).
    Returns:
        (B*k, L) with entry [b*k + j, i] = log_mu[b, i, candidates[b*k + j, i]].
    """
    batch, length, _ = log_mu.shape
    if candidates.shape != (batch * k, length):
        raise ValueError(f"candidates must be (B*k, L) = ({batch * k}, {length}), got {tuple(candidates.shape)}")
    return log_mu_at_rows(log_mu, torch.arange(batch, device=log_mu.device).repeat_interleave(k), candidates)


def log_mu_at_rows(log_mu: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) with entry [n, i] = log_mu[rows[n], i, tokens[n, i]]: log mu_theta(x0 | x_t) per token of
    candidates that each name the batch row (x_t) that proposed them; log_mu (B, L, V), rows (N,)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return log_mu[rows[:, None], positions[None, :], tokens]
