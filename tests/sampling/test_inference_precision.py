"""Inference precision (issue 21 item 12): bf16 autocast forwards stay close to fp32 within a bf16-derived
tolerance, ``auto`` is fp32 on CPU, and the AR energy scores all k proposals in one forward with the
same energies as row-by-row scoring."""

from __future__ import annotations

import torch

from edlm_dist.parallel.precision import inference_precision, resolve_model_precision
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.sampling.chunking import rows_within_memory
from edlm_dist.sampling.model_energies import AREnergy
from tests.sampling.test_energy_fns import _randomised

VOCAB, LENGTH, MASK = 11, 12, 10
BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


def proposals(k: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (k, LENGTH), generator=g)
    x_t = torch.where(torch.rand(k, LENGTH, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
    log_mu = torch.where(x_t == MASK, -torch.rand(k, LENGTH, generator=g, dtype=torch.float64), 0.0)
    return x0, x_t, log_mu, torch.rand(k, generator=g)


class CountingAR(torch.nn.Module):
    """The AR model, counting its log-prob forwards and the rows of each."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []
        self.vocab_size = model.vocab_size

    def log_probs(self, tokens, mask_id, **kwargs):
        self.rows.append(tokens.shape[0])
        return self.model.log_probs(tokens, mask_id, **kwargs)


def test_batched_ar_energy_equals_row_by_row_scoring():
    model = CountingAR(_randomised("ar", VOCAB, LENGTH))
    x0, x_t, log_mu, t = proposals()
    batched = AREnergy(model, MASK, carry_over=False)(x0, x_t, log_mu, t)
    assert model.rows == [16]  # all k proposals in one forward
    one_by_one = AREnergy(model, MASK, carry_over=False, max_chunk_rows=1)(x0, x_t, log_mu, t)
    assert model.rows[1:] == [1] * 16
    # fp32 forwards of different batch shapes may take different GEMM kernels: a sum of L fp32 log-probs
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=LENGTH * 1e-5 * float(one_by_one.abs().max()))


def test_memory_rule_scores_many_rows_at_paper_scale_on_cpu_budget():
    per_row = 1024 * 50258 * 12  # L=1024, V=50k: logits, fp32 copy, log-softmax
    assert rows_within_memory(torch.device("cpu"), per_row, 64 * per_row) == 64
    assert rows_within_memory(torch.device("cpu"), per_row, 0) == 1


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_model_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_model_precision("auto", torch.device("cpu")) == "fp32"
    with inference_precision(torch.device("cpu"), "auto") as resolved:
        assert resolved == "fp32" and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with inference_precision(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bf16_autocast_ar_energies_stay_close_to_fp32():
    model = _randomised("ar", VOCAB, LENGTH)
    x0, x_t, log_mu, t = proposals()
    energy = AREnergy(model, MASK, carry_over=False)
    exact = energy(x0, x_t, log_mu, t)
    with inference_precision(torch.device("cpu"), "bf16"):
        fast = energy(x0, x_t, log_mu, t)
    assert fast.dtype == torch.float64
    # Each log-prob comes from bf16 logits (relative error of order eps); the energy sums L of them:
    # bound |dE| by 2 eps x sum |terms| per row (measured here: 0.2 eps).
    log_p = energy.token_log_probs(x0).double()
    bound = 2 * BF16_EPS * (log_p.abs().sum(dim=1) + log_mu.abs().sum(dim=1) + 1.0)
    assert torch.all((fast - exact).abs() <= bound)
    assert not torch.equal(fast, exact)  # autocast did change the arithmetic


@torch.no_grad()
def test_bf16_autocast_denoiser_log_probs_stay_close_to_fp32():
    model = _randomised("dit", VOCAB, LENGTH)
    _, x_t, _, t = proposals(4)
    sigma = t
    exact = subs_log_probs(model(x_t, sigma), x_t, MASK)
    with inference_precision(torch.device("cpu"), "bf16"):
        fast = subs_log_probs(model(x_t, sigma), x_t, MASK)
    assert fast.dtype == torch.float32
    finite = exact > -1e4
    # probabilities, not log-probs: a bf16 logit error d moves p by about p * d <= d (measured: 0.8 eps)
    diff = (fast[finite].exp() - exact[finite].exp()).abs()
    assert 0 < float(diff.max()) <= 4 * BF16_EPS
