"""AR / oracle energies (paper Eq. 9, spec §6.3) against hand loops."""

from __future__ import annotations

import pytest
import torch

from edlm_dist.objectives.subs import gather_token_log_probs, subs_log_probs
from edlm_dist.sampling.energies import ar_energy, log_mu_at_candidates, oracle_energy

MASK = 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 6, 5
    x0 = torch.randint(0, MASK, (batch, length), generator=g)
    masked = torch.rand(batch, length, generator=g) < 0.5
    masked[:, 0] = torch.tensor([True, False, True])  # position 0 masked in some rows: never scored by AR
    x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
    log_mu = subs_log_probs(torch.randn(batch, length, vocab, generator=g, dtype=torch.float64), x_t, MASK)
    log_mu_tokens = gather_token_log_probs(log_mu, x0)
    log_p_ar = torch.log_softmax(torch.randn(batch, length, vocab, generator=g, dtype=torch.float64), dim=-1)
    log_p_ar_tokens = gather_token_log_probs(log_p_ar, x0)
    return x0, x_t, log_mu_tokens, log_p_ar_tokens


def _hand_loop(x_t, log_mu_tokens, log_p_ar_tokens, carry_over):
    energies = []
    for b in range(x_t.shape[0]):
        ar_part = 0.0
        for i in range(1, x_t.shape[1]):
            if not carry_over or x_t[b, i] == MASK:
                ar_part += log_p_ar_tokens[b, i].item()
        mu_part = sum(log_mu_tokens[b, i].item() for i in range(x_t.shape[1]))
        energies.append(-ar_part + mu_part)
    return torch.tensor(energies, dtype=torch.float64)


@pytest.mark.parametrize("carry_over", [True, False])
def test_ar_energy_matches_hand_loop(carry_over):
    _, x_t, log_mu_tokens, log_p_ar_tokens = _inputs()
    energy = ar_energy(log_p_ar_tokens, log_mu_tokens, x_t, MASK, carry_over=carry_over)
    torch.testing.assert_close(energy, _hand_loop(x_t, log_mu_tokens, log_p_ar_tokens, carry_over), rtol=1e-12, atol=1e-12)


def test_coar_and_ar_differ_exactly_by_the_unmasked_ar_terms():
    _, x_t, log_mu_tokens, log_p_ar_tokens = _inputs()
    co = ar_energy(log_p_ar_tokens, log_mu_tokens, x_t, MASK, carry_over=True)
    plain = ar_energy(log_p_ar_tokens, log_mu_tokens, x_t, MASK, carry_over=False)
    unmasked_ar = torch.where(x_t[:, 1:] != MASK, log_p_ar_tokens[:, 1:], torch.zeros(())).sum(-1)
    torch.testing.assert_close(co - plain, unmasked_ar)
    assert bool((unmasked_ar != 0).any())
    # the carried-over positions add nothing to the diffusion term (log mu = 0 there)
    assert bool((log_mu_tokens[x_t != MASK] == 0).all())


def test_column_zero_is_never_scored():
    _, x_t, log_mu_tokens, log_p_ar_tokens = _inputs()
    changed = log_p_ar_tokens.clone()
    changed[:, 0] = -123.0
    for carry_over in (True, False):
        torch.testing.assert_close(
            ar_energy(changed, log_mu_tokens, x_t, MASK, carry_over=carry_over),
            ar_energy(log_p_ar_tokens, log_mu_tokens, x_t, MASK, carry_over=carry_over),
        )


def test_energy_is_in_log_space():
    # a more likely AR continuation lowers the energy by exactly its log-prob gain (not a prob gain)
    x_t = torch.tensor([[MASK, MASK]])
    log_mu = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    low = ar_energy(torch.log(torch.tensor([[1.0, 0.1]], dtype=torch.float64)), log_mu, x_t, MASK, carry_over=True)
    high = ar_energy(torch.log(torch.tensor([[1.0, 0.01]], dtype=torch.float64)), log_mu, x_t, MASK, carry_over=True)
    assert (high - low).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert low.item() == pytest.approx(-torch.log(torch.tensor(0.1)).item() + torch.log(torch.tensor(0.125)).item())


def test_oracle_energy_tilts_proposal_to_the_true_distribution():
    log_mu_tokens = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.9]], dtype=torch.float64))
    log_p_true = torch.log(torch.tensor([0.3, 0.05], dtype=torch.float64))
    energy = oracle_energy(log_p_true, log_mu_tokens)
    torch.testing.assert_close(energy, -log_p_true + log_mu_tokens.sum(-1))
    # p_theta(x0|x_t) * exp(-E) = p_true(x0)
    torch.testing.assert_close(torch.exp(log_mu_tokens.sum(-1) - energy), log_p_true.exp())


def test_log_mu_at_candidates_matches_loop():
    g = torch.Generator().manual_seed(1)
    batch, k, length, vocab = 2, 3, 4, 5
    log_mu = torch.randn(batch, length, vocab, generator=g)
    candidates = torch.randint(0, vocab, (batch * k, length), generator=g)
    out = log_mu_at_candidates(log_mu, candidates, k)
    for b in range(batch):
        for j in range(k):
            for i in range(length):
                assert out[b * k + j, i] == log_mu[b, i, candidates[b * k + j, i]]
