"""The exact-oracle synthetic language against brute-force enumeration of tiny languages."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import edlm_dist.data.synthetic as synthetic
from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.errors import ConfigError, DataError

TINY_LEN = 5  # BOS + 3 language tokens + EOS: 3^3 = 27 framed rows


def tiny_config(order: int) -> SyntheticConfig:
    # Large smoothing so that off-support rows carry visible probability mass in the checks.
    return SyntheticConfig(num_tokens=3, num_topics=2, branching=2, order=order, concentration=0.7,
                           smoothing=0.05, seed=5)


@pytest.fixture(params=[(1, "dense"), (2, "dense"), (2, "sparse")], ids=lambda p: f"order{p[0]}-{p[1]}")
def tiny(request, monkeypatch):
    order, path = request.param
    if path == "sparse":
        monkeypatch.setattr(synthetic, "DENSE_TABLE_MAX_ENTRIES", 0)
    lang = SyntheticLanguage(tiny_config(order), TINY_LEN)
    assert (lang._dense_log_probs is None) == (path == "sparse")
    return lang


def naive_token_prob(lang: SyntheticLanguage, topic: int, context: list[int], token: int) -> float:
    """p_z(token | context) straight from the definition (1 - eps) q + eps / n."""
    index = sum(s * (lang.num_tokens + 1) ** (lang.order - 1 - j) for j, s in enumerate(context))
    allowed = lang.allowed[topic, index].tolist()
    weights = lang.weights[topic, index].tolist()
    sparse = weights[allowed.index(token)] if token in allowed else 0.0
    return (1 - lang.smoothing) * sparse + lang.smoothing / lang.num_tokens


def naive_log_prob(lang: SyntheticLanguage, row: list[int]) -> float:
    """Python loop over the generative process, with the documented out-of-support penalties."""
    n, penalty = lang.num_tokens, math.log(lang.smoothing / lang.num_tokens)
    bad = (row[0] != lang.bos_id) + (row[-1] != lang.eos_id) + sum(x >= n for x in row[1:-1])
    total = 0.0
    for topic in range(lang.num_topics):
        prob, context = 1.0 / lang.num_topics, [lang.bos_id] * lang.order
        for x in row[1:-1]:
            if x < n:
                prob *= naive_token_prob(lang, topic, context, x)
            context = context[1:] + [x if x < n else lang.bos_id]
        total += prob
    return math.log(total) + bad * penalty


def all_framed_rows(lang: SyntheticLanguage) -> torch.Tensor:
    inner = itertools.product(range(lang.num_tokens), repeat=lang.seq_len - 2)
    return torch.tensor([[lang.bos_id, *body, lang.eos_id] for body in inner])


def test_log_prob_equals_enumeration_and_normalises(tiny):
    rows = all_framed_rows(tiny)
    log_p = tiny.log_prob(rows)
    assert log_p.dtype == torch.float64 and log_p.shape == (27,)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    expected = torch.tensor([naive_log_prob(tiny, r) for r in rows.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tiny.per_token_nll(rows), -expected / (TINY_LEN - 1), rtol=0, atol=1e-12)


def test_log_prob_finite_and_penalised_outside_support(tiny):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, tiny.vocab_size, (200, TINY_LEN), generator=generator)  # specials anywhere
    log_p = tiny.log_prob(rows)
    assert torch.isfinite(log_p).all()
    expected = torch.tensor([naive_log_prob(tiny, r) for r in rows.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-12)
    # Wrong framing costs exactly one penalty per framing position, on top of the framed score.
    framed = all_framed_rows(tiny)
    unframed = framed.clone()
    unframed[:, 0], unframed[:, -1] = tiny.eos_id, tiny.mask_id
    penalty = math.log(tiny.smoothing / tiny.num_tokens)
    torch.testing.assert_close(tiny.log_prob(unframed), tiny.log_prob(framed) + 2 * penalty, rtol=0, atol=1e-12)


def test_sampler_matches_exact_probabilities(tiny):
    rows = all_framed_rows(tiny)
    probs = tiny.log_prob(rows).exp()
    samples = tiny.sample(20000, torch.Generator().manual_seed(1))
    assert samples.dtype == torch.long and samples.shape == (20000, TINY_LEN)
    assert (samples[:, 0] == tiny.bos_id).all() and (samples[:, -1] == tiny.eos_id).all()
    codes = (samples[:, 1:-1] * torch.tensor([9, 3, 1])).sum(1)  # rows enumerate in base-3 order
    counts = torch.bincount(codes, minlength=27).double()
    expected = probs * samples.shape[0]
    big = expected >= 5  # pool the rare rows into one bin so the chi-square approximation holds
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    dof = observed.numel() - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # ~1e-6 false-alarm rate; a wrong sampler gives >> 1e3


def test_entropy_equals_enumeration(tiny):
    rows = all_framed_rows(tiny)
    log_p = tiny.log_prob(rows)
    exact_h = float(-(log_p.exp() * log_p).sum())
    value, stderr = tiny.entropy_per_token()
    assert 0 < stderr < 0.005 * value
    assert value == pytest.approx(exact_h / (TINY_LEN - 1), abs=4 * stderr + 1e-12)
    terms = tiny.entropy_terms()
    # H(X|Z) is exact: compare with sum_z pi_z H(X | Z=z) from the enumeration of p(x | z).
    h_given_topic = 0.0
    for topic in range(tiny.num_topics):
        for row in rows.tolist():
            p = 1.0
            context = [tiny.bos_id] * tiny.order
            for x in row[1:-1]:
                p *= naive_token_prob(tiny, topic, context, x)
                context = context[1:] + [x]
            h_given_topic -= p * math.log(p) / tiny.num_topics
    assert terms["h_given_topic"] == pytest.approx(h_given_topic, abs=1e-12)
    assert terms["h_topic"] == pytest.approx(math.log(2), abs=1e-15)
    # Best factorised model = product of per-position marginals; its NLL is sum_t H(marginal_t).
    probs = log_p.exp()
    h_marginals = 0.0
    for position in range(1, TINY_LEN - 1):
        marginal = torch.zeros(tiny.num_tokens, dtype=torch.float64).index_add_(0, rows[:, position], probs)
        h_marginals -= float((marginal * marginal.log()).sum())
    assert terms["factorised_nll"] == pytest.approx(h_marginals, abs=1e-12)


def test_determinism_and_seed_dependence():
    a = SyntheticLanguage(SyntheticConfig(), 16)
    b = SyntheticLanguage(SyntheticConfig(), 16)
    c = SyntheticLanguage(SyntheticConfig(seed=99), 16)
    assert torch.equal(a.allowed, b.allowed) and torch.equal(a.weights, b.weights)
    assert a.state_dict() == b.state_dict()
    assert a.state_dict()["tables_sha256"] != c.state_dict()["tables_sha256"]
    assert not torch.equal(a.allowed, c.allowed)
    rows_a = a.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(rows_a, b.sample(64, torch.Generator().manual_seed(3)))
    assert not torch.equal(rows_a, a.sample(64, torch.Generator().manual_seed(4)))
    assert a.entropy_per_token() == b.entropy_per_token()


def test_default_language_entropy_and_strong_dependencies():
    lang = SyntheticLanguage(SyntheticConfig(), 32)
    value, stderr = lang.entropy_per_token()
    assert stderr < 0.005 * value
    nll = lang.per_token_nll(lang.sample(4000, torch.Generator().manual_seed(11)))
    mc_stderr = float(nll.std()) / math.sqrt(nll.numel())
    assert float(nll.mean()) == pytest.approx(value, abs=4 * math.sqrt(mc_stderr**2 + stderr**2))
    # Best factorised model (per-position unigram marginals), fitted on samples, scored on held-out rows.
    train = lang.sample(8000, torch.Generator().manual_seed(12))
    held_out = lang.sample(4000, torch.Generator().manual_seed(13))
    counts = torch.zeros(lang.seq_len, lang.vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, train.T.contiguous(), torch.ones(lang.seq_len, train.shape[0], dtype=torch.float64))
    log_marginal = ((counts + 0.5) / (counts + 0.5).sum(1, keepdim=True)).log()
    scored = log_marginal[1:].gather(1, held_out[:, 1:].T.contiguous())  # all positions after BOS
    factorised = float(-scored.sum(0).mean()) / lang.num_scored_tokens
    assert factorised == pytest.approx(lang.factorised_nll_per_token(), abs=0.05)
    # Margin: the factorised model needs > 3x the true entropy and > 2 nats/token more.
    assert factorised > 3 * value and factorised > value + 2.0


def test_state_dict_and_attributes():
    lang = SyntheticLanguage(SyntheticConfig(num_tokens=7), 9)
    assert (lang.vocab_size, lang.bos_id, lang.eos_id, lang.mask_id, lang.seq_len) == (10, 7, 8, 9, 9)
    assert lang.tokenizer.vocab_size == lang.vocab_size and lang.tokenizer.mask_id == lang.mask_id
    assert lang.num_scored_tokens == 8
    state = lang.state_dict()
    assert state["num_tokens"] == 7 and state["seq_len"] == 9 and len(state["tables_sha256"]) == 64
    assert lang.describe() == state
    row = lang.sample(1, torch.Generator().manual_seed(0))[0]
    text = lang.tokenizer.decode(row.tolist())
    assert text.startswith("[BOS] w") and text.endswith(" [EOS]")
    assert lang.tokenizer.encode(text) == row.tolist()


def test_prefix_log_prob_is_the_marginal_over_every_continuation():
    """log p(x_0..x_{m-1}) = log of the sum of p over the rows that start with it (enumeration, 81 rows)."""
    lang = SyntheticLanguage(SyntheticConfig(num_tokens=3, num_topics=2, branching=2, smoothing=0.05, seed=3), 6)
    rows = torch.tensor([[lang.bos_id, *body, lang.eos_id] for body in itertools.product(range(3), repeat=4)])
    p_rows = lang.log_prob(rows).exp()
    for m in range(1, 7):
        prefixes, owner = torch.unique(rows[:, :m], dim=0, return_inverse=True)
        marginal = torch.zeros(len(prefixes), dtype=torch.float64).index_add_(0, owner, p_rows)
        torch.testing.assert_close(lang.prefix_log_prob(prefixes).exp(), marginal, rtol=1e-12, atol=1e-15)
    assert torch.equal(lang.prefix_log_prob(rows), lang.log_prob(rows))  # m = L is log_prob, bit for bit
    with pytest.raises(DataError, match="1 <= m <= 6"):
        lang.prefix_log_prob(torch.zeros(2, 7, dtype=torch.long))


def test_bad_inputs_raise_clear_errors():
    lang = SyntheticLanguage(SyntheticConfig(num_tokens=4), 6)
    good = lang.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=r"\[0, 7\)"):
        lang.log_prob(torch.where(good == lang.eos_id, 7, good))
    with pytest.raises(DataError, match=r"\[0, 7\)"):
        lang.log_prob(good - 10)
    with pytest.raises(DataError, match="seq_len"):
        lang.log_prob(good[:, :5])
    with pytest.raises(DataError, match="integer"):
        lang.log_prob(good.double())
    with pytest.raises(ConfigError, match="smoothing"):
        SyntheticLanguage(SyntheticConfig(smoothing=0.0), 8)
    with pytest.raises(ConfigError, match="seq_len"):
        SyntheticLanguage(SyntheticConfig(), 2)
    with pytest.raises(ConfigError, match="branching"):
        SyntheticLanguage(SyntheticConfig(num_tokens=4, branching=5), 8)
    with pytest.raises(ConfigError, match="exceeds"):
        SyntheticLanguage(SyntheticConfig(num_tokens=500, order=3), 8)
