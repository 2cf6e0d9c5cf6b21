"""Seeded random streams for sampling: one generator per (seed, stream, step, sample id, proposal j).

Every draw of :mod:`edlm_dist.sampling.engine` takes its numbers from a fresh generator seeded by
:func:`stream_seed`, so sample i is the same whatever the batch size, the data-parallel layout, or which
rank drew which proposal (docs/sampling.md). :func:`stream_categorical` draws many such streams in one
vectorised race and gives exactly the numbers of one ``sample_categorical`` call per stream.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Optional, Sequence

import torch

from edlm_dist.sampling.categorical import DEFAULT_MAX_CHUNK_ELEMENTS, race_with_noise, sample_categorical

STREAM_PROPOSAL, STREAM_RESAMPLE, STREAM_STEP, STREAM_TOKEN = 1, 2, 3, 4  # TOKEN: the AR sampler, per position


def stream_seed(seed: int, stream: int, step: int, sample_id: int, proposal: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments (BLAKE2b of the packed tuple)."""
    packed = struct.pack("<5Q", *(int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, stream, step, sample_id, proposal)))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def stream_generator(device: torch.device, seed: int, stream: int, step: int, sample_id: int,
                     proposal: int = 0) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream, step, sample_id, proposal))
    return generator


MAX_RACE_ELEMENTS = DEFAULT_MAX_CHUNK_ELEMENTS  # elements of one vectorised noise tensor (256 MiB in float64)


def fill_from_streams(out: torch.Tensor, seeds: Sequence[int], distribution: str) -> torch.Tensor:
    """Slice n of ``out`` gets the numbers a fresh generator seeded ``seeds[n]`` draws for a tensor of the
    slice's shape (a contiguous slice is filled like a new tensor; the per-row reference test checks it)."""
    generator = torch.Generator(device=out.device)
    for n, seed in enumerate(seeds):
        generator.manual_seed(seed)
        if distribution == "exponential":
            out[n].exponential_(generator=generator)
        else:
            out[n].uniform_(0.0, 1.0, generator=generator)
    return out


def stream_categorical(probs: torch.Tensor, seeds: Sequence[int], dtype: torch.dtype,
                       index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw n = ``sample_categorical(probs[index[n]], generator=<fresh, seeded seeds[n]>, dtype=dtype)`` for
    every n, -> (N, ...) long; one race per chunk of slices instead of N Python-level calls.

    ``probs`` is (R, ..., V); ``index`` (N,) picks the row of each draw (default: draw n uses row n).
    """
    index = torch.arange(probs.shape[0], device=probs.device) if index is None else index.to(probs.device)
    per_draw = probs[0].numel()
    out = torch.empty((len(seeds), *probs.shape[1:-1]), dtype=torch.long, device=probs.device)
    if per_draw > DEFAULT_MAX_CHUNK_ELEMENTS:  # sample_categorical would split one draw: keep its exact calls
        for n, seed in enumerate(seeds):
            generator = torch.Generator(device=probs.device).manual_seed(seed)
            out[n] = sample_categorical(probs[index[n]], generator=generator, dtype=dtype)
        return out
    per_chunk = max(1, MAX_RACE_ELEMENTS // per_draw)
    for start in range(0, len(seeds), per_chunk):
        stop = min(len(seeds), start + per_chunk)
        noise = torch.empty((stop - start, *probs.shape[1:]), dtype=dtype, device=probs.device)
        fill_from_streams(noise, seeds[start:stop], "exponential")
        out[start:stop] = race_with_noise(probs[index[start:stop]], noise)
    return out
