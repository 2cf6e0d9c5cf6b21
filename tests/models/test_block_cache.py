"""The block-causal denoiser's prefix cache ≡ the uncached forward, at TP=1 and TP=2 (two gloo ranks).

The independent truth is the one-stream forward over the whole row under the block-causal mask (itself
tested against the two-stream training forward in test_block_causal.py), on a row that holds the
committed clean blocks and then the current noisy block. The sampler's calls (docs/block_diffusion.md):

* prefill a prompt's whole blocks in one chunk (in-chunk mask block-causal on absolute positions),
* denoise the current block several times against the cache (``append=False``),
* commit the finished block (``append=True``), or fuse the commit with the next block's first step
  (a two-block chunk, ``append=b``: keep the first block only).

Tolerance: eps_fp32 × (widest reduction, the MLP's 4H) × n_blocks, relative to the largest logit.
"""

from __future__ import annotations

import pytest
import torch

from edlm_dist.errors import ConfigError
from tests.spawn import run_on_ranks

from model_helpers import randomised, tiny  # noqa: E402

V, L, BLOCK, ROWS, MASK = 13, 12, 3, 2, 12
CFG = tiny(block_size=BLOCK)
TOL = torch.finfo(torch.float32).eps * 4 * CFG.hidden_size * CFG.n_blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _noisy(block: torch.Tensor, seed: int) -> torch.Tensor:
    keep = torch.rand(block.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
    return torch.where(keep, block, torch.full_like(block, MASK))


def _reference(model, clean: torch.Tensor, j: int, x_t_block: torch.Tensor) -> torch.Tensor:
    """Uncached logits of block j: one stream [clean blocks < j, x_t block j, masks after]."""
    row = torch.full_like(clean, MASK)
    row[:, : j * BLOCK] = clean[:, : j * BLOCK]
    row[:, j * BLOCK : (j + 1) * BLOCK] = x_t_block
    return model(row, gather_logits=True)[:, j * BLOCK : (j + 1) * BLOCK]


@torch.no_grad()
def _errors() -> dict[str, float]:
    model = randomised("dit", CFG, seed=21, vocab=V, length=L).eval()
    clean = torch.randint(0, MASK, (ROWS, L), generator=torch.Generator().manual_seed(1))
    out = {"denoise": 0.0, "fused": 0.0, "prefill": 0.0}
    cache = model.new_cache()
    model(clean[:, : 2 * BLOCK], cache=cache)  # prompt of two whole blocks, one chunk
    out["prefill"] = _rel(model(_noisy(clean[:, 2 * BLOCK : 3 * BLOCK], 5), cache=cache, append=False,
                                gather_logits=True),
                          _reference(model, clean, 2, _noisy(clean[:, 2 * BLOCK : 3 * BLOCK], 5)))
    cache, fused = model.new_cache(), model.new_cache()
    for j in range(L // BLOCK):
        own = slice(j * BLOCK, (j + 1) * BLOCK)
        for step in range(3):  # many denoising calls against one cached prefix
            x_t = _noisy(clean[:, own], 10 * j + step)
            got = model(x_t, cache=cache, append=False, gather_logits=True)
            out["denoise"] = max(out["denoise"], _rel(got, _reference(model, clean, j, x_t)))
        assert cache.length == j * BLOCK
        model(clean[:, own], cache=cache)  # commit block j
        if j + 1 < L // BLOCK:  # commit j and take block j+1's first step in one call
            x_t = _noisy(clean[:, own.stop : own.stop + BLOCK], 99 + j)
            got = model(torch.cat([clean[:, own], x_t], dim=1), cache=fused, append=BLOCK, gather_logits=True)
            out["fused"] = max(out["fused"], _rel(got[:, BLOCK:], _reference(model, clean, j + 1, x_t)))
    out["lengths"] = (cache.length, fused.length)
    return out


def _check(errors: dict) -> None:
    for key in ("denoise", "fused", "prefill"):
        assert errors[key] < TOL, (key, errors[key], TOL)
    assert errors["lengths"] == (L, L - BLOCK)


def test_cached_block_logits_equal_uncached_tp1():
    _check(_errors())


def _tp2_rank() -> dict:
    from edlm_dist.config.load import load_config
    from edlm_dist.parallel.runtime import init_parallel

    init_parallel(load_config(None, ["parallel.tp=2"]))
    return _errors()


@pytest.mark.multirank
def test_cached_block_logits_equal_uncached_tp2():
    for errors in run_on_ranks(_tp2_rank, 2, timeout=240):
        _check(errors)


def test_cache_must_hold_whole_blocks():
    model = randomised("dit", CFG, seed=2, vocab=V, length=L).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long), cache=cache)
        with pytest.raises(ConfigError, match="whole number of blocks"):
            model(torch.zeros(1, BLOCK, dtype=torch.long), cache=cache, append=False)
        with pytest.raises(ConfigError, match="append"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(), append=3)
