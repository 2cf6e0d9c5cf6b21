"""Training losses: MDLM continuous-time NELBO, AR next-token loss, EDLM NCE loss (spec §4.2, §4.3, §6.4).

The NCE negatives are drawn by :func:`edlm_dist.sampling.categorical.sample_nce_negatives`.

The token losses take raw logits plus a ``cross_entropy`` hook so that a tensor-parallel caller
can hand in logits of its vocabulary shard and Megatron's ``vocab_parallel_cross_entropy``:
``cross_entropy(logits2d (N, V_local), targets (N,)) -> (N,)`` must return the full-vocabulary
CE per row. Rows are the flattened positions in row-major order (N = B*L for ``mdlm_loss``,
B*(L-1) for ``ar_loss``). The CE is computed at every position (static shapes, no host sync)
and the unmasked positions are then zeroed, which equals the SUBS carry-over loss exactly.

``stats`` values are detached 0-dim float tensors (sums, so they can be all-reduced over
data-parallel ranks before dividing); ``float(stats[key])`` gives a Python number.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import suppress_mask_logit

CrossEntropyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dense_cross_entropy(logits2d: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Default hook: per-row CE over the full vocabulary, computed in at least float32."""
    return F.cross_entropy(logits2d.to(torch.promote_types(logits2d.dtype, torch.float32)), targets, reduction="none")


def mdlm_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    *,
    schedule: LogLinearSchedule,
    cross_entropy: CrossEntropyFn | None = None,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MDLM continuous-time NELBO, one (t, mask) sample per row (spec §4.2, paper Eq. 13 without energy).

    Per token ``l_i = -log mu_theta(x0^i | x_t) * sigma'(t)/expm1(sigma(t)) = CE_i / t`` at masked
    positions and exactly 0 at unmasked ones (carry-over). The batch loss divides the sum by ALL
    B*L positions, not by the number of masked tokens (checklist #1).

    Block diffusion (BD3-LM) passes ``t`` per position: each block's own time repeated over the
    block, and the sum over blocks of the per-block NELBOs comes out of the same formula
    (docs/likelihood_bounds.md §5).

    Args:
        logits: (B, L, V_local) raw denoiser logits (a vocabulary shard starting at ``vocab_start``).
        x0, x_t: (B, L) clean and corrupted tokens. t: (B,) times used to corrupt each row, or (B, L).
    """
    batch, length = x0.shape
    if x_t.shape != x0.shape or logits.shape[:2] != x0.shape or t.shape not in ((batch,), (batch, length)):
        raise ValueError(
            f"mdlm_loss shapes disagree: logits {tuple(logits.shape)}, x0 {tuple(x0.shape)}, "
            f"x_t {tuple(x_t.shape)}, t {tuple(t.shape)}; expected (B, L, V), (B, L), (B, L), (B,) or (B, L)"
        )
    ce_fn = cross_entropy if cross_entropy is not None else dense_cross_entropy
    logits = suppress_mask_logit(logits, mask_id, vocab_start)
    ce = ce_fn(logits.reshape(batch * length, logits.shape[-1]), x0.reshape(-1)).view(batch, length)
    masked = x_t == mask_id
    weight = schedule.loss_weight(t).to(ce.dtype)
    weight = weight[:, None] if weight.dim() == 1 else weight
    # where (not a multiply) so a large CE at an unmasked position cannot leak in as 0 * inf.
    token_loss = torch.where(masked, ce * weight, torch.zeros_like(ce))
    loss = token_loss.sum() / (batch * length)
    with torch.no_grad():
        stats = {
            "nll_sum": token_loss.detach().sum(),
            "tokens": torch.tensor(float(batch * length), device=ce.device),
            "masked_tokens": masked.sum().to(ce.dtype),
            "masked_ce_sum": torch.where(masked, ce.detach(), torch.zeros_like(ce)).sum(),
        }
    return loss, stats


def ar_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    *,
    cross_entropy: CrossEntropyFn | None = None,
    vocab_start: int = 0,
    mask_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss ``-log p_AR(x_{i+1} | x_{<=i})`` averaged over the B*(L-1) targets ``x[:, 1:]``
    (spec §4.3; the first token is never predicted).

    ``logits`` is (B, L, V_local) from a forward on all of x (its last position is dropped) or
    (B, L-1, V_local) from a forward on ``x[:, :-1]`` (MDLM's way). With ``mask_id`` the mask
    column is suppressed so the AR model never predicts the mask token.
    """
    batch, length = x.shape
    if logits.shape[0] != batch or logits.shape[1] not in (length, length - 1) or length < 2:
        raise ValueError(
            f"ar_loss expects logits (B, L, V) or (B, L-1, V) for x (B, L) with L >= 2; "
            f"got logits {tuple(logits.shape)}, x {tuple(x.shape)}"
        )
    if logits.shape[1] == length:
        logits = logits[:, :-1]
    if mask_id is not None:
        logits = suppress_mask_logit(logits, mask_id, vocab_start)
    ce_fn = cross_entropy if cross_entropy is not None else dense_cross_entropy
    num_targets = batch * (length - 1)
    ce = ce_fn(logits.reshape(num_targets, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss = ce.sum() / num_targets
    stats = {"nll_sum": ce.detach().sum(), "tokens": torch.tensor(float(num_targets), device=ce.device)}
    return loss, stats


def nce_loss(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """EDLM NCE loss, paper Eq. 10, in a numerically stable form (spec §6.4):

    ``-log 1/(1+e^{E+}) - mean_j log 1/(1+e^{-E-_j}) = softplus(E+) + mean_j softplus(-E-_j)``,
    averaged over rows. Data is pushed to LOW energy, denoiser samples to HIGH energy.
    (The reference adds 1e-8 inside the logs; the softplus form needs no such guard.)

    Args:
        e_pos: (B,) or (B, 1) energies of the clean rows x_+ = x0.
        e_neg: (B,) or (B, n) energies of n negatives per row drawn from p_theta(. | x_t).
    """
    if e_pos.dim() == 2 and e_pos.shape[1] == 1:
        e_pos = e_pos[:, 0]
    if e_neg.dim() == 1:
        e_neg = e_neg[:, None]
    if e_pos.dim() != 1 or e_neg.dim() != 2 or e_neg.shape[0] != e_pos.shape[0]:
        raise ValueError(f"nce_loss expects e_pos (B,) and e_neg (B, n); got {tuple(e_pos.shape)}, {tuple(e_neg.shape)}")
    per_row = F.softplus(e_pos) + F.softplus(-e_neg).mean(dim=-1)
    return per_row.mean()
