"""`edlm export-hf` round trips and ZeRO/TP checkpoint consolidation on tiny trained runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import ModelConfig, SyntheticConfig
from edlm_dist.errors import CheckpointError
from tests.spawn import run_on_ranks
from tests.tolerances import approx_across, assert_close_across, network_reduction_size

pytestmark = pytest.mark.multirank
STEPS = 6
# the trained tiny models' forward: hidden 32, 2 blocks, L = 32, 32 tokens + BOS, EOS, mask (+ 256 sigma features)
TINY_N = network_reduction_size(ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16), 32, 35) + 256


def _overrides(data_dir, **extra) -> list[str]:
    base = {"data.dir": str(data_dir), "data.seq_len": 32, "model.hidden_size": 32, "model.n_blocks": 2,
            "model.n_heads": 4, "model.cond_dim": 16, "model.time_conditioning": True, "train.global_batch": 16,
            "train.micro_batch": 8, "train.lr": 3e-3, "train.warmup_steps": 2, "train.steps": STEPS,
            "train.val_every": 1000, "train.save_every": 1000, "train.ema": 0.9, "logging.progress": False,
            "train.precision": "fp32"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(out, overrides) -> bool:
    from edlm_dist.training.trainer import train

    train(load_config(None, overrides), out)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained MDLM, AR and NCE runs (one process each) on a small synthetic dataset."""
    from edlm_dist.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    prepare_data("synthetic", data, seq_len=32, tokenizer_spec="synthetic",
                 synthetic_cfg=SyntheticConfig(train_rows=1000, valid_rows=64), seed=1, progress=False)
    out = {"data": data}
    for name, extra in (("mdlm", {}), ("ar", {"train.objective": "ar"}),
                        ("nce", {"train.objective": "nce", "train.diffusion_ckpt": str(root / "mdlm"),
                                 "model.time_conditioning": False})):  # the NCE loss passes no sigma
        run_on_ranks(_train, 1, str(root / name), _overrides(data, **extra))
        out[name] = root / name
    return out


def _edlm_model(run, use_ema=True):
    from edlm_dist.artifacts.weights import load_trained_model

    model, meta, _ = load_trained_model(run, use_ema=use_ema)
    return model, meta


def _inputs(meta, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, meta["vocab_size"] - 1, (3, meta["seq_len"]), generator=g)
    x_t = torch.where(torch.rand(x0.shape, generator=g) < 0.5, torch.full_like(x0, meta["mask_id"]), x0)
    return x0, x_t, torch.rand(3, generator=g)


def test_diffusion_export_round_trips_logits(runs, tmp_path):
    import edlm_dist.artifacts.hf_models  # noqa: F401  (registers the model types)
    from transformers import AutoConfig, AutoModel

    from edlm_dist.artifacts.hf_export import export_hf

    model, meta = _edlm_model(runs["mdlm"])
    raw_model, _ = _edlm_model(runs["mdlm"], use_ema=False)
    x0, x_t, sigma = _inputs(meta)
    for use_ema, reference in ((True, model), (False, raw_model)):
        folder = export_hf(runs["mdlm"], tmp_path / f"dit_{use_ema}", use_ema=use_ema)
        assert AutoConfig.from_pretrained(folder).model_type == "edlm_dit"
        hf = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            got = hf(input_ids=x_t, sigma=sigma).logits
            # same modules and weights, but other tensors: MKL's kernels may depend on their alignment
            assert_close_across(got, reference(x_t, sigma, gather_logits=True), dtype=torch.float32,
                                reduction_size=TINY_N)
            assert not torch.equal(hf(input_ids=x_t, sigma=sigma * 0).logits, got)  # sigma reaches the model
    with torch.no_grad():  # EMA and raw weights are different models after training
        assert not torch.equal(model(x_t, sigma, gather_logits=True), raw_model(x_t, sigma, gather_logits=True))
    exported_meta = json.loads((tmp_path / "dit_True" / "edlm_meta.json").read_text())
    assert exported_meta["kind"] == "dit" and exported_meta["step"] == STEPS


def _perturbed_weights(run, dest, seed=0):
    """A copy of ``run``'s weights folder with every tensor moved by noise (a generic trained-looking model)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(run / "weights", dest)
    g = torch.Generator().manual_seed(seed)
    for name in ("model.safetensors", "ema.safetensors"):
        state = load_file(str(dest / name))
        save_file({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in state.items()}, str(dest / name))
    return dest


def test_energy_export_round_trips_energies(runs, tmp_path):
    import edlm_dist.artifacts.hf_models  # noqa: F401
    from transformers import AutoModel

    from edlm_dist.artifacts.hf_export import export_hf

    # The NCE run's own weights give E = 0 for every input at this size (zero-initialised head), which
    # would make the comparison vacuous: export a perturbed copy of its weights folder as well.
    for source in (runs["nce"], _perturbed_weights(runs["nce"], tmp_path / "weights")):
        model, meta = _edlm_model(source)
        hf = AutoModel.from_pretrained(export_hf(source, tmp_path / "energy")).eval()
        x0, x_t, sigma = _inputs(meta, seed=1)
        with torch.no_grad():
            energies = hf(x_t=x_t, x0=x0, sigma=sigma).energies
            assert energies.shape == (3,)
            assert_close_across(energies, model(x_t, x0, sigma), dtype=torch.float32, reduction_size=TINY_N)
    assert energies.abs().min() > 0 and len(set(energies.tolist())) == 3  # input-dependent energies


def test_ar_export_is_a_causal_lm_and_gen_ppl_oracle(runs, tmp_path):
    import edlm_dist.artifacts.hf_models  # noqa: F401
    from transformers import AutoModelForCausalLM

    from edlm_dist.data.tokenizers import build_tokenizer
    from edlm_dist.evaluation.genppl import GenPPLAccumulator, HFCausalLMOracle, genppl_token_weights
    from edlm_dist.artifacts.hf_export import export_hf
    from edlm_dist.objectives.subs import suppress_mask_logit

    model, meta = _edlm_model(runs["ar"])
    folder = export_hf(runs["ar"], tmp_path / "ar")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x0, _, _ = _inputs(meta, seed=2)
    with torch.no_grad():
        expected = suppress_mask_logit(model(x0, gather_logits=True), meta["mask_id"])
        assert_close_across(hf(input_ids=x0).logits, expected, dtype=torch.float32, reduction_size=TINY_N)
        # Greedy generation with the HF cache equals step-by-step argmax of the edlm model.
        prompt = x0[:1, :4]
        generated = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens = prompt
        for _ in range(6):
            tokens = torch.cat([tokens, model.log_probs(tokens, meta["mask_id"])[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens)

    # Gen PPL through HFCausalLMOracle (retokenises the text) equals the edlm AR model's own NLL.
    tok = build_tokenizer(str(runs["data"] / "tokenizer"))
    rows = x0.clone()
    rows[:, 0] = tok.bos_id
    rows[1, 20] = tok.eos_id
    oracle = HFCausalLMOracle(str(folder), batch_size=2)
    assert oracle.context == meta["seq_len"]
    got = oracle.score([tok.decode(r.tolist()) for r in rows])
    with torch.no_grad():
        log_probs = model.log_probs(rows, meta["mask_id"]).double()
    nll = -log_probs[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1)
    want = GenPPLAccumulator()
    want.add(nll, genppl_token_weights(rows, torch.ones_like(rows), tok.eos_id))
    assert got.weight_sum == want.weight_sum
    # F.cross_entropy on the HF logits vs our float64 log-softmax and gather, summed over the rows' tokens
    assert got.nll_sum == approx_across(want.nll_sum, dtype=torch.float32, reduction_size=TINY_N + rows.numel())


@pytest.mark.parametrize("spec", ["synthetic", "text8", "gpt2", "char", "byte"])
def test_exported_tokenizer_matches_edlm_tokenizer(runs, tmp_path, spec):
    from transformers import AutoTokenizer

    from edlm_dist.data.learned_tokenizers import learn_tokenizer
    from edlm_dist.data.tokenizers import build_tokenizer, gpt2_files_from_package
    from edlm_dist.artifacts.hf_export import hf_tokenizer

    text = "Hello World\n\nthe [MASK] quick  brown [EOS]fox Ünïcode <|endoftext|> x"
    if spec == "synthetic":
        tok = build_tokenizer(str(runs["data"] / "tokenizer"))
        text = "w3 w0  w31\n[BOS] w7 [MASK] w2 [EOS]"
    elif spec in ("char", "byte"):  # learnt: a literal "[MASK]" is characters to edlm, the mask to HF; keep it out
        text = text.replace("[MASK]", "mask").replace("[EOS]", "eos")
        tok = learn_tokenizer(spec, [text, "Other training text."], vocab=0 if spec == "char" else 280)
    else:
        tok = build_tokenizer("text8" if spec == "text8" else str(gpt2_files_from_package(tmp_path / "gpt2")))
    hf_tokenizer(tok, model_max_length=32).save_pretrained(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    if spec != "gpt2":  # GPT-2's literal "[MASK]" text is BPE, not the mask id (edlm never encodes it either)
        assert hf.mask_token_id == tok.mask_id and hf.eos_token_id == tok.eos_id and len(hf) == tok.vocab_size
        ids = ids + [tok.mask_id, tok.bos_id]
    assert hf.decode(ids) == tok.decode(ids)


def _consolidation_run(root, data, *, zero_stage: int, tp: int):
    out = root / f"zero{zero_stage}_tp{tp}"
    run_on_ranks(_train, 2, str(out), _overrides(data, **{"train.zero_stage": zero_stage, "parallel.tp": tp}))
    return out


@pytest.mark.parametrize("zero_stage,tp", [(2, 1), (1, 2)])
def test_sharded_checkpoint_consolidates_to_the_exported_weights(runs, tmp_path, zero_stage, tp):
    from edlm_dist.cli import main as edlm_main
    from edlm_dist.artifacts.zero_to_fp32 import checkpoint_to_weights
    from edlm_dist.artifacts.weights import load_trained_model

    out = _consolidation_run(tmp_path, runs["data"], zero_stage=zero_stage, tp=tp)
    step_dir = out / "checkpoints" / f"step_{STEPS:08d}"
    shards = sorted(p.name for p in step_dir.glob("*_states.pt"))
    if zero_stage == 2:  # the optimizer's fp32 master weights are split over the 2 data-parallel ranks
        assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    else:  # one ZeRO-1 group per tensor-parallel rank, each holding half of every sharded matrix
        assert "mp_rank_01_model_states.pt" in shards and "zero_pp_rank_0_mp_rank_01_optim_states.pt" in shards
    converted = checkpoint_to_weights(step_dir, tmp_path / "converted")
    for name in ("model.safetensors", "ema.safetensors"):
        expected, got = load_file(str(out / "weights" / name)), load_file(str(converted / name))
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}:{key}"
    model, meta, _ = load_trained_model(converted)  # the converted folder is a normal weights folder
    assert meta["step"] == STEPS and meta["kind"] == "dit"

    # `edlm export-hf` accepts the checkpoint folder itself and consolidates on the fly.
    assert edlm_main(["export-hf", str(step_dir), "--out", str(tmp_path / "hf")]) == 0
    import edlm_dist.artifacts.hf_models  # noqa: F401
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x0, x_t, sigma = _inputs(meta, seed=3)
    with torch.no_grad():
        assert_close_across(hf(input_ids=x_t, sigma=sigma).logits, model(x_t, sigma, gather_logits=True),
                            dtype=torch.float32, reduction_size=TINY_N)


def test_export_errors_name_the_problem(runs, tmp_path, capsys):
    from edlm_dist.cli import main as edlm_main
    from edlm_dist.artifacts.hf_export import export_hf

    with pytest.raises(CheckpointError, match="no DeepSpeed checkpoint"):
        export_hf(tmp_path, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert edlm_main(["export-hf", str(runs["ar"]), "--out", str(taken)]) == 2
    assert "is not an edlm export" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "keep me"


def _sample(overrides, out) -> list:
    from edlm_dist.sampling.run import run_sampling

    run_sampling(load_config(None, overrides), out)
    return [json.loads(line)["tokens"] for line in (out / "samples.jsonl").read_text().splitlines()]


def test_sample_and_eval_accept_export_folders_bitwise(runs, tmp_path):
    """An export-hf folder loads back through from_pretrained into the same tensors, so `edlm sample` from
    exports gives the run folders' samples bit for bit, and `edlm eval` warns that the exported AR is the energy."""
    from edlm_dist.artifacts.hf_export import export_hf
    from edlm_dist.artifacts.weights import load_trained_model
    from edlm_dist.evaluation.run import warn_if_judge_is_not_independent

    exports = {name: export_hf(runs[name], tmp_path / f"hf_{name}") for name in ("mdlm", "ar")}
    for name in ("mdlm", "ar"):
        from_run, from_export = load_trained_model(runs[name])[0], load_trained_model(exports[name])[0]
        want, got = from_run.state_dict(), from_export.state_dict()
        for key in want:
            if name == "ar" and key.startswith("output_layer.linear"):  # the mask row is 0 / -1e6 in an export
                continue
            assert torch.equal(got[key], want[key]), (name, key)
    common = ["sample.sampler=edlm", "sample.energy=ar", "sample.steps=4", "sample.k=2", "sample.num_samples=3",
              "sample.batch_size=3", "logging.progress=false", f"data.dir={runs['data']}"]
    from_runs = run_on_ranks(_sample, 1, common + [f"sample.diffusion_ckpt={runs['mdlm']}",
                                                   f"sample.ar_ckpt={runs['ar']}"], tmp_path / "s_runs")[0]
    from_exports = run_on_ranks(_sample, 1, common + [f"sample.diffusion_ckpt={exports['mdlm']}",
                                                      f"sample.ar_ckpt={exports['ar']}"], tmp_path / "s_exports")[0]
    assert from_exports == from_runs
    message = warn_if_judge_is_not_independent(str(exports["ar"]), {"ar": str(runs["ar"])}, str(runs["data"]))
    assert message and "EDLM's own AR energy" in message
    assert warn_if_judge_is_not_independent(str(exports["mdlm"]), {}, None) is None


def test_block_causal_diffusion_keeps_its_block_size_through_the_hf_config():
    """A block-causal DiT rebuilt from its HF config is block-causal again (same logits), not an MDLM with its
    weights: the exported config carries model.block_size."""
    import edlm_dist.artifacts.hf_models as hf_models
    from edlm_dist.models.build import build_model
    from edlm_dist.parallel.sharded_state import full_state_dict, load_full_state_dict

    cfg = ModelConfig(hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, block_size=4)
    torch.manual_seed(0)
    dit = build_model("dit", cfg, 35, 16).eval()
    load_full_state_dict(dit, {k: torch.randn_like(v) * 0.3 for k, v in full_state_dict(dit).items()})
    config = hf_models.wrapped_hf_config("dit", cfg, vocab_size=35, seq_len=16, mask_id=34, bos_id=32, eos_id=33)
    hf = hf_models.EdlmDiffusionModel(config).eval()
    load_full_state_dict(hf.model, full_state_dict(dit))
    assert hf.model.is_block_causal and hf.model.block_size == 4
    tokens = torch.randint(0, 34, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=tokens).logits, dit(tokens, gather_logits=True))
