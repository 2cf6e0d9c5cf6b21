"""The AR baseline sampler (spec §5.7): ancestral sampling from the AR model, one token per model call.

Row b starts as ``x_init[b]`` (position 0 is BOS, as in every training row; fixed prompt tokens after
it); position i >= 1 that is not fixed is drawn from ``p_AR(x_i | x_<i)``. The reference recomputes
the whole prefix for every token without a cache (O(L^2) per row); here the prefix's keys and values
stay in a KV cache (``models/kv_cache.py``) and each step feeds one token (``kv_cache=False`` gives
the reference's full recomputation, same samples up to float32 rounding of the logits).

Draws: float64 categorical race over ``softmax(log p / temperature)`` by default (``precision``),
each from its own generator seeded by (seed, TOKEN, position, sample id), so sample i depends only on
(model, settings, seed, i) like the diffusion samplers. ``top_k`` / ``top_p`` truncate the next-token
distribution and renormalise; they are NOT the paper's protocol (pure ancestral sampling) and are
off by default.

Fixed tokens: the AR model can continue a prompt but not fill a gap (a fixed token after a free one
would be forced, not conditioned on), so the fixed positions of a row must form a prefix.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from edlm_dist.errors import SamplingError
from edlm_dist.sampling.engine import SampleBatch
from edlm_dist.sampling.settings import SamplerSettings
from edlm_dist.sampling.streams import STREAM_TOKEN, stream_categorical, stream_seed


def truncated_probs(log_probs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N, V) next-token probabilities ∝ exp(log p / temperature), cut to the top_k likeliest tokens and to
    the smallest set of likeliest tokens holding >= top_p of the mass (ties at the edge kept), in ``dtype``."""
    probs = torch.softmax(log_probs.to(torch.float64) / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        ordered = probs.sort(dim=-1, descending=True).values
        mass_before = ordered.cumsum(dim=-1) - ordered  # mass of the strictly likelier tokens
        keep = mass_before < top_p * probs.sum(dim=-1, keepdim=True)
        edge = torch.where(keep, ordered, torch.full_like(ordered, float("inf"))).min(dim=-1, keepdim=True).values
        probs = torch.where(probs >= edge, probs, torch.zeros_like(probs))
    return probs.to(dtype)


def check_prefix_prompts(fixed: torch.Tensor) -> int:
    """The AR sampler's fixed positions must be a prefix of each row; returns the shortest such prefix."""
    free = ~fixed
    first_free = torch.where(free.any(dim=1), free.float().argmax(dim=1), torch.full_like(free[:, 0], fixed.shape[1],
                                                                                          dtype=torch.long))
    after = torch.arange(fixed.shape[1], device=fixed.device)[None, :] >= first_free[:, None]
    if bool((fixed & after).any()):
        raise SamplingError("the AR sampler continues prompts but cannot fill gaps (a fixed token follows a free "
                            "position); use sampler=mdlm or sampler=edlm for infilling")
    return int(first_free.min())


@torch.no_grad()
def sample_ar_batch(ar_model, settings: SamplerSettings, sample_ids: Sequence[int], *, length: int, mask_id: int,
                    bos_id: int, device: torch.device | str = "cpu", x_init: Optional[torch.Tensor] = None):
    """Sample one batch of rows (global ids ``sample_ids``) from the AR model -> ``SampleBatch``.

    ``x_init`` (B, L): fixed tokens, ``mask_id`` where a token is to be drawn (default: all free);
    a free position 0 becomes BOS. ``nfe`` counts sequential model calls (prefill included).
    """
    ids = [int(i) for i in sample_ids]
    device = torch.device(device)
    x = torch.full((len(ids), length), mask_id, dtype=torch.long, device=device) if x_init is None else \
        x_init.to(device=device, dtype=torch.long).clone()
    if x.shape != (len(ids), length):
        raise SamplingError(f"x_init must be (B, L) = ({len(ids)}, {length}), got {tuple(x.shape)}")
    x[:, 0] = torch.where(x[:, 0] == mask_id, torch.full_like(x[:, 0], bos_id), x[:, 0])
    fixed = x != mask_id
    start = check_prefix_prompts(fixed)
    out = SampleBatch(tokens=x)
    if start >= length:
        return out
    ar_model.eval()
    cache = ar_model.new_cache(length) if settings.kv_cache else None
    if cache is not None:  # prefill: every row's first `start` tokens are fixed
        log_p = ar_model.log_probs(x[:, :start], mask_id, cache=cache, last_only=True)[:, -1]
        out.nfe += 1
    for position in range(start, length):
        if cache is None:  # the reference: recompute the whole prefix for every token
            log_p = ar_model.log_probs(x[:, :position], mask_id, last_only=True)[:, -1]
            out.nfe += 1
        free = (~fixed[:, position]).nonzero().flatten().tolist()
        if free:
            probs = truncated_probs(log_p[free], settings.temperature, settings.top_k, settings.top_p, settings.dtype)
            seeds = [stream_seed(settings.seed, STREAM_TOKEN, position, ids[b]) for b in free]
            x[free, position] = stream_categorical(probs, seeds, settings.dtype)
        if cache is not None and position + 1 < length:
            log_p = ar_model.log_probs(x[:, position : position + 1], mask_id, cache=cache, last_only=True)[:, -1]
            out.nfe += 1
    out.tokens = x
    return out
