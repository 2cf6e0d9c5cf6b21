"""SUBS parameterisation: mask suppression (also on vocabulary shards), normalisation, carry-over (spec §4.1)."""

from __future__ import annotations

import torch

from edlm_dist.objectives.subs import NEG_INF, gather_token_log_probs, subs_log_probs, suppress_mask_logit
from tests.tolerances import assert_close_across


def _setup():
    g = torch.Generator().manual_seed(0)
    batch, length, vocab, mask_id = 2, 5, 6, 5
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 3
    x_t = torch.tensor([[5, 1, 5, 0, 5], [2, 5, 5, 4, 3]])
    return logits, x_t, mask_id


def test_masked_rows_are_softmax_without_mask_token():
    logits, x_t, mask_id = _setup()
    log_mu = subs_log_probs(logits, x_t, mask_id)
    assert log_mu.dtype == torch.float64
    for b in range(x_t.shape[0]):
        for i in range(x_t.shape[1]):
            if x_t[b, i] == mask_id:
                expected = torch.log_softmax(logits[b, i, :mask_id], dim=-1)  # real tokens only
                torch.testing.assert_close(log_mu[b, i, :mask_id], expected, rtol=0, atol=1e-12)
                assert log_mu[b, i, mask_id].exp().item() == 0.0
                torch.testing.assert_close(log_mu[b, i].exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_carry_over_rows_are_one_hot():
    logits, x_t, mask_id = _setup()
    log_mu = subs_log_probs(logits, x_t, mask_id)
    for b in range(x_t.shape[0]):
        for i in range(x_t.shape[1]):
            token = int(x_t[b, i])
            if token != mask_id:
                expected = torch.full((logits.shape[-1],), NEG_INF, dtype=torch.float64)
                expected[token] = 0.0
                assert torch.equal(log_mu[b, i], expected)
    # gathered at the observed tokens the carried-over positions give exactly log 1 = 0
    picked = gather_token_log_probs(log_mu, x_t)
    assert picked.shape == x_t.shape
    assert bool((picked[x_t != mask_id] == 0).all())


def test_low_precision_logits_are_upcast():
    logits, x_t, mask_id = _setup()
    log_mu = subs_log_probs(logits.to(torch.bfloat16), x_t, mask_id)
    assert log_mu.dtype == torch.float32
    reference = subs_log_probs(logits.to(torch.bfloat16).double(), x_t, mask_id)
    assert_close_across(log_mu.double(), reference, dtype=torch.float32, reduction_size=logits.shape[-1])


def test_suppression_on_vocab_shards_matches_dense():
    logits, _, mask_id = _setup()
    dense = suppress_mask_logit(logits, mask_id)
    assert bool((dense[..., mask_id] == NEG_INF).all())
    assert torch.equal(dense[..., :mask_id], logits[..., :mask_id])
    # two shards [0, 3) and [3, 6): only the shard holding mask id 5 changes
    shard0 = suppress_mask_logit(logits[..., :3], mask_id, vocab_start=0)
    shard1 = suppress_mask_logit(logits[..., 3:], mask_id, vocab_start=3)
    assert torch.equal(shard0, logits[..., :3])
    assert torch.equal(torch.cat([shard0, shard1], dim=-1), dense)
    # out of place: the input is untouched, and gradients flow to all other columns
    leaf = logits.clone().requires_grad_(True)
    suppress_mask_logit(leaf, mask_id).sum().backward()
    assert bool((leaf.grad[..., :mask_id] == 1).all()) and bool((leaf.grad[..., mask_id] == 0).all())
    assert not bool((logits[..., mask_id] == NEG_INF).any())
