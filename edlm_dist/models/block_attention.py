"""Attention masks of the block-causal (block-diffusion) denoiser (BD3-LM, Arriola et al. 2025, §3).

A row of L tokens is cut into blocks of b consecutive positions; position i lies in block i // b
(the last block may be shorter). The denoiser of block j sees the noisy block j bidirectionally and
the *clean* blocks < j; nothing after block j. Every mask here is a dense boolean (queries, keys)
matrix with True = may attend, as ``F.scaled_dot_product_attention`` takes it. b >= L is plain
bidirectional attention (today's MDLM): callers pass no mask at all then (:func:`needs_block_mask`).

Three layouts, all the same rule ("a query sees keys of its own block and of earlier blocks of the
clean stream"):

* :func:`block_causal_mask` (L, L), one stream. Query block j sees blocks <= j. When blocks < j hold
  committed (clean) tokens, the logits of block j are exactly the training-time logits: the hidden
  states of blocks < j are those of the clean stream below. This is the uncached reference.
* :func:`two_stream_mask` (2L, 2L) for training, on the concatenation [x_t ; x_0] (BD3-LM's
  vectorised objective): noisy block j sees noisy block j and clean blocks < j; clean block j sees
  clean blocks <= j (the same keys a sampler caches); no clean query ever sees a noisy key.
* :func:`chunk_mask` (n, P + n): a chunk of n new positions [P, P + n) after a cached prefix of P
  positions. It is the slice of the one-stream mask, so cached and uncached logits agree by
  construction (tested to fp32 tolerance).

Masks are cached per (shape, device): they are built once per length, not per forward.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def needs_block_mask(length: int, block_size: int) -> bool:
    """False when one block covers the whole row: bidirectional attention, no mask (MDLM)."""
    return block_size < length


def block_index(positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(positions, block_size, rounding_mode="floor")


@lru_cache(maxsize=64)
def _block_causal(query_start: int, query_len: int, key_len: int, block_size: int, device: str) -> torch.Tensor:
    queries = block_index(torch.arange(query_start, query_start + query_len, device=device), block_size)
    keys = block_index(torch.arange(key_len, device=device), block_size)
    return keys[None, :] <= queries[:, None]


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, L) bool: position q may attend to position k iff block(k) <= block(q)."""
    return _block_causal(0, length, length, block_size, str(device))


def chunk_mask(prefix_len: int, chunk_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, P + n) bool for new positions [P, P + n) against [cached prefix ; themselves].

    Rows are rows P..P+n-1 of :func:`block_causal_mask` of length P + n. The prefix must end on a
    block boundary for the cached keys to be clean-stream keys (the caller's contract; see dit.py).
    """
    return _block_causal(prefix_len, chunk_len, prefix_len + chunk_len, block_size, str(device))


@lru_cache(maxsize=16)
def _two_stream(length: int, block_size: int, device: str) -> torch.Tensor:
    blocks = block_index(torch.arange(length, device=device), block_size)
    same = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]  # key block < query block
    no = torch.zeros(length, length, dtype=torch.bool, device=device)
    noisy_queries = torch.cat([same, earlier], dim=1)  # [noisy keys | clean keys]
    clean_queries = torch.cat([no, same | earlier], dim=1)
    return torch.cat([noisy_queries, clean_queries], dim=0)


def two_stream_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2L, 2L) bool for the training input [x_t ; x_0] (BD3-LM's M_BD | M_OBC | M_BC)."""
    return _two_stream(length, block_size, str(device))
