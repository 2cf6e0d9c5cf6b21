"""MDLM NELBO, AR loss, NCE loss and NCE negatives against brute-force loops (spec §4.2, §4.3, §6.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.objectives.losses import ar_loss, mdlm_loss, nce_loss
from edlm_dist.sampling.categorical import sample_nce_negatives
from edlm_dist.objectives.schedule import LogLinearSchedule
from edlm_dist.objectives.subs import gather_token_log_probs, subs_log_probs

MASK = 5
VOCAB = 6


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, length = 3, 7
    logits = torch.randn(batch, length, VOCAB, generator=g, dtype=torch.float64) * 2
    x0 = torch.randint(0, MASK, (batch, length), generator=g)
    masked = torch.rand(batch, length, generator=g) < 0.5
    masked[0, 0] = True  # at least one masked token
    x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
    t = torch.tensor([0.05, 0.5, 0.93], dtype=torch.float64)
    return logits, x0, x_t, t


def _brute_force_nelbo(logits, x0, x_t, t):
    total = 0.0
    batch, length, _ = logits.shape
    for b in range(batch):
        for i in range(length):
            if x_t[b, i] == MASK:
                row = logits[b, i].clone()
                row[MASK] = -1e6
                total += -(row[x0[b, i]] - torch.logsumexp(row, dim=0)).item() / t[b].item()
    return total / (batch * length)


def test_mdlm_loss_matches_brute_force_and_subs():
    logits, x0, x_t, t = _batch()
    loss, stats = mdlm_loss(logits, x0, x_t, t, MASK, schedule=LogLinearSchedule())
    assert loss.item() == pytest.approx(_brute_force_nelbo(logits, x0, x_t, t), rel=1e-12)
    # the same number via SUBS log-probs (carry-over gives 0 at unmasked positions)
    token_log_mu = gather_token_log_probs(subs_log_probs(logits, x_t, MASK), x0)
    via_subs = -(token_log_mu / t[:, None]).sum() / x0.numel()
    assert loss.item() == pytest.approx(via_subs.item(), rel=1e-12)
    assert float(stats["tokens"]) == x0.numel()
    assert float(stats["masked_tokens"]) == int((x_t == MASK).sum())
    assert float(stats["nll_sum"]) == pytest.approx(loss.item() * x0.numel(), rel=1e-12)
    assert float(stats["masked_ce_sum"]) == pytest.approx(-token_log_mu.sum().item(), rel=1e-12)


def test_mdlm_loss_is_zero_without_masks_and_has_no_gradient_there():
    logits, x0, _, t = _batch()
    logits = logits.clone().requires_grad_(True)
    loss, stats = mdlm_loss(logits, x0, x0.clone(), t, MASK, schedule=LogLinearSchedule())
    assert loss.item() == 0.0
    loss.backward()
    assert bool((logits.grad == 0).all())
    assert float(stats["masked_tokens"]) == 0.0


def test_mdlm_loss_gradient_only_at_masked_positions():
    logits, x0, x_t, t = _batch(1)
    logits = logits.clone().requires_grad_(True)
    mdlm_loss(logits, x0, x_t, t, MASK, schedule=LogLinearSchedule())[0].backward()
    unmasked = x_t != MASK
    assert bool((logits.grad[unmasked] == 0).all())
    assert bool((logits.grad[~unmasked].abs().sum(-1) > 0).all())


def test_cross_entropy_hook_is_used():
    logits, x0, x_t, t = _batch()
    calls = []

    def doubled(logits2d, targets):
        calls.append(tuple(logits2d.shape))
        return 2.0 * F.cross_entropy(logits2d, targets, reduction="none")

    plain, _ = mdlm_loss(logits, x0, x_t, t, MASK, schedule=LogLinearSchedule())
    hooked, _ = mdlm_loss(logits, x0, x_t, t, MASK, schedule=LogLinearSchedule(), cross_entropy=doubled)
    assert calls == [(x0.numel(), VOCAB)]
    assert hooked.item() == pytest.approx(2 * plain.item(), rel=1e-12)


def _fake_vocab_parallel_ce(other_shard, rank):
    """Emulates Megatron's vocab-parallel CE for a two-shard split: the full-vocab CE from the
    local shard (what the loss passes in, already mask-suppressed) plus the other rank's shard."""

    def ce(local, targets):
        other = other_shard.reshape(local.shape[0], -1)
        full = torch.cat([local, other] if rank == 0 else [other, local], dim=-1)
        return F.cross_entropy(full, targets, reduction="none")

    return ce


def test_sliced_vocab_with_suppression_matches_dense():
    from edlm_dist.objectives.subs import suppress_mask_logit

    logits, x0, x_t, t = _batch(2)
    schedule = LogLinearSchedule()
    dense, _ = mdlm_loss(logits, x0, x_t, t, MASK, schedule=schedule)
    shard0, shard1 = logits[..., :3], logits[..., 3:]  # mask id 5 lives in shard 1 (local column 2)
    # each "rank" sees the other's shard as it would after that rank's own suppression
    rank0, _ = mdlm_loss(shard0, x0, x_t, t, MASK, schedule=schedule, vocab_start=0,
                         cross_entropy=_fake_vocab_parallel_ce(suppress_mask_logit(shard1, MASK, 3), 0))
    rank1, _ = mdlm_loss(shard1, x0, x_t, t, MASK, schedule=schedule, vocab_start=3,
                         cross_entropy=_fake_vocab_parallel_ce(shard0, 1))
    assert rank0.item() == pytest.approx(dense.item(), rel=1e-12)
    assert rank1.item() == pytest.approx(dense.item(), rel=1e-12)
    # without the suppression on rank 1 the loss differs (the mask column would take mass)
    unsuppressed, _ = mdlm_loss(shard1, x0, x_t, t, MASK, schedule=schedule, vocab_start=0,
                                cross_entropy=_fake_vocab_parallel_ce(shard0, 1))
    assert abs(unsuppressed.item() - dense.item()) > 1e-3


def test_ar_loss_matches_loop_for_both_logit_lengths():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, MASK, (2, 6), generator=g)
    logits = torch.randn(2, 6, VOCAB, generator=g, dtype=torch.float64)
    expected = 0.0
    for b in range(2):
        for i in range(5):
            row = logits[b, i].clone()
            row[MASK] = -1e6
            expected += -(row[x[b, i + 1]] - torch.logsumexp(row, 0)).item()
    expected /= 2 * 5
    full, stats = ar_loss(logits, x, mask_id=MASK)
    shifted, _ = ar_loss(logits[:, :-1], x, mask_id=MASK)
    assert full.item() == pytest.approx(expected, rel=1e-12)
    assert shifted.item() == pytest.approx(expected, rel=1e-12)
    assert float(stats["tokens"]) == 10
    # without mask_id the mask column keeps its probability mass, so the loss is larger
    assert ar_loss(logits, x)[0].item() > full.item()
    with pytest.raises(ValueError, match="ar_loss"):
        ar_loss(logits[:, :-2], x)


def test_nce_loss_matches_eq10_and_is_stable():
    e_pos = torch.tensor([0.3, -1.2], dtype=torch.float64)
    e_neg = torch.tensor([[1.0, -0.5, 2.0], [0.1, 0.2, -3.0]], dtype=torch.float64)
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = 0.0
    for b in range(2):
        row = -math.log(1 / (1 + math.exp(e_pos[b].item())))
        row += sum(-math.log(1 / (1 + math.exp(-e.item()))) for e in e_neg[b]) / 3
        expected += row
    assert nce_loss(e_pos, e_neg).item() == pytest.approx(expected / 2, rel=1e-12)
    # (B, 1) and (B,) forms for one negative
    assert nce_loss(e_pos[:, None], e_neg[:, 0]).item() == pytest.approx(
        sum(-math.log(sigmoid(-e_pos[b].item())) - math.log(sigmoid(e_neg[b, 0].item())) for b in range(2)) / 2, rel=1e-12
    )
    # huge energies: finite, ~ linear in E (the naive log(sigmoid) form underflows to inf)
    big = nce_loss(torch.tensor([1000.0]), torch.tensor([[-1000.0]]))
    assert math.isfinite(big.item()) and big.item() == pytest.approx(2000.0)
    # data at low energy and negatives at high energy give a small loss
    assert nce_loss(torch.tensor([-20.0]), torch.tensor([[20.0]])).item() < 1e-8


def test_nce_negatives_follow_mu_and_carry_over():
    g = torch.Generator().manual_seed(5)
    logits = torch.tensor([[[0.0, 1.0, -1.0, 0.5, 0.0, 0.0]]], dtype=torch.float64).expand(1, 2, VOCAB).clone()
    x_t = torch.tensor([[MASK, 3]])
    log_mu = subs_log_probs(logits, x_t, MASK)
    negatives = sample_nce_negatives(log_mu, 40000, generator=g)
    assert negatives.shape == (1, 40000, 2) and negatives.dtype == torch.long
    assert bool((negatives[0, :, 1] == 3).all())  # carried over
    freq = torch.bincount(negatives[0, :, 0], minlength=VOCAB).double() / 40000
    tv = 0.5 * (freq - log_mu[0, 0].exp()).abs().sum().item()
    assert tv < 0.015  # expected TV ~ 0.004 for 40k draws over 5 categories
    assert freq[MASK].item() == 0.0
    # seeded: same generator state, same negatives
    again = sample_nce_negatives(log_mu, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again, sample_nce_negatives(log_mu, 3, generator=torch.Generator().manual_seed(9)))
