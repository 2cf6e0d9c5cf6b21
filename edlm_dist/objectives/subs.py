"""SUBS parameterisation of the denoiser x0-predictor mu_theta (paper Eq. 6, spec §4.1).

1. the mask token is never predicted: its logit is set to -1e6 ("-inf-like" but finite, so
   0 * logit and softmax gradients stay NaN-free);
2. log-softmax over the vocabulary;
3. carry-over: a position that is not masked in x_t predicts its observed token with
   probability one (log-prob 0 there, -1e6 elsewhere).
"""

from __future__ import annotations

import torch

NEG_INF = -1e6
"""The "minus infinity" used for impossible tokens (MDLM uses -1e6, finite on purpose)."""


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 logits are upcast before any softmax (spec §6.7)."""
    return torch.promote_types(dtype, torch.float32)


def suppress_mask_logit(logits: torch.Tensor, mask_id: int, vocab_start: int = 0) -> torch.Tensor:
    """Return logits with the mask column set to -1e6 (out of place, autograd-safe).

    ``logits`` may be a vocabulary shard ``[vocab_start, vocab_start + V_local)`` of a
    tensor-parallel output layer: only the shard that holds ``mask_id`` changes; the others are
    returned unchanged.
    """
    local = mask_id - vocab_start
    if 0 <= local < logits.shape[-1]:
        index = torch.tensor([local], device=logits.device)
        return logits.index_fill(-1, index, NEG_INF)
    return logits


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log mu_theta(x0 | x_t) of shape (B, L, V) in float32 (float64 if the logits are float64).

    Needs the full (dense) vocabulary. Masked positions: log-softmax with the mask token
    suppressed. Unmasked positions: 0 on x_t's token, -1e6 elsewhere (carry-over).
    """
    if logits.shape[:-1] != x_t.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match x_t {tuple(x_t.shape)} on (B, L)")
    logits = suppress_mask_logit(logits.to(_float_dtype(logits.dtype)), mask_id)
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    carried = torch.full_like(log_probs, NEG_INF).scatter(-1, x_t.unsqueeze(-1), 0.0)
    unmasked = (x_t != mask_id).unsqueeze(-1)
    return torch.where(unmasked, carried, log_probs)


def gather_token_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pick ``log_probs[b, i, tokens[b, i]]`` -> (B, L)."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
