"""Energy callables built from models (paper Eq. 9, spec §6.2, §6.3): by enumeration over every x0
consistent with x_t, p_theta(x0|x_t)·exp(-E) must equal the proxy the energy stands for — the
(co)AR chain rule computed prefix by prefix, or the exact synthetic language — which also pins the
log-space fix of the reference's mu-instead-of-log-mu bug."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from edlm_dist.config.schema import ModelConfig, SyntheticConfig
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.errors import ConfigError, DataError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import load_full_state_dict
from edlm_dist.sampling.energies import log_mu_at_candidates
from edlm_dist.artifacts.weights import synthetic_language_for
from edlm_dist.sampling.model_energies import AREnergy, NCEEnergy, OracleEnergy, build_energy
from tests.tolerances import assert_close_across, network_reduction_size

TINY = ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, dropout=0.0, use_apex=False)


def _randomised(kind: str, vocab: int, length: int, seed: int = 5) -> torch.nn.Module:
    """A tiny model with random weights everywhere (its zero-initialised output layers would make it trivial)."""
    torch.manual_seed(seed)
    model = build_model(kind, TINY, vocab, length)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        fan_in = param.shape[1] if param.dim() == 2 else 1
        state[name] = torch.randn(param.shape, generator=g) * (0.8 / math.sqrt(fan_in))
    load_full_state_dict(model, state)
    return model.eval()


def _consistent_x0(x_t: torch.Tensor, mask_id: int, tokens: list[int]) -> torch.Tensor:
    """Every x0 that agrees with x_t on its unmasked positions (masked ones range over ``tokens``)."""
    masked = (x_t == mask_id).nonzero().flatten().tolist()
    rows = []
    for fill in itertools.product(tokens, repeat=len(masked)):
        row = x_t.clone()
        row[masked] = torch.tensor(fill)
        rows.append(row)
    return torch.stack(rows)


def _random_log_mu(x_t: torch.Tensor, vocab: int, mask_id: int, seed: int = 3) -> torch.Tensor:
    """SUBS-shaped log mu_theta (L, V): a random distribution at masked positions, one-hot elsewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(x_t.shape[0], vocab, generator=g, dtype=torch.float64)
    logits[:, mask_id] = -1e6
    log_mu = torch.log_softmax(logits, dim=-1)
    carried = x_t != mask_id
    log_mu[carried] = -1e6
    log_mu[carried, x_t[carried]] = 0.0
    return log_mu.float()


def _prefix_ar_log_probs(model, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(N, L) log p_AR(x0^i | x0^{<i}) for i >= 1 from separate forwards on each prefix (column 0 = 0)."""
    out = torch.zeros(x0.shape, dtype=torch.float64)
    for i in range(1, x0.shape[1]):
        logits = model(x0[:, :i], gather_logits=True)[:, -1].double()
        logits[:, mask_id] = -math.inf
        out[:, i] = torch.log_softmax(logits, dim=-1).gather(-1, x0[:, i : i + 1]).squeeze(-1)
    return out


@pytest.mark.parametrize("carry_over", [True, False])
def test_ar_energies_turn_p_theta_into_the_ar_chain_rule(carry_over):
    vocab, length, mask_id = 5, 5, 4
    model = _randomised("ar", vocab, length)
    x_t = torch.tensor([1, mask_id, 2, mask_id, mask_id])
    x0 = _consistent_x0(x_t, mask_id, [0, 1, 2, 3])  # 64 candidates
    log_mu = _random_log_mu(x_t, vocab, mask_id)
    log_mu_tokens = log_mu_at_candidates(log_mu[None], x0, x0.shape[0])
    log_p_theta = log_mu_tokens.double().sum(-1)
    energy = AREnergy(model, mask_id, carry_over=carry_over, max_chunk_rows=7)  # several chunks
    e = energy(x0, x_t.expand_as(x0), log_mu_tokens, torch.ones(x0.shape[0]))
    assert e.dtype == torch.float64 and e.shape == (x0.shape[0],)
    ar = _prefix_ar_log_probs(model, x0, mask_id)
    scored = (x_t == mask_id) if carry_over else torch.ones(length, dtype=torch.bool)
    scored[0] = False  # the first token is never scored
    target = (ar * scored).sum(-1)  # log p_coAR (masked positions only) or log p_AR (all)
    # chunked, batched fp32 forwards vs one forward per prefix, each then summed over the L positions
    n = network_reduction_size(TINY, length, vocab) + length
    assert_close_across(log_p_theta - e, target, dtype=torch.float32, reduction_size=n)
    # So the normalised product over the candidates is the AR(-restricted) distribution exactly.
    assert_close_across(torch.softmax(log_p_theta - e, 0), torch.softmax(target, 0), dtype=torch.float32,
                        reduction_size=n + x0.shape[0])


def test_nce_energy_is_the_energy_network_whatever_the_chunking():
    vocab, length = 6, 6
    model = _randomised("energy", vocab, length)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, vocab - 1, (9, length), generator=g)
    x_t = torch.where(torch.rand(9, length, generator=g) < 0.5, torch.full_like(x0, vocab - 1), x0)
    direct = model(x_t, x0).double()
    assert direct.std() > 1e-3  # a non-trivial energy
    for rows in (1, 4, 256):
        e = NCEEnergy(model, max_chunk_rows=rows)(x0, x_t, torch.zeros(9, length), torch.ones(9))
        # chunks of another row count: other kernel blockings of the same fp32 forward
        assert_close_across(e, direct, dtype=torch.float32, reduction_size=network_reduction_size(TINY, length, vocab))


def test_oracle_energy_turns_p_theta_into_the_true_conditional():
    language = SyntheticLanguage(SyntheticConfig(num_tokens=3, num_topics=2, branching=2, smoothing=0.01), 6)
    mask_id = language.mask_id
    x_t = torch.tensor([language.bos_id, mask_id, 1, mask_id, mask_id, language.eos_id])
    x0 = _consistent_x0(x_t, mask_id, list(range(mask_id)))  # proposals may hold BOS/EOS ids too
    log_mu = _random_log_mu(x_t, language.vocab_size, mask_id)
    log_mu_tokens = log_mu_at_candidates(log_mu[None], x0, x0.shape[0])
    e = OracleEnergy(language)(x0, x_t.expand_as(x0), log_mu_tokens, torch.ones(x0.shape[0]))
    product = torch.softmax(log_mu_tokens.double().sum(-1) - e, 0)
    truth = torch.softmax(language.log_prob(x0), 0)  # p_true restricted to rows consistent with x_t
    # E = Σ log μ − log p_true, so Σ log μ − E = log p_true up to float64 rounding; softmax over the candidates
    assert_close_across(product, truth, dtype=torch.float64, reduction_size=x0.shape[1] + x0.shape[0])


def test_build_energy_needs_its_ingredient():
    for kind, needs in (("ar", "ar_ckpt"), ("coar", "ar_ckpt"), ("nce", "energy_ckpt"), ("oracle", "synthetic")):
        with pytest.raises(ConfigError, match=needs):
            build_energy(kind, mask_id=3)
    with pytest.raises(ConfigError, match="unknown"):
        build_energy("sedd", mask_id=3)


def test_synthetic_language_comes_from_the_data_manifest(tmp_path):
    from edlm_dist.data.prepare import prepare_data

    cfg = SyntheticConfig(num_tokens=5, num_topics=2, branching=2, seed=77, train_rows=40, valid_rows=8)
    prepare_data("synthetic", tmp_path / "data", seq_len=8, synthetic_cfg=cfg, seed=1, progress=False)
    stale_cfg = asdict(replace(cfg, seed=1))  # a run config that disagrees: the manifest wins
    meta = {"data_dir": str(tmp_path / "data"), "seq_len": 8,
            "config": {"data": {"source": "synthetic", "synthetic": stale_cfg}}}
    language = synthetic_language_for(meta)
    expected = SyntheticLanguage(cfg, 8)
    rows = expected.sample(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(language.log_prob(rows), expected.log_prob(rows), rtol=0, atol=0)
    # Data folder gone: fall back to the run's config.
    fallback = synthetic_language_for({**meta, "data_dir": str(tmp_path / "gone")})
    torch.testing.assert_close(fallback.log_prob(rows), SyntheticLanguage(replace(cfg, seed=1), 8).log_prob(rows))
    assert synthetic_language_for({"seq_len": 8, "config": {"data": {"source": "text"}}}) is None
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["language"]["tables_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="tables hash"):
        synthetic_language_for(meta)
