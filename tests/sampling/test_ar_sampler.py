"""The AR baseline sampler (spec §5.7) draws rows from the AR model's own distribution.

Truth: every row of a tiny vocabulary is enumerated and scored by one full (uncached) forward; the
row law is the product of the next-token distributions, tempered and truncated by a loop-based
reference of top-k / top-p. The sampler (KV cache, float64 race, seeded streams) must match it outcome
by outcome within 4.5 sigma of its Monte-Carlo error.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import SamplingError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_state_dict, load_full_state_dict
from edlm_dist.sampling.ar_sampler import sample_ar_batch
from edlm_dist.sampling.settings import SamplerSettings

V, L, MASK, BOS = 6, 4, 5, 4  # tokens 0..4 (4 doubles as BOS), 5 = mask


def _ar_model(seed: int = 0, length: int = L):
    torch.manual_seed(seed)
    model = build_model("ar", ModelConfig(hidden_size=16, n_blocks=2, n_heads=2, cond_dim=8), V, length)
    g = torch.Generator().manual_seed(seed + 1)
    load_full_state_dict(model, {k: torch.randn(v.shape, generator=g) * (1.2 / math.sqrt(v.shape[-1]))
                                 if v.dim() == 2 else 0.3 * torch.randn(v.shape, generator=g)
                                 for k, v in full_state_dict(model).items()})
    return model.eval()


def _reference_step(log_p: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """One next-token law, written out with Python lists (independent of the sampler's tensor code)."""
    weights = [math.exp(v / temperature) for v in log_p]
    total = sum(weights)
    probs = [w / total for w in weights]
    ranked = sorted(range(len(probs)), key=lambda v: -probs[v])
    keep = set(ranked[:top_k] if top_k else ranked)
    if top_p < 1.0:
        nucleus, mass = set(), 0.0
        for v in ranked:
            nucleus.add(v)
            mass += probs[v]
            if mass >= top_p:
                break
        keep &= nucleus
    kept = sum(probs[v] for v in keep)
    return [probs[v] / kept if v in keep else 0.0 for v in range(len(probs))]


def _exact_law(model, prompt: list[int], temperature: float, top_k: int, top_p: float) -> dict[tuple, float]:
    free = L - 1 - len(prompt)
    rows = [[BOS, *prompt, *rest] for rest in itertools.product(range(MASK), repeat=free)]
    with torch.no_grad():
        log_p = model.log_probs(torch.tensor(rows), MASK).double()  # full forward, no cache
    law = {}
    for n, row in enumerate(rows):
        p = 1.0
        for i in range(1 + len(prompt), L):
            p *= _reference_step(log_p[n, i - 1].tolist(), temperature, top_k, top_p)[row[i]]
        law[tuple(row)] = p
    return law


@pytest.mark.parametrize("prompt,temperature,top_k,top_p", [([], 1.0, 0, 1.0), ([2], 0.7, 3, 1.0),
                                                            ([], 1.6, 0, 0.7)])
def test_row_law_equals_the_ar_models_own(prompt, temperature, top_k, top_p):
    model, rows = _ar_model(), 6000
    law = _exact_law(model, prompt, temperature, top_k, top_p)
    settings = SamplerSettings(sampler="ar", temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    x_init = torch.full((rows, L), MASK)
    x_init[:, 1 : 1 + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    out = sample_ar_batch(model, settings, range(rows), length=L, mask_id=MASK, bos_id=BOS, x_init=x_init)
    counts: dict[tuple, int] = {}
    for row in out.tokens.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= set(law), "a row outside the enumerated support (mask drawn, prompt or BOS changed)"
    for row, p in law.items():
        sigma = math.sqrt(p * (1 - p) / rows)
        # 4.5 sigma, plus 3 draws of slack for rare outcomes (P(Poisson(0.1) >= 4) ~ 4e-6)
        assert abs(counts.get(row, 0) / rows - p) <= 4.5 * sigma + 3 / rows, (row, counts.get(row, 0) / rows, p)
    assert out.nfe == L - 1 - len(prompt)  # prefill + one call per drawn token but the last
    if top_k or top_p < 1:  # truncation really removed outcomes
        assert sum(p == 0 for p in law.values()) > 0


def test_cache_off_draws_the_same_rows_and_rows_do_not_depend_on_the_batch():
    model = _ar_model(seed=5, length=8)
    settings = SamplerSettings(sampler="ar", seed=9)
    x_init = torch.full((10, 8), MASK)
    x_init[:3, 1:4] = torch.tensor([1, 2, 3])  # rows with a prompt next to rows without one
    cached = sample_ar_batch(model, settings, range(10), length=8, mask_id=MASK, bos_id=BOS, x_init=x_init)
    uncached = sample_ar_batch(model, SamplerSettings(sampler="ar", seed=9, kv_cache=False), range(10), length=8,
                               mask_id=MASK, bos_id=BOS, x_init=x_init)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.nfe == 7 and uncached.nfe == 7  # the uncached calls each process the whole prefix
    parts = [sample_ar_batch(model, settings, ids, length=8, mask_id=MASK, bos_id=BOS, x_init=x_init[ids]).tokens
             for ids in (list(range(0, 4)), list(range(4, 10)))]
    assert torch.equal(torch.cat(parts), cached.tokens)
    assert torch.equal(cached.tokens[:3, 1:4], x_init[:3, 1:4]) and bool((cached.tokens[:, 0] == BOS).all())
    assert bool((cached.tokens != MASK).all())


def test_gaps_and_truncation_outside_ar_are_refused():
    model = _ar_model()
    x_init = torch.full((1, L), MASK)
    x_init[0, 2] = 1  # position 1 free, position 2 fixed: infilling, which AR cannot do
    with pytest.raises(SamplingError, match="cannot fill gaps"):
        sample_ar_batch(model, SamplerSettings(sampler="ar"), [0], length=L, mask_id=MASK, bos_id=BOS, x_init=x_init)
    with pytest.raises(SamplingError, match="sampler=ar only"):
        SamplerSettings(sampler="mdlm", top_k=5)
    with pytest.raises(SamplingError, match="top_p"):
        SamplerSettings(sampler="ar", top_p=0.0)
