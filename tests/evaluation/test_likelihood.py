"""Validation likelihood driver: MDLM NELBO against enumeration, EDLM-coAR = AR likelihood exactly,
Theorem-1 estimates against the exact log Z, and 2-rank evaluation = 1-rank evaluation."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig, SyntheticConfig
from edlm_dist.errors import DataError
from edlm_dist.evaluation.likelihood import (
    LikelihoodModels,
    LikelihoodSettings,
    RowNoise,
    ar_energy_fn,
    diffusion_log_mu,
    draw_negatives,
    likelihood_batch_terms,
    likelihood_terms,
    nce_energy_fn,
    row_generator,
    theorem1_estimates,
)
from edlm_dist.evaluation.run import evaluate_likelihood
from edlm_dist.models.build import build_model
from tests.spawn import run_on_ranks
from tests.tolerances import approx_across, assert_close_across, network_reduction_size

F64 = torch.float64
TINY = ModelConfig(hidden_size=16, n_blocks=1, n_heads=2, cond_dim=8, use_apex=False)
V, MASK, L = 4, 3, 4  # real tokens 0..2, mask id 3
EPS = 1e-3
TINY_N = network_reduction_size(TINY, L, V)  # fp32 forwards here vs their float64 references


def _model(kind: str, seed: int, std: float, vocab: int = V, length: int = L) -> torch.nn.Module:
    """A tiny model whose zero-initialised output layers are replaced by N(0, std²) (non-trivial outputs)."""
    torch.manual_seed(seed)
    model = build_model(kind, TINY, vocab, length).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("output_layer.linear", "energy_head.2")):
                param.copy_(torch.randn(param.shape, generator=g) * std)
    return model


def _noise(t: float, x_t: torch.Tensor, seed: int = 0) -> RowNoise:
    rows = x_t.shape[0]
    return RowNoise(torch.full((rows,), t, dtype=F64), x_t, [row_generator(seed, r) for r in range(rows)])


def _mu(dit, x_t: torch.Tensor) -> torch.Tensor:
    """Dense reference of μθ(·|x_t) at masked positions: softmax with the mask column removed, float64."""
    logits = dit(x_t, torch.zeros(x_t.shape[0]), gather_logits=True)[..., :V].double()
    logits[..., MASK] = -math.inf
    return torch.log_softmax(logits, -1)


def _ar_prefix_log_prob(ar, x0: tuple, i: int) -> float:
    """log p_AR(x^i | x^{<i}) from a forward on the prefix alone (causality makes it the same number)."""
    logits = ar(torch.tensor([list(x0[:i])]), gather_logits=True)[0, -1, :V].double()
    logits[MASK] = -math.inf
    return torch.log_softmax(logits, -1)[x0[i]].item()


def _all_masks(length: int) -> list[tuple[bool, ...]]:
    return list(itertools.product([False, True], repeat=length))


# ------------------------------------------------------------------------------------------ MDLM
def test_mdlm_term_converges_to_enumerated_nelbo():
    """E over t ~ U[ε_s, 1) and masks of the driver's row term, by enumeration + exact quadrature."""
    dit = _model("dit", 0, 1.0)
    models = LikelihoodModels(V, L, MASK, diffusion=dit)
    rows = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 2]])
    nodes, weights = np.polynomial.legendre.leggauss(8)  # exact: the integrand is a polynomial of degree L−1
    t_nodes = EPS + (1 - EPS) * (nodes + 1) / 2
    exact = []
    for x0 in rows.tolist():
        total = 0.0
        for mask in _all_masks(L):
            k = sum(mask)
            if k == 0:
                continue
            x_t = torch.tensor([[MASK if m else v for v, m in zip(x0, mask)]])
            log_mu = _mu(dit, x_t)[0]
            value = sum(-log_mu[i, x0[i]].item() for i in range(L) if mask[i])  # nats per row
            s = (1 - EPS) * t_nodes
            density = (s ** k * (1 - s) ** (L - k) / t_nodes * weights / 2).sum()  # E_t[(1/t) P(mask | t)]
            total += value * density
        exact.append(total / L)  # per token
    exact_mean = float(np.mean(exact))

    reps = 640  # consecutive global rows per x0: 40 full antithetic strata of 16 each
    x0 = rows.repeat_interleave(reps, dim=0)
    settings = LikelihoodSettings(seed=3, strata=16)
    values, weight = likelihood_batch_terms(models, x0, torch.arange(x0.shape[0]), settings)["mdlm"]
    per_token = values / weight
    mc, stderr = per_token.mean().item(), per_token.std().item() / math.sqrt(per_token.numel())
    assert stderr < 0.05 * exact_mean  # the check has power
    assert abs(mc - exact_mean) < 4 * stderr


# ------------------------------------------------------------------------------------- EDLM-coAR
def test_coar_row_is_the_masked_ar_nll_for_every_fixed_t_and_mask():
    """For fixed (t, mask): row = (1/t)[Σ_{i≥1 masked} −log p_AR(x0^i|x0^<i) − 1(m_0) log μθ(x0^0|x_t)];
    over the masks at fixed t its AR part averages to (1−ε)·NLL_AR, for two different diffusion models."""
    ar = _model("ar", 1, 1.0)
    x0 = (2, 0, 1, 1)
    ar_terms = [0.0] + [-_ar_prefix_log_prob(ar, x0, i) for i in range(1, L)]
    nll_ar = sum(ar_terms)
    masks = _all_masks(L)
    x_t = torch.tensor([[MASK if m else v for v, m in zip(x0, mask)] for mask in masks])
    for dit_seed in (2, 3):
        dit = _model("dit", dit_seed, 1.0)
        models = LikelihoodModels(V, L, MASK, diffusion=dit, ar=ar)
        log_mu0 = _mu(dit, x_t)[:, 0, x0[0]]
        for t in (0.05, 0.4, 0.97):
            x0_rows = torch.tensor([x0] * len(masks))
            terms = likelihood_terms(models, x0_rows, _noise(t, x_t), LikelihoodSettings(n_negatives=2))
            row = terms["edlm_coar"][0]
            expected = torch.tensor([
                (sum(ar_terms[i] for i in range(1, L) if mask[i]) - (log_mu0[j].item() if mask[0] else 0.0)) / t
                for j, mask in enumerate(masks)], dtype=F64)
            # the driver's batched fp32 forwards vs one forward per prefix: other shapes, other kernels
            assert_close_across(row, expected, dtype=torch.float32, reduction_size=TINY_N + L)
            assert_close_across(terms["edlm_coar.position0"][0],
                                torch.where(x_t[:, 0] == MASK, -log_mu0, torch.zeros_like(log_mu0)) / t,
                                dtype=torch.float32, reduction_size=TINY_N)
            prob = torch.tensor([math.prod((1 - EPS) * t if m else 1 - (1 - EPS) * t for m in mask) for mask in masks],
                                dtype=F64)
            ar_part = row - terms["edlm_coar.position0"][0]
            assert (prob * ar_part).sum().item() == approx_across((1 - EPS) * nll_ar, dtype=torch.float32,
                                                                 reduction_size=TINY_N + len(masks))


# ------------------------------------------------------------------------------------- Theorem 1
def _exact_log_z(energy_fn, log_mu, x_t_row, masked_positions):
    """log Σ_x pθ(x|x_t) e^{−E(x, x_t)} over every x consistent with x_t, and E_pθ[−E] (the plug-in's mean)."""
    candidates = []
    for values in itertools.product(range(MASK), repeat=len(masked_positions)):
        x = x_t_row.clone()
        x[list(masked_positions)] = torch.tensor(values)
        candidates.append(x)
    cands = torch.stack(candidates)
    log_mu_c = log_mu[0].gather(-1, cands.T).T.to(F64)  # (N, L)
    log_p = log_mu_c.sum(-1)
    # pθ(·|x_t) is normalised over them (an fp32 softmax per position)
    assert torch.logsumexp(log_p, 0).item() == approx_across(0.0, dtype=torch.float32, reduction_size=TINY_N)
    neg_e = -energy_fn(cands, x_t_row.expand(len(cands), -1), log_mu_c, torch.zeros(len(cands)))
    return torch.logsumexp(log_p + neg_e, 0).item(), (log_p.exp() * neg_e).sum().item()


@pytest.mark.parametrize("energy,energy_std,dit_std", [("ar", 0.3, 0.1), ("nce", 2.0, 0.3)])
def test_theorem1_estimates_bracket_exact_log_z_and_the_plugin(energy, energy_std, dit_std):
    """Scales chosen so that n = 16 is in Theorem 1's asymptotic regime (at n = 2 it is not: see test_bounds)."""
    dit = _model("dit", 4, dit_std)
    x_t_row = torch.tensor([MASK, MASK, 1, MASK])
    log_mu = diffusion_log_mu(dit, x_t_row[None], torch.tensor([0.7], dtype=F64), V, MASK)
    if energy == "ar":  # EDLM-AR: Z(x_t) = Σ_{x^0} μθ(x^0|x_t) P_AR(x^2 = 1 | x^0) < 1
        energy_fn = ar_energy_fn(_model("ar", 5, energy_std), MASK, carry_over=False)
    else:
        energy_fn = nce_energy_fn(_model("energy", 6, energy_std))
    log_z, plugin_mean = _exact_log_z(energy_fn, log_mu, x_t_row, (0, 1, 3))
    assert log_z - plugin_mean > 0.05  # a real Jensen gap to bracket

    reps = 400
    x_t = x_t_row.expand(reps, -1)
    means, stderrs, gaps = {}, {}, {}
    for n in (2, 16):
        gens = [row_generator(11, r) for r in range(reps)]
        negatives = draw_negatives(log_mu.expand(reps, -1, -1), n, gens)
        est, ess = theorem1_estimates(energy_fn, x_t, log_mu.expand(reps, -1, -1), negatives)
        assert bool((est.upper >= est.lower - 1e-12).all())  # pointwise: log Ẑ_n ≥ mean LOO (concavity)
        assert bool(((ess >= 1 - 1e-9) & (ess <= n + 1e-9)).all())
        for name in ("lower", "upper", "plugin"):
            values = getattr(est, name)
            means[n, name], stderrs[n, name] = values.mean().item(), values.std().item() / math.sqrt(reps)
        gaps[n] = (est.upper - est.lower).mean().item()
    # The plug-in is an unbiased estimate of E_pθ[−E] (< log Z): the negatives come from pθ.
    assert abs(means[16, "plugin"] - plugin_mean) < 4 * stderrs[16, "plugin"]
    # plug-in ≤ lower_2 ≤ lower_16 ≤ log Z ≤ upper_16, each within Monte-Carlo error.
    assert means[2, "plugin"] < means[2, "lower"] + 4 * stderrs[2, "lower"]
    assert means[2, "lower"] < means[16, "lower"] + 4 * stderrs[16, "lower"]
    assert means[16, "lower"] < log_z + 4 * stderrs[16, "lower"]
    assert means[16, "upper"] > log_z - 4 * stderrs[16, "upper"]
    assert log_z - means[16, "lower"] < log_z - plugin_mean  # n = 16 is tighter than the one-sample plug-in
    assert gaps[16] < gaps[2]  # the bracket tightens with n


def test_constant_energy_nce_equals_mdlm_and_theorem1_gives_log_z_minus_the_constant():
    """The NCE network at init gives one constant energy c for every input (zero final layer), so
    every log Ẑ estimate is exactly -c, E + log Ẑ = 0, and EDLM-NCE reduces to MDLM."""
    torch.manual_seed(7)
    energy = build_model("energy", TINY, V, L).eval()
    models = LikelihoodModels(V, L, MASK, diffusion=_model("dit", 8, 1.0), energy=energy)
    x0 = torch.tensor([[0, 1, 2, 0], [2, 1, 1, 0]] * 4)
    constant = energy(x0, x0)[0].double()
    assert constant.abs() > 1e-6  # a genuinely non-zero constant, so the check below means something
    terms = likelihood_batch_terms(models, x0, torch.arange(8), LikelihoodSettings(n_negatives=3))
    for name in ("upper", "lower", "plugin"):
        # every energy is c up to the energy head's fp32 rounding (its rows may take different kernels)
        assert_close_across(terms[f"edlm_nce.{name}"][0], terms["mdlm"][0], dtype=torch.float32, reduction_size=TINY_N)
        assert_close_across(terms[f"edlm_nce.log_z.{name}"][0], torch.full((8,), -constant.item(), dtype=F64),
                            dtype=torch.float32, reduction_size=TINY_N)
    torch.testing.assert_close(terms["edlm_nce.ess"][0], torch.full((8,), 3.0, dtype=F64))


# ----------------------------------------------------------------------------------- distributed
def _prepare(tmp_path, seq_len: int = 8):
    from edlm_dist.data.prepare import prepare_data

    cfg = SyntheticConfig(num_tokens=5, train_rows=8, valid_rows=13)
    prepare_data("synthetic", tmp_path / "data", seq_len=seq_len, tokenizer_spec="synthetic", synthetic_cfg=cfg,
                 seed=1, progress=False)
    return tmp_path / "data"


def _models_for_data(length: int = 8) -> LikelihoodModels:
    vocab, mask = 8, 7  # 5 tokens + BOS, EOS, MASK
    return LikelihoodModels(vocab, length, mask, diffusion=_model("dit", 9, 0.5, vocab, length),
                            ar=_model("ar", 10, 0.5, vocab, length), energy=_model("energy", 11, 1.0, vocab, length))


SETTINGS = LikelihoodSettings(n_negatives=4, seed=5, strata=4)
DATA_N = network_reduction_size(TINY, 8, 8)


def _rank_eval(data_dir, models, batch_size):
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["train.global_batch=16", "train.micro_batch=2"]))
    return evaluate_likelihood(models, data_dir, settings=SETTINGS, batch_size=batch_size, dp_rank=ctx.dp_rank,
                               dp_size=ctx.dp_size, dp_group=ctx.dp_group)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    return {prefix: tree}


@pytest.mark.multirank
def test_two_ranks_equal_one_rank_for_every_method(tmp_path):
    data_dir = _prepare(tmp_path)
    models = _models_for_data()
    single = evaluate_likelihood(models, data_dir, settings=SETTINGS, batch_size=4)  # in process, no dist
    two = run_on_ranks(_rank_eval, 2, data_dir, models, 3)  # 7 + 6 rows, another batch size
    assert two[0] == two[1]
    assert single["rows"] == two[0]["rows"] == 13
    assert set(single["methods"]) == {"ar", "mdlm", "edlm_coar", "edlm_ar", "edlm_nce"}
    flat_single, flat_two = _flatten(single), _flatten(two[0])
    assert flat_single.keys() == flat_two.keys()
    for key, value in flat_single.items():
        if isinstance(value, float):
            # Same rows, same noise; only the float32 model outputs may round differently in batches
            # of another size (a different noise draw would move these numbers by ~1e-2).
            assert flat_two[key] == approx_across(value, dtype=torch.float32, reduction_size=DATA_N + 13), key
        else:
            assert flat_two[key] == value, key
    # Every row once: the AR token count is rows × (L − 1).
    assert single["methods"]["ar"]["tokens"] == 13 * 7
    lik = single["methods"]
    for method in ("edlm_ar", "edlm_nce"):
        assert lik[method]["upper"]["nll"] >= lik[method]["lower"]["nll"]


def test_rows_of_another_length_are_refused(tmp_path):
    data_dir = _prepare(tmp_path, seq_len=10)
    with pytest.raises(DataError, match="seq_len=8"):
        evaluate_likelihood(_models_for_data(8), data_dir, settings=SETTINGS, batch_size=4)


def test_likelihood_settings_come_from_the_config_for_eval_and_pipeline_alike():
    """One mapping from the config (the pipeline once dropped train.sampling_eps); every field is the config's."""
    from edlm_dist.evaluation.run import likelihood_settings

    cfg = load_config(None, ["train.sampling_eps=0.01", "eval.n_negatives=5", "eval.seed=9", "eval.batch_size=6"])
    assert likelihood_settings(cfg) == LikelihoodSettings(n_negatives=5, seed=9, strata=6, sampling_eps=0.01,
                                                          chunk_rows=6)
