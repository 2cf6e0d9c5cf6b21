"""Categorical sampling by an exponential race (Gumbel-max) in a chosen float precision (spec §5.3, §6.7).

``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. picks v with probability ``p_v / sum(p)``.
The noise precision matters: MDLM draws it in float32 and EDLM's proposals/negatives in
bf16, whose uniforms never come closer to 1 than 2^-8, so the smallest exponential is about
0.004 and the tail of p is cut off (spec §6.7, flow_matching#27). We draw the race in
float64 by default. Large (rows, V) inputs are processed in row chunks so the float64 copy
and the noise never exceed ``max_chunk_elements`` elements at once.
"""

from __future__ import annotations

import torch

from edlm_dist.errors import SamplingError

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 25
"""32M elements per chunk: 256 MiB of float64 noise (plus the same for the upcast input)."""


def _clamp_noise(noise: torch.Tensor) -> torch.Tensor:
    # An exact 0 (possible in low precision) would give p/0 = inf, or 0/0 = NaN for an
    # impossible token, which argmax would then pick. Clamping keeps p = 0 impossible.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def race_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``argmax_v p_v / E_v`` over the last axis for given Exp(1) ``noise`` (clamped in place), in its dtype.

    The race of :func:`sample_categorical`; exposed for callers that fill the noise themselves
    (``sampling/streams.py`` fills each slice from its own seeded generator)."""
    return (probs.to(noise.dtype) / _clamp_noise(noise)).argmax(dim=-1)


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise SamplingError(f"categorical sampling needs a floating dtype for the race, got {dtype}")


def _race(scores: torch.Tensor, *, log_space: bool, generator, dtype, max_chunk_elements: int) -> torch.Tensor:
    """Shared chunked race. ``scores`` are probabilities (p / E) or log-probabilities (log p - log E)."""
    _check_dtype(dtype)
    if scores.dim() == 0 or scores.shape[-1] == 0:
        raise SamplingError(f"categorical sampling needs a non-empty last (category) axis, got {tuple(scores.shape)}")
    num_categories = scores.shape[-1]
    flat = scores.reshape(-1, num_categories)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=scores.device)
    rows_per_chunk = max(1, max_chunk_elements // num_categories)
    for start in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[start : start + rows_per_chunk].to(dtype)
        noise = torch.empty(chunk.shape, dtype=dtype, device=chunk.device).exponential_(generator=generator)
        if log_space:
            out[start : start + rows_per_chunk] = (chunk - _clamp_noise(noise).log_()).argmax(dim=-1)
        else:
            out[start : start + rows_per_chunk] = race_with_noise(chunk, noise)
    return out.reshape(scores.shape[:-1])


def sample_categorical(
    probs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Draw one index per row over the last axis of ``probs`` (..., V) -> LongTensor (...).

    ``probs`` must be non-negative; it need not be normalised (scaling a row by a constant
    leaves the draw unchanged). The race runs in ``dtype``; the same generator state gives the
    same draw.
    """
    return _race(probs, log_space=False, generator=generator, dtype=dtype, max_chunk_elements=max_chunk_elements)


def sample_categorical_from_log_probs(
    log_probs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Same draw as ``sample_categorical(exp(log_probs))`` (Gumbel-max: argmax log p - log E)
    without materialising the probabilities; log-probs may be unnormalised and may hold -1e6/-inf."""
    return _race(log_probs, log_space=True, generator=generator, dtype=dtype, max_chunk_elements=max_chunk_elements)


def sample_nce_negatives(
    log_mu: torch.Tensor,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw n negatives per row, ``x_- ~ prod_i Cat(mu_theta(. | x_t)_i)`` -> (B, n, L) (spec §6.4).

    Independent per position; carried-over (unmasked) positions copy x_t because their row of
    ``log_mu`` is one-hot. The race runs in ``dtype`` (float64 by default), not in the
    reference's bf16, which truncates the tail of mu_theta (spec §6.7).
    """
    if log_mu.dim() != 3 or n < 1:
        raise ValueError(f"sample_nce_negatives expects log_mu (B, L, V) and n >= 1; got {tuple(log_mu.shape)}, n={n}")
    draws = [sample_categorical_from_log_probs(log_mu, generator=generator, dtype=dtype) for _ in range(n)]
    return torch.stack(draws, dim=1)
