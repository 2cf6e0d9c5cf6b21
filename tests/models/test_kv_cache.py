"""KV-cache decoding ≡ recomputing the whole row, at TP=1 (this process) and TP=2 (two gloo ranks).

The independent truth is one forward over the whole row: the causal AR model for AR decoding, and for
the in-chunk "full" mask (a block-causal denoiser) the DiT blocks run over the whole row with an
explicit block-causal attention mask. Cached logits must agree with it to float32 tolerance: the
evaluation order changes (split softmax, chunked matmuls), so the tolerance is the suite's rule for
an fp32 network (tests/tolerances.py) relative to the largest logit, not bitwise equality.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import ConfigError
from edlm_dist.models.kv_cache import KVCache, run_blocks_cached
from tests.spawn import run_on_ranks

from model_helpers import L, V, randomised, tiny
from tests.tolerances import network_reduction_size, tolerance

CFG = tiny()
TOL = tolerance(torch.float32, network_reduction_size(CFG, L, V))[0]  # ≈ 3.4e-5
ROWS, PREFIX, BLOCK, GROUP = 2, 3, 3, 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _rows(seed: int, n: int = ROWS) -> torch.Tensor:
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def _ar_errors(model) -> dict[str, float]:
    """Each decoding pattern's worst relative logit error against the full causal forward."""
    rows = _rows(1)
    full = model(rows, gather_logits=True)
    out = {}
    cache = model.new_cache()  # one token at a time
    out["token_by_token"] = max(_rel(model(rows[:, i : i + 1], gather_logits=True, cache=cache), full[:, i : i + 1])
                                for i in range(L))
    cache, start, worst = model.new_cache(), 0, 0.0  # prefill then uneven chunks
    for size in (3, 1, 4):
        worst = max(worst, _rel(model(rows[:, start : start + size], gather_logits=True, cache=cache),
                                full[:, start : start + size]))
        start += size
    out["chunks_3_1_4"] = worst
    # append=False leaves the cache as it was: score a chunk, then decode the true continuation.
    cache = model.new_cache()
    model(rows[:, :PREFIX], cache=cache)
    model(_rows(9)[:, PREFIX : PREFIX + 2], cache=cache, append=False)
    out["after_append_false"] = _rel(model(rows[:, PREFIX:], gather_logits=True, cache=cache), full[:, PREFIX:])
    out["length_after"] = cache.length
    # A prefix shared by GROUP proposals per row, each with its own block and then one more chunk.
    proposals = _rows(2, ROWS * GROUP)
    proposals[:, :PREFIX] = rows[:, :PREFIX].repeat_interleave(GROUP, dim=0)  # row b*G+g continues row b
    reference = model(proposals, gather_logits=True)
    prefix = model.new_cache()
    model(rows[:, :PREFIX], cache=prefix)
    child = prefix.share(group=GROUP)
    blocks = model(proposals[:, PREFIX : PREFIX + BLOCK], gather_logits=True, cache=child)
    tail = model(proposals[:, PREFIX + BLOCK :], gather_logits=True, cache=child)
    out["shared_prefix_block"] = _rel(blocks, reference[:, PREFIX : PREFIX + BLOCK])
    out["shared_prefix_tail"] = _rel(tail, reference[:, PREFIX + BLOCK :])
    out["prefix_rows_stored"] = prefix.keys[0].shape[0]
    return out


class _MaskedAttention:
    """The reference's attention: whole-row SDPA with an explicit (L, L) mask (same interface as LayerCache)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _block_causal_mask(bounds: list[int]) -> torch.Tensor:
    block = torch.zeros(L, dtype=torch.long)
    for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        block[lo:hi] = index
    return block[:, None] >= block[None, :]  # a position sees its own block and every earlier one


def _dit_full_within_errors(dit) -> dict[str, float]:
    """Blocks of a DiT (time conditioning off) run chunk by chunk with in-chunk mask "full", including a
    prefix shared by GROUP proposals, against the whole row under the block-causal mask."""
    bounds = [0, PREFIX, PREFIX + BLOCK, L]
    proposals = _rows(3, ROWS * GROUP)
    proposals[:, :PREFIX] = proposals[::GROUP, :PREFIX].repeat_interleave(GROUP, dim=0)
    cond = dit.condition(None, 1, proposals.device)
    x = dit.vocab_embed(proposals)
    cos, sin = dit.rotary.cos_sin(L, x.device)
    mask, reference = _block_causal_mask(bounds), x
    for block in dit.blocks:
        reference = block(reference, cos, sin, cond, kv=_MaskedAttention(mask))
    prefix = KVCache(L)
    got = [run_blocks_cached(dit.blocks, x[::GROUP, :PREFIX], dit.rotary, prefix, cond=cond, within="full")]
    got[0] = got[0].repeat_interleave(GROUP, dim=0)
    child = prefix.share(group=GROUP)
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        got.append(run_blocks_cached(dit.blocks, x[:, lo:hi], dit.rotary, child, cond=cond, within="full"))
    return {"block_causal_full": _rel(torch.cat(got, dim=1), reference)}


def _all_errors() -> dict[str, float]:
    torch.manual_seed(0)
    with torch.no_grad():
        out = _ar_errors(randomised("ar", CFG, seed=11).eval())
        out.update(_dit_full_within_errors(randomised("dit", CFG, seed=12).eval()))
    return out


def _tp2_rank() -> dict[str, float]:
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel

    init_parallel(load_config(None, ["parallel.tp=2"]))
    return _all_errors()


ERROR_KEYS = ["token_by_token", "chunks_3_1_4", "after_append_false", "shared_prefix_block", "shared_prefix_tail",
              "block_causal_full"]


def test_cached_decoding_matches_full_recompute_tp1():
    errors = _all_errors()
    for key in ERROR_KEYS:
        assert errors[key] < TOL, (key, errors[key], TOL)
    assert errors["length_after"] == L  # the append=False chunk did not stay
    assert errors["prefix_rows_stored"] == ROWS  # the shared prefix is stored once per row, not per proposal


@pytest.mark.multirank
def test_cached_decoding_matches_full_recompute_tp2():
    for rank, errors in enumerate(run_on_ranks(_tp2_rank, 2, timeout=240)):
        for key in ERROR_KEYS:
            assert errors[key] < TOL, (rank, key, errors[key], TOL)
        assert errors["prefix_rows_stored"] == ROWS


def test_cache_refuses_overflow_and_a_grown_prefix():
    model = randomised("ar", ModelConfig(hidden_size=16, n_blocks=1, n_heads=2, cond_dim=8), seed=3).eval()
    rows = _rows(4)
    with torch.no_grad():
        cache = model.new_cache(capacity=4)
        model(rows[:, :3], cache=cache)
        with pytest.raises(ConfigError, match="cannot take 2 more"):
            model(rows[:, 3:5], cache=cache)
        child = cache.share(group=2)
        model(rows[:, 3:4], cache=cache)  # the prefix grows under its child
        with pytest.raises(ConfigError, match="grew after this child"):
            model(rows.repeat_interleave(2, dim=0)[:, 3:4], cache=child)
    with pytest.raises(ConfigError, match="within"):
        KVCache(4).attend(0, *(torch.zeros(1, 1, 1, 2),) * 3, within="bidirectional")
