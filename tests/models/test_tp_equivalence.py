"""TP=2 ≡ TP=1: logits/energies and every parameter gradient of the three models agree.

The TP=1 reference is the dense single-process model built in this (pytest) process with the same
seed; the TP=2 models run on two forked gloo ranks (one fork for all cases). Both get the same
random full weights (zero-init output layers would make most gradients trivially zero), and the
ranks compare against the reference themselves, returning only error sizes.
V=37 does not split over two ranks, so the vocabulary padding path is exercised too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig
from edlm_dist.models.build import build_model
from edlm_dist.models.tp_layers import gather_vocab_logits
from edlm_dist.parallel.sharded_state import (
    full_grads,
    full_state_dict,
    grad_norm,
    is_tp_sharded,
    load_full_state_dict,
    tp_group,
)
from tests.spawn import run_on_ranks
from tests.tolerances import network_reduction_size, tolerance

V, L, B, SEED = 37, 8, 2, 7
TINY = ["model.hidden_size=32", "model.n_blocks=2", "model.n_heads=4", "model.cond_dim=16", "model.dropout=0.0"]
NETWORK_N = network_reduction_size(ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16), L, V)
CASES = {
    "dit": ("dit", TINY + ["model.time_conditioning=true"]),
    "ar": ("ar", TINY),
    "energy": ("energy", TINY),
    # activation checkpointing + dropout at TP=2 against the plain dense run: the recompute must
    # replay the same dropout masks, and TP ranks must draw the masks the dense model draws.
    "dit_ckpt_dropout": ("dit", TINY + ["model.dropout=0.1", "model.activation_checkpointing=true"]),
    # block-causal denoiser (BD3-LM), its two-stream training forward on [x_t ; x0]
    "dit_block": ("dit", TINY + ["model.block_size=2"]),
    "dit_block_ckpt_dropout": ("dit", TINY + ["model.block_size=2", "model.dropout=0.1",
                                              "model.activation_checkpointing=true"]),
}


def _batch():
    g = torch.Generator().manual_seed(123)
    return {
        "tokens": torch.randint(0, V, (B, L), generator=g),
        "x0": torch.randint(0, V, (B, L), generator=g),
        "sigma": torch.rand(B, generator=g) * 3,
        "targets": torch.randint(0, V, (B, L), generator=g),
        "probe": torch.randn(B, L, V, generator=g),
        "coeff": torch.randn(B, generator=g),
    }


def _random_full_weights(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            out[name] = torch.randn(shape, generator=g) * (0.7 / math.sqrt(shape[1]))
        elif "norm" in name:
            out[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.2 * torch.randn(shape, generator=g)
    return out


def _loss(kind: str, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss touching every output: vocab-parallel CE + a linear probe of the gathered logits."""
    torch.manual_seed(SEED + 1)  # same dropout stream in the dense and TP runs
    if kind == "energy":
        energy = model(batch["tokens"], batch["x0"], batch["sigma"])
        return (energy * batch["coeff"]).sum(), energy
    if kind == "dit" and model.is_block_causal:
        logits = model(batch["tokens"], None, x0=batch["x0"])
    else:
        logits = model(batch["tokens"], batch["sigma"]) if kind == "dit" else model(batch["tokens"])
    full = gather_vocab_logits(logits, V)
    if tp_group() is not None:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        ce = vocab_parallel_cross_entropy(logits.clone(), batch["targets"]).mean()
    else:
        ce = F.cross_entropy(logits.reshape(-1, V), batch["targets"].reshape(-1))
    return ce + (full * batch["probe"]).sum() / full.numel(), full


def _run(kind: str, model_cfg, batch, weights=None):
    torch.manual_seed(SEED)
    model = build_model(kind, model_cfg, V, L)
    initial = full_state_dict(model)
    if weights is None:
        weights = _random_full_weights({k: v.shape for k, v in initial.items()})
    load_full_state_dict(model, weights)
    loss, out = _loss(kind, model, batch)
    loss.backward()
    return model, initial, weights, out.detach(), full_grads(model)


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"parameter sets differ: {sorted(set(a) ^ set(b))}"
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1.0)).item() for k in a)


def _tp_rank(references: dict, batch: dict) -> dict:
    from edlm_dist.parallel.runtime import init_parallel

    results = {}
    for case, (kind, overrides) in CASES.items():
        cfg = load_config(None, ["parallel.tp=2", *overrides])
        init_parallel(cfg)
        ref = references[case]
        model, initial, _, out, grads = _run(kind, cfg.model, batch, ref["weights"])
        results[case] = {
            "init_err": _max_rel(initial, ref["initial"]),
            "out_err": ((out - ref["out"]).abs().max() / ref["out"].abs().max()).item(),
            "grad_err": _max_rel(grads, ref["grads"]),
            "norm_err": abs(grad_norm(model).item() - ref["norm"]) / ref["norm"],
            "params": sum(p.numel() for p in ref["grads"].values()),
            "sharded": sorted(n for n, p in model.named_parameters() if is_tp_sharded(p)),
            "local_out_cols": model.output_layer.linear.weight.shape[0] if kind != "energy" else None,
            "vocab_range": model.vocab_range() if kind != "energy" else None,
        }
        if kind == "energy":
            results[case]["from_diffusion_err"] = _energy_init_from_diffusion(cfg.model)
    return results


def _energy_init_from_diffusion(model_cfg) -> float:
    """Energy trunk loaded from a TP=2 DiT, once from local shards and once from full tensors."""
    dit = build_model("dit", model_cfg, V, L)
    load_full_state_dict(dit, {k: v + torch.randn_like(v) for k, v in full_state_dict(dit).items()})
    worst = 0.0
    for source in (dit.state_dict(), full_state_dict(dit)):
        energy = build_model("energy", model_cfg, V, L)
        energy.init_from_diffusion(source)
        theirs = dict(dit.named_parameters())
        for name, p in energy.named_parameters():
            if name.startswith(("vocab_embed.", "sigma_map.", "blocks.")):
                worst = max(worst, (p - theirs[name]).abs().max().item())
    return worst


pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def tp_results():
    batch = _batch()
    references = {}
    for case, (kind, overrides) in CASES.items():
        cfg = load_config(None, overrides)
        model, initial, weights, out, grads = _run(kind, cfg.model, batch)
        references[case] = {"initial": initial, "weights": weights, "out": out, "grads": grads,
                             "norm": grad_norm(model).item()}
    per_rank = run_on_ranks(_tp_rank, 2, references, batch, timeout=240)
    return per_rank


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_forward_and_all_grads_match_dense(tp_results, case):
    for rank, results in enumerate(tp_results):
        r = results[case]
        # TP splits every matmul's reduction over the ranks and sums the parts: another order
        assert r["out_err"] < tolerance(torch.float32, NETWORK_N)[0], (rank, case, r)
        # gradients add the loss's reduction over B·L positions; the norm then sums every squared gradient
        assert r["grad_err"] < tolerance(torch.float32, NETWORK_N + B * L)[0], (rank, case, r)
        assert r["norm_err"] < tolerance(torch.float32, NETWORK_N + B * L + r["params"])[0], (rank, case, r)


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_gives_same_full_initial_weights_at_tp2(tp_results, case):
    for results in tp_results:
        assert results[case]["init_err"] == 0.0


def test_only_the_matmul_weights_are_sharded(tp_results):
    per_block = ["attn_out.weight", "attn_qkv.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.weight"]
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in per_block]
    expected_dit = sorted(blocks + ["vocab_embed.weight", "output_layer.linear.weight", "output_layer.linear.bias"])
    expected_energy = sorted(blocks + ["vocab_embed.weight"])
    for results in tp_results:
        assert results["dit"]["sharded"] == expected_dit
        assert results["ar"]["sharded"] == expected_dit
        assert results["energy"]["sharded"] == expected_energy


def test_vocab_is_padded_to_split_evenly(tp_results):
    # 37 tokens over 2 ranks -> 38 columns, 19 per rank; the padding column lives on rank 1.
    assert [r["dit"]["vocab_range"] for r in tp_results] == [(0, 19), (19, 38)]
    assert [r["ar"]["local_out_cols"] for r in tp_results] == [19, 19]


def test_energy_trunk_loads_from_local_or_full_diffusion_state(tp_results):
    for results in tp_results:
        assert results["energy"]["from_diffusion_err"] == 0.0
