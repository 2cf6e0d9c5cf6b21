"""Incremental decoding: keys and values of a committed prefix, cached per attention layer.

A transformer that attends to a prefix it has already seen need not recompute it. :class:`KVCache`
holds, for every attention layer, the (rotated) keys and the values of the positions fed so far, and
a new *chunk* of ``c`` tokens at positions ``length .. length + c - 1`` attends to

* every cached position, and
* the chunk itself, with a mask chosen per call: ``"causal"`` (AR decoding, spec §5.7: token i of the
  chunk sees chunk tokens <= i), ``"full"`` (a block-causal denoiser: the block attends
  bidirectionally within itself and causally to the prefix, as in BD3-LM), or an integer b: block-causal
  in blocks of b *absolute* positions (a chunk of several denoiser blocks, e.g. a prompt's whole blocks,
  or a just-committed block fused with the next block's first denoising step; models/block_attention.py).

Cached decoding computes the same function as one forward over the whole row with the matching mask
(tested to float32 tolerance at TP=1 and TP=2, ``tests/models/test_kv_cache.py``).

Sharing one prefix among proposals. ``prefix.share(group=G)`` gives a *child* cache whose rows are
``G`` proposals per prefix row (batch-major: child row ``b * G + g`` continues prefix row ``b``). The
child reads the prefix's tensors in place (no copy, no ``expand``): queries of the G proposals of a row
are stacked along the query axis and multiplied with that row's prefix keys in one matmul, so the
prefix is stored and read once however many proposals use it. ``share(group=G, rows=idx)`` continues only
the prefix rows ``idx`` (child row ``r * G + g`` continues prefix row ``idx[r]``; their keys are gathered
once per call), for callers that score some rows only (the block-wise EDLM energies). Each child row appends its own
positions (its own block) to the child's own buffers. The prefix must not grow while a child is in use
(checked: a child whose prefix changed raises); make a new child after committing a block to the
prefix.

Usage (``ARTransformer.forward(tokens, cache=...)``)::

    cache = KVCache(capacity=L)                # empty; buffers are allocated on first use
    logits = ar(prompt, cache=cache)           # prefill: (B, p) -> logits of the p positions
    logits = ar(next_tok[:, None], cache=cache)  # one step; cache.length == p + 1
    child = cache.share(group=k)               # k proposals per row read the same prefix
    block_logits = ar(blocks.view(B * k, b), cache=child, append=False)  # score, keep nothing

``append=False`` scores a chunk without keeping it (the chunk's keys go to scratch space that the next
call overwrites); ``append=n`` (an int) keeps only the chunk's first n positions. Tensor parallelism
needs nothing special: each TP rank caches its own heads (the attention runs on local heads between the
column- and row-parallel projections).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from edlm_dist.errors import ConfigError

WITHIN_CHUNK = ("causal", "full")


class KVCache:
    """Cached keys/values of ``length`` positions for each attention layer (module docstring).

    Args:
        capacity: the most positions (prefix included) this cache will ever hold; the rotary tables
            and the buffers are sized by it.
        parent: a prefix cache to read without copying (use :meth:`share`).
        group: proposals per parent row (1 without a parent).
    """

    def __init__(self, capacity: int, *, parent: Optional["KVCache"] = None, group: int = 1,
                 rows: Optional[torch.Tensor] = None):
        if capacity < 1 or group < 1:
            raise ConfigError(f"KVCache needs capacity >= 1 and group >= 1, got {capacity} and {group}")
        if parent is not None and parent.parent is not None:
            raise ConfigError("a shared prefix must be a root cache (share() from the prefix, not from a child)")
        if parent is None and group != 1:
            raise ConfigError("group > 1 needs a parent prefix cache; use prefix.share(group=G)")
        self.capacity = int(capacity)
        if rows is not None and parent is None:
            raise ConfigError("rows= selects rows of a shared prefix; use prefix.share(group=G, rows=...)")
        self.parent, self.group = parent, int(group)
        self.parent_rows = rows  # None: every prefix row, in order
        self.start = parent.length if parent is not None else 0
        self._parent_version = parent.version if parent is not None else 0
        self.keys: list[torch.Tensor] = []  # per layer (rows, heads, capacity - start, head_dim)
        self.values: list[torch.Tensor] = []
        self.own_length = 0
        self.version = 0  # bumped whenever positions are appended (children check it)

    @property
    def length(self) -> int:
        """Positions cached so far (prefix included): the next chunk starts at this position."""
        return self.start + self.own_length

    def share(self, group: int, capacity: Optional[int] = None, rows: Optional[torch.Tensor] = None) -> "KVCache":
        """A child for ``group`` proposals per row that reads this prefix in place (module docstring); ``rows``
        (R,) long: continue only these prefix rows, in this order."""
        return KVCache(capacity or self.capacity, parent=self, group=group, rows=rows)

    def check_room(self, chunk: int) -> None:
        if self.parent is not None and self.parent.version != self._parent_version:
            raise ConfigError("the shared prefix cache grew after this child was made; call prefix.share() again")
        if self.length + chunk > self.capacity:
            raise ConfigError(f"KVCache holds {self.length} of {self.capacity} positions and cannot take {chunk} "
                              "more; make it with a larger capacity")

    def advance(self, chunk: int) -> None:
        """Keep the last chunk written by every layer (the model calls this after its blocks)."""
        self.own_length += int(chunk)
        self.version += 1

    def scored_chunk(self, child_rows: torch.Tensor, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The keys and values (per layer, (R, heads, count, d)) of the first ``count`` positions this child's
        rows ``child_rows`` last fed (kept or ``append=False`` scratch): what those tokens would add to the
        parent. Refuses a child whose parent grew since (its chunk no longer continues the parent)."""
        if self.parent is None or self.own_length != 0 or self._parent_version != self.parent.version:
            raise ConfigError("scored_chunk() reads an append=False chunk of a child made at its parent's length")
        return ([k[child_rows, :, :count] for k in self.keys], [v[child_rows, :, :count] for v in self.values])

    def adopt(self, rows: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write given keys/values (per layer, (R, heads, count, d)) for this root cache's ``rows``. Once every
        row is written (several calls may share the rows out), :meth:`advance` by ``count`` keeps them. A
        proposal scored by a child against this prefix and then committed joins the cache this way without
        another model call (block-wise EDLM, sampling/prefix_energies.py); keys computed on another rank can
        be written the same way."""
        if self.parent is not None:
            raise ConfigError("adopt() writes into a root cache; call it on the shared prefix")
        count = keys[0].shape[2]
        self.check_room(count)
        for layer, (new_k, new_v) in enumerate(zip(keys, values)):
            if len(self.keys) <= layer:
                raise ConfigError("adopt() needs a cache that has run once (its buffers hold every row)")
            self.keys[layer][rows, :, self.own_length : self.own_length + count] = new_k
            self.values[layer][rows, :, self.own_length : self.own_length + count] = new_v

    def allocate(self, rows: int, layers: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        """Create the buffers of an unused cache for ``rows`` rows (dtype and device of ``like``)."""
        for layer in range(layers):
            self._buffers(layer, like.new_empty((rows, heads, 0, head_dim)))

    def _buffers(self, layer: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:  # allocated on first use, in the chunk's dtype and device
            rows, heads, _, head_dim = k.shape
            shape = (rows, heads, self.capacity - self.start, head_dim)
            self.keys.append(k.new_empty(shape))
            self.values.append(k.new_empty(shape))
        if self.keys[layer].shape[0] != k.shape[0]:
            raise ConfigError(f"the cache has {self.keys[layer].shape[0]} rows but the chunk has {k.shape[0]}; "
                              "feed the same rows every call (B, or B * group for a shared prefix)")
        return self.keys[layer], self.values[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, within: str) -> torch.Tensor:
        """Attention of a chunk's (N, heads, c, d) rotated q/k/v to the cache plus itself -> (N, heads, c, d).

        The chunk's k/v are written at this cache's next free slots (kept only if :meth:`advance` follows).
        """
        if within not in WITHIN_CHUNK and not (isinstance(within, int) and within >= 1):
            raise ConfigError(f"within='{within}' is unknown; use one of {list(WITHIN_CHUNK)} or a block size >= 1")
        chunk, mine = q.shape[2], self.own_length
        keys, values = self._buffers(layer, k)
        keys[:, :, mine : mine + chunk] = k
        values[:, :, mine : mine + chunk] = v
        own_k, own_v = keys[:, :, : mine + chunk], values[:, :, : mine + chunk]
        visible = _chunk_mask(mine, chunk, within, q.device, first=self.start)  # (c, mine + c) or None: all visible
        if self.parent is None or self.start == 0:
            return F.scaled_dot_product_attention(q, own_k, own_v, attn_mask=visible)
        return self._attend_shared(layer, q, own_k, own_v, visible)

    def _attend_shared(self, layer, q, own_k, own_v, visible) -> torch.Tensor:
        """One softmax over [shared prefix, own positions]; the prefix is read once per parent row."""
        prefix_k = self.parent.keys[layer][:, :, : self.start]  # (B, heads, T, d), a view
        prefix_v = self.parent.values[layer][:, :, : self.start]
        if self.parent_rows is not None:  # only some prefix rows continue: one gather per call
            index = self.parent_rows.to(prefix_k.device)
            prefix_k, prefix_v = prefix_k.index_select(0, index), prefix_v.index_select(0, index)
        rows, heads, chunk, head_dim = q.shape
        batch, group = prefix_k.shape[0], self.group
        if rows != batch * group:
            raise ConfigError(f"a child of a {batch}-row prefix with group={group} takes {batch * group} rows, "
                              f"got {rows}")
        scale = 1.0 / math.sqrt(head_dim)

        def fold(x):  # (B*G, heads, c, n) -> (B, heads, G*c, n): a row's proposals share one matmul
            return x.view(batch, group, heads, chunk, -1).transpose(1, 2).reshape(batch, heads, group * chunk, -1)

        def unfold(x):  # inverse of fold
            return x.view(batch, heads, group, chunk, -1).transpose(1, 2).reshape(rows, heads, chunk, -1)

        prefix_scores = unfold(fold(q) @ prefix_k.transpose(-1, -2)) * scale
        own_scores = (q @ own_k.transpose(-1, -2)) * scale
        if visible is not None:
            own_scores = own_scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).float(), dim=-1).to(q.dtype)
        prefix_probs, own_probs = probs.split([self.start, own_k.shape[2]], dim=-1)
        return unfold(fold(prefix_probs) @ prefix_v) + own_probs @ own_v

    def layer(self, index: int, within: str) -> "LayerCache":
        return LayerCache(self, index, within)


class LayerCache:
    """The handle one attention layer gets: which cache, which layer, which in-chunk mask."""

    def __init__(self, cache: KVCache, index: int, within: str):
        self.cache, self.index, self.within = cache, index, within

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache.attend(self.index, q, k, v, self.within)


def _chunk_mask(cached: int, chunk: int, within, device, first: int = 0) -> Optional[torch.Tensor]:
    """(c, cached + c) bool, True = may attend; None when everything is visible (a 1-token or full chunk).

    ``first`` is the absolute position of this cache's own slot 0 (a child starts after its prefix):
    integer ``within`` blocks are counted on absolute positions.
    """
    if isinstance(within, int) and not isinstance(within, bool):
        keys = torch.div(torch.arange(first, first + cached + chunk, device=device), within, rounding_mode="floor")
        queries = keys[cached:]
        if queries[-1] == keys[0]:  # the chunk and the cached keys share one block: all visible
            return None
        return keys[None, :] <= queries[:, None]
    if within == "full" or chunk == 1:
        return None
    mask = torch.ones((chunk, cached + chunk), dtype=torch.bool, device=device)
    mask[:, cached:] = torch.ones((chunk, chunk), dtype=torch.bool, device=device).tril()
    return mask


def run_blocks_cached(blocks, x: torch.Tensor, rotary, cache: KVCache, *, cond: Optional[torch.Tensor] = None,
                      within, append: bool | int = True) -> torch.Tensor:
    """Run transformer ``blocks`` on a chunk ``x`` (N, c, H) at positions ``cache.length ..`` with ``cache``.

    The rotary angles are those of the chunk's absolute positions. With ``append`` the chunk joins the
    cache (the next call continues after it); ``False`` leaves the cache as it was; an int n keeps the
    chunk's first n positions (their keys were computed without seeing the rest when ``within`` masks
    the rest from them, as a block-causal mask does for a committed block before the next one).
    """
    chunk = x.shape[1]
    cache.check_room(chunk)
    cos, sin = rotary.cos_sin(cache.capacity, x.device)
    start = cache.length
    cos, sin = cos[start : start + chunk], sin[start : start + chunk]
    for index, block in enumerate(blocks):
        x = block(x, cos, sin, cond, kv=cache.layer(index, within))
    keep = chunk if append is True else 0 if append is False else int(append)
    if not 0 <= keep <= chunk:
        raise ConfigError(f"append={append} must be a bool or 0..{chunk} positions of the chunk")
    if keep:
        cache.advance(keep)
    return x
