"""Rows longer than the model's context: semi-autoregressive windows (spec §5.6).

A row of N > L tokens is written window by window, left to right. Each window is an ordinary
L-token sampling problem whose start state holds every token already committed (and every fixed
prompt/infill token it covers); the sampler fills the rest and the window's new tokens are
committed. The next window starts ``stride`` tokens later, so it keeps the last tokens of the
previous one as its prefix and writes ``stride`` new ones. The last window is aligned with the row's
end. Any sampler works as the window sampler (MDLM, EDLM with any energy: its proposals share the
window's fixed tokens and its energy sees them; the AR sampler).

Framing (a deliberate difference from MDLM's ``sample_subs_guidance``). Every training row ends
with EOS at position L-1 (``data/wrap.py``), so a denoiser puts EOS in a window's last slot, and the
reference's long samples carry an EOS at every window boundary (its README warns that Gen PPL needs
post-processing). Here a diffusion window that is not the row's last one holds L-1 positions of the
row plus a *placeholder* EOS in its last slot, fixed and never emitted: each window looks like a
training row and the long row is one document ``[BOS] ... [EOS]``. Its prefix is therefore
L-1-stride committed tokens. The last window is the row's real end (L positions); its last slot, the
row's final position, is fixed to EOS as well (when free): a denoiser knows where a row ends only from
the framing tokens (rotary attention is relative, and a later window has no BOS at its start), and
without it the demo MDLM left the final EOS out. The AR sampler never sees a later slot (causal), so its
windows are simply L-1 positions of the row and it writes the final EOS itself.

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
    placeholder: bool  # one extra fixed EOS slot after the body (not part of the row)


def window_plan(total: int, context: int, stride: int, *, causal: bool = False) -> list[Window]:
    """The windows that write a ``total``-token row with an L = ``context`` model (module docstring)."""
    if total <= context:
        return [Window(0, total, False)]
    if not 1 <= stride <= context - 2:
        raise ConfigError(f"sample.stride={stride} must be in [1, L-2] = [1, {context - 2}] so that every window "
                          "keeps a prefix of committed tokens")
    windows, start = [], 0
    while total - start > context:
        windows.append(Window(start, context - 1, not causal))
        start += stride
    windows.append(Window(total - context, context, False))
    return windows


WindowSampler = Callable[[torch.Tensor, list[int]], object]
"""``(x_init (B, L_w) with mask_id at free positions, window sample ids) -> SampleBatch``."""


def generate_long(fill: WindowSampler, x_init: torch.Tensor, sample_ids: Sequence[int], *, context: int,
                  stride: int, eos_id: int, mask_id: int, causal: bool = False):
    """Write rows of ``x_init.shape[1]`` tokens window by window with ``fill``; returns a SampleBatch whose
    counters (NFE, energies, ESS) are summed over the windows."""
    from edlm_dist.sampling.engine import SampleBatch

    row = x_init.clone()
    if not causal:  # the row's own end is a framing EOS too, so the last window also ends with one
        row[:, -1] = torch.where(row[:, -1] == mask_id, torch.full_like(row[:, -1], eos_id), row[:, -1])
    batch = row.shape[0]
    total = SampleBatch(tokens=row, row_ess_sum=torch.zeros(batch, dtype=torch.float64),
                        row_is_steps=torch.zeros(batch, dtype=torch.long))
    for index, window in enumerate(window_plan(row.shape[1], context, stride, causal=causal)):
        span = slice(window.start, window.start + window.body)
        state = row[:, span]
        if window.placeholder:
            state = torch.cat([state, torch.full_like(state[:, :1], eos_id)], dim=1)
        ids = [int(i) + index * WINDOW_ID_STRIDE for i in sample_ids]
        result = fill(state, ids)
        row[:, span] = result.tokens[:, : window.body].to(row.device)
        total.add_counts(result)
    total.tokens = row
    return total
