"""Likelihood bounds for MDLM and EDLM (paper §4.3, Eq. 12-14, Theorem 1; spec §4.2, §6.6, §6.8 #2/#5/#16).

Everything here is per-row arithmetic on tensors that a caller has already computed
(denoiser log-probs, energies, times); there is no model and no parallelism. Aggregation
over rows/tokens/ranks is the caller's job (token-weighted float64 sums, spec §4.4).

What the reported numbers are bounds/estimates of is written up in docs/likelihood_bounds.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from edlm_dist.errors import SamplingError


class LogZEstimates(NamedTuple):
    """Estimates of log Z(x_t) = log E_{x~pθ(·|x_t)} exp(−E(x, x_t)) from n samples (Theorem 1).

    All fields are float64 tensors shaped like the input without its last axis.
      lower:  log Ẑ_n, biased low for every n (Jensen): E[lower] ≤ log Z.
      loo:    log Ẑ_{n−1} by leave-one-out (Nowozin 2018): (1/n) Σ_j logmeanexp_{i≠j}; NaN for n = 1.
      upper:  (2n−1)·log Ẑ_n − 2(n−1)·log Ẑ_{n−1}; E[upper] ≥ log Z only asymptotically in n.
      plugin: −E(x^(1)), the released code's one-sample value (spec §6.6, §6.8 #2).
    """

    lower: Tensor
    loo: Tensor
    upper: Tensor
    plugin: Tensor


def _check_energies(neg_energies: Tensor) -> Tensor:
    if neg_energies.dim() == 0 or neg_energies.shape[-1] < 1:
        raise SamplingError(
            f"need at least one sample on the last axis of the energies, got shape {tuple(neg_energies.shape)}; "
            "draw n ≥ 2 negatives x ~ pθ(·|x_t) per row"
        )
    x = neg_energies.to(torch.float64)
    # −E = +inf (or NaN) means a broken energy net; −inf (E = +inf) is a legal zero weight.
    if torch.isnan(x).any() or torch.isposinf(x).any():
        raise SamplingError(
            "energies contain NaN or −inf (−E = +inf); check the energy network outputs (low-precision overflow?)"
        )
    return x


def leave_one_out_logsumexp(x: Tensor) -> Tensor:
    """out[..., j] = log Σ_{i≠j} exp(x[..., i]), stable and O(n) memory.

    For j that is not the row's argmax, e^{x_j} ≤ S/2 (S = Σ_i e^{x_i}), so
    log(S − e^{x_j}) = lse + log1p(−e^{x_j − lse}) has a well-conditioned argument in [−1/2, 0].
    For the argmax entry (where that subtraction could cancel catastrophically) the sum over
    the other entries is recomputed directly. Needs n ≥ 2 on the last axis.
    """
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    argmax = x.argmax(dim=-1, keepdim=True)
    without_max = torch.logsumexp(x.scatter(-1, argmax, float("-inf")), dim=-1, keepdim=True)
    # exp(x − lse) ≤ 1/2 off the argmax; clamp guards the argmax slot, which is replaced below.
    ratio = torch.exp(x - lse).clamp(max=0.5)
    out = lse + torch.log1p(-ratio)
    return out.scatter(-1, argmax, without_max)


def log_partition_estimates(neg_energies: Tensor) -> LogZEstimates:
    """Theorem 1 estimators of log Z_φ(x_t) from values −E(x^(i), x_t), x^(i) ~ pθ(·|x_t) (Eq. 14).

    neg_energies: (..., n) with the n samples on the last axis, any float dtype; computed in float64.
    With n = 1 the leave-one-out term is undefined (loo = NaN) and its coefficient 2(n−1) is zero,
    so upper = lower = plugin: the reference code's one-sample estimate (spec §6.8 #2) — which is
    an *optimistic* (low) estimate of log Z, not an upper bound.
    """
    x = _check_energies(neg_energies)
    n = x.shape[-1]
    lower = torch.logsumexp(x, dim=-1) - math.log(n)
    plugin = x[..., 0]
    if n == 1:
        return LogZEstimates(lower=lower, loo=torch.full_like(lower, float("nan")), upper=lower.clone(), plugin=plugin)
    loo = (leave_one_out_logsumexp(x) - math.log(n - 1)).mean(dim=-1)
    upper = (2 * n - 1) * lower - 2 * (n - 1) * loo
    return LogZEstimates(lower=lower, loo=loo, upper=upper, plugin=plugin)


def importance_ess(neg_energies: Tensor) -> Tensor:
    """Effective sample size (Σw)²/Σw² of self-normalised weights w_i ∝ exp(−E_i), shape (...,).

    This is the standard ESS. The paper's Appendix C.2 (Eq. 17) normalises the *energies*
    instead (spec §6.8 #16), which is not an importance-sampling ESS; we do not reproduce it.
    Ranges from 1 (one sample has all the weight) to n (equal weights).
    """
    x = _check_energies(neg_energies)
    log_w = x - torch.logsumexp(x, dim=-1, keepdim=True)
    return 1.0 / torch.exp(2.0 * log_w).sum(dim=-1)


def _per_row(name: str, value: Tensor, batch: int) -> Tensor:
    value = torch.as_tensor(value).to(torch.float64)
    if value.dim() != 1 or value.shape[0] != batch:
        raise SamplingError(f"{name} must have shape ({batch},) like log_p_theta_row, got {tuple(value.shape)}")
    return value


def edlm_row_nelbo(
    log_p_theta_row: Tensor,
    energy_pos: Tensor,
    log_z: Tensor,
    t: Tensor,
    loss_weight: Tensor | None,
    seq_len: int,
) -> Tensor:
    """One (t, mask) Monte-Carlo term of the EDLM NELBO (Eq. 13; spec §6.6), per token, shape (B,).

        weight · [ −log pθ(x_0|x_t) + E(x_0, x_t) + log Z(x_t) ] / L

    log_p_theta_row: Σ_i log μθ(x_0^i|x_t) with SUBS carry-over (0 at unmasked positions).
    energy_pos:      E(x_0, x_t) of the clean row.
    log_z:           an estimate of log Z(x_t): `LogZEstimates.upper` for the paper's upper-bound
                     claim, `.lower`/`.plugin` for the optimistic numbers, 0 for carry-over AR energies.
    t:               diffusion time in (0, 1]; used for the default weight.
    loss_weight:     α'_t/(1−α_t) magnitude; None means the log-linear schedule's 1/t (spec §3).
    seq_len:         L, every position of the row (spec §4.2 divides by all tokens, not masked ones).

    Caveat (docs/likelihood_bounds.md): Eq. 13 uses the *joint* sequence likelihood where the
    masked-diffusion NELBO needs per-token marginals, so its expectation is not a bound on the
    NLL in general. With E ≡ 0 and log Z = 0 it equals `mdlm_nelbo_row`.
    """
    log_p = torch.as_tensor(log_p_theta_row).to(torch.float64)
    if log_p.dim() != 1:
        raise SamplingError(f"log_p_theta_row must be a (B,) row sum, got shape {tuple(log_p.shape)}")
    batch = log_p.shape[0]
    energy_pos = _per_row("energy_pos", energy_pos, batch)
    log_z = _per_row("log_z", log_z, batch)
    weight = _row_weight(t, loss_weight, batch)
    return weight * (-log_p + energy_pos + log_z) / _check_seq_len(seq_len)


def mdlm_nelbo_row(
    log_mu_tokens: Tensor,
    masked: Tensor,
    t: Tensor,
    loss_weight: Tensor | None,
    seq_len: int,
) -> Tensor:
    """One (t, mask) Monte-Carlo term of the MDLM continuous-time NELBO per token (spec §4.2), shape (B,).

        weight · Σ_{i masked} −log μθ(x_0^i | x_t) / L

    log_mu_tokens: (B, L) log μθ(x_0^i|x_t) gathered at the clean tokens (any value at unmasked
    positions: they are excluded by `masked`, matching SUBS carry-over which makes them 0).
    masked: (B, L) bool, True where x_t^i is the mask token. t, loss_weight, seq_len as in
    `edlm_row_nelbo`. Its expectation over t ~ U[ε_s, 1) and the masks is the quantity the
    released code reports as validation NLL; docs/likelihood_bounds.md says what it bounds.

    Block diffusion (docs/likelihood_bounds.md §5) passes ``t`` of shape (B, L), each block's own time
    repeated over the block (``loss_weight`` must then be None: the 1/t of every position): the row
    term is then the sum over blocks of the blocks' MDLM terms, Σ_i masked −log μθ / t_i / L.
    """
    log_mu = torch.as_tensor(log_mu_tokens).to(torch.float64)
    if log_mu.dim() != 2 or masked.shape != log_mu.shape:
        raise SamplingError(
            f"log_mu_tokens and masked must both be (B, L), got {tuple(log_mu.shape)} and {tuple(masked.shape)}"
        )
    # where(), not multiplication: a −inf log-prob at an unmasked position must not give NaN.
    nll = torch.where(masked.bool(), -log_mu, torch.zeros_like(log_mu))
    if torch.as_tensor(t).dim() == 2 and loss_weight is None:
        t = torch.as_tensor(t).to(torch.float64)
        if t.shape != log_mu.shape or (t <= 0).any() or (t > 1).any():
            raise SamplingError(f"per-position times must be (B, L) = {tuple(log_mu.shape)} in (0, 1], "
                                f"got {tuple(t.shape)}")
        return (nll / t).sum(dim=-1) / _check_seq_len(seq_len)
    weight = _row_weight(t, loss_weight, log_mu.shape[0])
    return weight * nll.sum(dim=-1) / _check_seq_len(seq_len)


def _row_weight(t: Tensor, loss_weight: Tensor | None, batch: int) -> Tensor:
    t = _per_row("t", t, batch)
    if loss_weight is not None:
        return _per_row("loss_weight", loss_weight, batch)
    if (t <= 0).any() or (t > 1).any():
        raise SamplingError("t must lie in (0, 1] for the default 1/t weight; sample t ~ U[ε_s, 1) with ε_s > 0")
    return 1.0 / t


def _check_seq_len(seq_len: int) -> int:
    if int(seq_len) < 1:
        raise SamplingError(f"seq_len must be the number of positions per row (≥ 1), got {seq_len}")
    return int(seq_len)
