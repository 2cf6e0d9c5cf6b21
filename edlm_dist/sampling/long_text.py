"""Rows longer than the model's context: semi-autoregressive windows (spec §5.6).

A row of N > L tokens is written window by window, left to right. Each window is an ordinary
L-token sampling problem whose start state holds every token already committed (and every fixed
prompt/infill token it covers); the sampler fills the rest and the window's new tokens are
committed. Each next window ends ``stride`` tokens later, so it keeps the last committed tokens as
its prefix and writes ``stride`` new ones; the last window ends at the row's end. Any sampler works
as the window sampler (MDLM, EDLM with any energy: its proposals share the window's fixed tokens and
its energy sees them; the AR sampler).

Framing (a deliberate difference from MDLM's ``sample_subs_guidance``). Every training row is
``[BOS] + L-2 tokens + [EOS]`` (``data/wrap.py``), and a model knows where it is in a row only from
these framing tokens (rotary attention is relative). The reference slides raw windows over the row, so
a window does not start with BOS, the denoiser puts an EOS in every window's last slot, and the long
samples carry an EOS at every window boundary (its README says Gen PPL needs post-processing). On the
demo models raw windows also broke the AR sampler (it wrote EOS after the first window) and MDLM
(it left the row's final EOS out). Here every window is framed like a training row: a window that does
not start the row gets a *placeholder* BOS in its first slot, and (diffusion samplers) a window that
does not end the row gets a placeholder EOS in its last slot; placeholders are fixed and never emitted.
So the first window covers L-1 row positions, a middle one L-2 (its prefix is L-2-stride committed
tokens) and the last one L-1; the long row is one document ``[BOS] ... [EOS]``. The AR sampler never sees
later slots (causal), so its windows carry no EOS placeholder.

Randomness: window j of sample i draws from the streams of sample id ``i + j * 2**40`` (window 0 is
sample i itself, so a one-window row equals ordinary sampling), so windows never share random numbers
and sample i still depends only on (models, settings, seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from edlm_dist.errors import ConfigError

WINDOW_ID_STRIDE = 1 << 40


@dataclass(frozen=True)
class Window:
    start: int  # first row position in the window
    body: int  # row positions it covers: [start, start + body)
    bos: bool  # a placeholder BOS slot before the body (not part of the row)
    eos: bool  # a placeholder EOS slot after the body (not part of the row)


def window_plan(total: int, context: int, stride: int, *, causal: bool = False) -> list[Window]:
    """The windows that write a ``total``-token row with an L = ``context`` model (module docstring)."""
    if total <= context:
        return [Window(0, total, False, False)]
    if not 1 <= stride <= context - 3:
        raise ConfigError(f"sample.stride={stride} must be in [1, L-3] = [1, {context - 3}] so that every window "
                          "keeps a prefix of committed tokens")
    end = context - 1
    windows = [Window(0, end, False, not causal)]
    while end + stride < total:
        end += stride
        windows.append(Window(end - (context - 2), context - 2, True, not causal))
    windows.append(Window(total - (context - 1), context - 1, True, False))
    return windows


WindowSampler = Callable[[torch.Tensor, list[int]], object]
"""``(x_init (B, L_w) with mask_id at free positions, window sample ids) -> SampleBatch``."""


def generate_long(fill: WindowSampler, x_init: torch.Tensor, sample_ids: Sequence[int], *, context: int,
                  stride: int, bos_id: int, eos_id: int, causal: bool = False):
    """Write rows of ``x_init.shape[1]`` tokens window by window with ``fill``; returns a SampleBatch whose
    counters (NFE, energies, ESS) are summed over the windows."""
    from edlm_dist.sampling.engine import SampleBatch

    row = x_init.clone()
    batch = row.shape[0]
    total = SampleBatch(tokens=row, row_ess_sum=torch.zeros(batch, dtype=torch.float64),
                        row_is_steps=torch.zeros(batch, dtype=torch.long))
    for index, window in enumerate(window_plan(row.shape[1], context, stride, causal=causal)):
        span = slice(window.start, window.start + window.body)
        parts = [row[:, span]]
        if window.bos:
            parts.insert(0, torch.full_like(row[:, :1], bos_id))
        if window.eos:
            parts.append(torch.full_like(row[:, :1], eos_id))
        ids = [int(i) + index * WINDOW_ID_STRIDE for i in sample_ids]
        result = fill(torch.cat(parts, dim=1), ids)
        row[:, span] = result.tokens[:, int(window.bos) : int(window.bos) + window.body].to(row.device)
        total.add_counts(result)
    total.tokens = row
    return total
