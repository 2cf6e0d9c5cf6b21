"""Distributed proposal sampler: distributed ≡ single rank.

Two gloo ranks sample with the k proposals split over them (k = 4, 3 and 1: divisible, uneven,
fewer proposals than ranks; block-wise with the cached coAR energy; block-wise with the block-causal denoiser's prefix
cache too; k = 3 also with a prompt and an infilling template), and as two data-parallel groups, and (second fork) with a tensor-parallel diffusion + AR energy pair. Every layout must give exactly the tokens of one process
drawing all k itself, with x_t identical on every rank after every step (per-step hashes).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig
from edlm_dist.errors import ConfigError, SamplingError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import load_full_state_dict
from edlm_dist.parallel.proposals import default_proposal_parallel, proposal_split, sampling_layout
from edlm_dist.sampling.block_denoiser import BlockCausalDenoiser
from edlm_dist.sampling.blocks import sample_rows
from edlm_dist.sampling.model_energies import AREnergy
from edlm_dist.sampling.run import _batches
from tests.spawn import run_on_ranks
from edlm_dist.sampling.engine import ModelDenoiser, SamplerSettings, sample_batch
from tests.tolerances import approx_across, network_reduction_size

pytestmark = pytest.mark.multirank

VOCAB, LENGTH, MASK = 7, 8, 6
TINY = ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, dropout=0.0, use_apex=False)
IDS = [0, 1, 2]
CASES = {  # name: settings
    "k4": SamplerSettings(sampler="edlm", steps=8, k=4, window=0.5, seed=9),
    "k3": SamplerSettings(sampler="edlm", steps=8, k=3, window=0.5, seed=9),
    "k1": SamplerSettings(sampler="edlm", steps=8, k=1, window=0.5, seed=9),
    "k4_reuse": SamplerSettings(sampler="edlm", steps=8, k=4, window=0.5, seed=9, redraw_every_step=False),
    # block-wise, with the coAR energy's prefix KV cache extended on every rank (sampling/prefix_energies.py)
    "k3_blocks": SamplerSettings(sampler="edlm", steps=3, k=3, window=1.0, seed=9, block_size=3),
    # the block-causal denoiser (model blocks of 4, sampler blocks of 2): every rank keeps its own prefix cache
    # of the same committed rows (its calls are replicated), the coAR energy's is shared as above
    "k3_block_causal": SamplerSettings(sampler="edlm", steps=3, k=3, window=1.0, seed=9, block_size=2),
    "k3_prompts": SamplerSettings(sampler="edlm", steps=8, k=3, window=0.5, seed=9),
}
BLOCK_CAUSAL = dataclasses.replace(TINY, block_size=4, time_conditioning=False)
NETWORK_N = network_reduction_size(TINY, LENGTH, VOCAB)
TP_CASES = ("k4", "k3_blocks", "k3_block_causal")
# Fixed tokens (mask = generated): a prompt, an infilling template and a free row.
PROMPTED = {"k3_prompts": torch.tensor([[5, 1, 2, MASK, MASK, MASK, MASK, MASK],
                                        [5, 3, MASK, MASK, 0, 4, MASK, MASK],
                                        [MASK] * LENGTH])}
DATA_PARALLEL = SamplerSettings(sampler="edlm", steps=8, k=2, window=1.0, seed=4)


def _random_state(kind: str, seed: int, cfg: ModelConfig = TINY) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(kind, cfg, VOCAB, LENGTH)
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) * (0.8 / math.sqrt(p.shape[1] if p.dim() == 2 else 1))
            for name, p in model.named_parameters()}


def _models(states):
    """The denoisers (whole-row DiT, block-causal DiT) + coAR energy for the current TP group, from full
    (TP-independent) weights."""
    models = {}
    for name, kind, cfg in (("dit", "dit", TINY), ("ar", "ar", TINY), ("block_causal", "dit", BLOCK_CAUSAL)):
        torch.manual_seed(0)
        models[name] = build_model(kind, cfg, VOCAB, LENGTH)
        load_full_state_dict(models[name], states[name])
        models[name].eval()
    denoisers = {"whole_row": ModelDenoiser(models["dit"], MASK, VOCAB),
                 "block_causal": BlockCausalDenoiser(models["block_causal"], MASK, VOCAB)}
    return denoisers, AREnergy(models["ar"], MASK, carry_over=True)


def _sample(denoisers, energy, name, ids, proposals=None):
    denoiser = denoisers["block_causal" if name.endswith("block_causal") else "whole_row"]
    out = sample_rows(denoiser, CASES[name], ids, length=LENGTH, mask_id=MASK, energy_fn=energy, proposals=proposals,
                      trace=True, x_init=PROMPTED.get(name))
    return {"tokens": out.tokens, "hashes": out.step_hashes, "ess": out.ess_per_step,
            "energy_evaluations": out.energy_evaluations, "prefix_calls": out.prefix_calls}


@pytest.fixture(scope="module")
def states():
    return {"dit": _random_state("dit", 1), "ar": _random_state("ar", 2),
            "block_causal": _random_state("dit", 3, BLOCK_CAUSAL)}


@pytest.fixture(scope="module")
def reference(states):
    denoisers, energy = _models(states)
    out = {name: _sample(denoisers, energy, name, IDS) for name in CASES}
    fixed = PROMPTED["k3_prompts"] != MASK
    assert torch.equal(out["k3_prompts"]["tokens"][fixed], PROMPTED["k3_prompts"][fixed])  # kept by every step
    out["data_parallel"] = sample_rows(denoisers["whole_row"], DATA_PARALLEL, range(5), length=LENGTH, mask_id=MASK,
                                       energy_fn=energy).tokens
    return out


def _rank_tp1(states):
    from edlm_dist.parallel.proposals import DistributedProposals
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["train.global_batch=2", "train.micro_batch=1"]))
    denoisers, energy = _models(states)
    denoiser = denoisers["whole_row"]
    result = {}
    for name, settings in CASES.items():  # one proposal group of P = 2
        layout = sampling_layout(ctx, 2, settings.k)
        assert (layout.proposal_size, layout.data_size, layout.writes) == (2, 1, ctx.rank == 0)
        result[name] = _sample(denoisers, energy, name, IDS, layout.proposals)
    layout = sampling_layout(ctx, 1, DATA_PARALLEL.k)  # two data-parallel groups of one rank
    assert (layout.proposal_size, layout.data_size, layout.data_rank) == (1, 2, ctx.rank)
    result["data_parallel"] = {ids[0]: sample_batch(denoiser, DATA_PARALLEL, ids, length=LENGTH, mask_id=MASK,
                                                    energy_fn=energy, proposals=layout.proposals).tokens
                               for ids in _batches(5, 2, layout.data_rank, layout.data_size)}
    drifted = torch.full((1, LENGTH), ctx.rank)  # ranks that drifted apart must fail loudly on every rank
    for name, call in (("drift_end", lambda p: p.check_in_sync(drifted, "at the end of the batch")),
                       ("drift_is", lambda p: p.gather(torch.zeros(1, 1, dtype=torch.float64),
                                                       torch.zeros(1, 1, LENGTH, dtype=torch.long), 2, drifted))):
        try:
            call(DistributedProposals())
            result[name] = None
        except SamplingError as exc:
            result[name] = str(exc)
    return result


def _rank_tp2(states):
    from edlm_dist.parallel.runtime import init_parallel

    ctx = init_parallel(load_config(None, ["parallel.tp=2", "train.global_batch=2", "train.micro_batch=2"]))
    assert ctx.tp_size == 2 and ctx.dp_size == 1
    denoisers, energy = _models(states)  # every model sharded over the two ranks
    layout = sampling_layout(ctx, 0, CASES["k4"].k)
    assert (layout.proposal_size, layout.data_size, layout.writes) == (1, 1, ctx.rank == 0)
    return {name: _sample(denoisers, energy, name, IDS, layout.proposals) for name in TP_CASES}


def test_proposal_split_and_default_group_size():
    assert [list(r) for r in proposal_split(4, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in proposal_split(5, 3)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in proposal_split(1, 2)] == [[0], []]
    assert default_proposal_parallel(8, 2) == 2 and default_proposal_parallel(8, 16) == 8
    assert default_proposal_parallel(6, 4) == 3 and default_proposal_parallel(4, 1) == 1
    ctx = SimpleNamespace(world_size=4, dp_size=4, tp_size=1)
    with pytest.raises(ConfigError, match="must divide the data-parallel size 4"):
        sampling_layout(ctx, 3, 4)


def test_two_ranks_sample_exactly_what_one_rank_samples(states, reference):
    ranks = run_on_ranks(_rank_tp1, 2, states, timeout=240)
    for name, settings in CASES.items():
        ref = reference[name]
        for rank in ranks:
            assert torch.equal(rank[name]["tokens"], ref["tokens"]), name
            assert rank[name]["hashes"] == ref["hashes"], name  # x_t identical at every step, on every rank
            # ESS: a smooth function of the energies, which each rank computes in fp32 batches of
            # another size than the single process (None where a step ran no importance sampling)
            assert [v is None for v in rank[name]["ess"]] == [v is None for v in ref["ess"]], name
            for got, want in zip(rank[name]["ess"], ref["ess"]):
                assert want is None or got == approx_across(want, dtype=torch.float32, reduction_size=NETWORK_N), name
        owned = [len(r) for r in proposal_split(settings.k, 2)]
        shares = [rank[name]["energy_evaluations"] for rank in ranks]
        assert sum(shares) == ref["energy_evaluations"], name  # each proposal drawn and scored exactly once
        assert shares[0] * max(1, owned[1]) == shares[1] * owned[0] or owned[1] == 0, (name, shares)
    assert ranks[1]["k1"]["energy_evaluations"] == 0  # k < P: rank 1 only joins the exchange
    # Block-wise: every committed block joins each rank's AR prefix cache from the rank that scored it (copied
    # or broadcast), never by an extension call, exactly as in one process.
    assert reference["k3_blocks"]["prefix_calls"] == 0
    assert [rank["k3_blocks"]["prefix_calls"] for rank in ranks] == [0, 0]
    # the block-causal denoiser's prefix commits: the same count on every rank as in one process (replicated)
    assert [rank["k3_block_causal"]["prefix_calls"] for rank in ranks] == [reference["k3_block_causal"]["prefix_calls"]] * 2
    assert len(set(tuple(r["k4"]["hashes"]) for r in ranks)) == 1
    gathered = {**ranks[0]["data_parallel"], **ranks[1]["data_parallel"]}
    assert sorted(gathered) == [0, 2, 4] and sorted(ranks[1]["data_parallel"]) == [2]
    assert torch.equal(torch.cat([gathered[i] for i in (0, 2, 4)]), reference["data_parallel"])
    for rank in ranks:
        assert "x_t differs between the ranks of a proposal group at the end" in (rank["drift_end"] or "")
        assert "x_t differs between the ranks of a proposal group at an importance" in (rank["drift_is"] or "")


def test_tensor_parallel_models_sample_what_dense_models_sample(states, reference):
    ranks = run_on_ranks(_rank_tp2, 2, states, timeout=240)
    for rank in ranks:
        for name in TP_CASES:
            assert torch.equal(rank[name]["tokens"], reference[name]["tokens"]), name
            assert rank[name]["hashes"] == reference[name]["hashes"], name
