"""``edlm sample`` end to end on tiny trained models, the exact-oracle EDLM-vs-MDLM comparison, and the
one-line errors for bad input.

The module fixture prepares a small synthetic data set and trains an MDLM (300 steps), an AR model and
an NCE energy model (a few steps each) in a forked child (training initialises torch.distributed,
which must stay out of the pytest process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edlm_dist.artifacts.weights import load_trained_model, read_weights_meta, synthetic_language_for
from edlm_dist.cli import main
from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.evaluation.sample_metrics import ExactSyntheticOracle, score_sample_file
from edlm_dist.sampling.engine import ModelDenoiser, SamplerSettings, sample_batch
from tests.spawn import run_on_ranks


DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
QUIET = ["logging.progress=false", "train.val_every=1000", "train.save_every=1000", "train.log_every=1000"]


def _train(data_dir: str, out: str, overrides: list[str]) -> bool:
    from edlm_dist.config.load import load_config
    from edlm_dist.training.trainer import train

    train(load_config(DEMO, [f"data.dir={data_dir}", *QUIET, *overrides]), out)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from edlm_dist.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("sample_cli")
    data = root / "data"
    prepare_data("synthetic", data, seq_len=32, synthetic_cfg=SyntheticConfig(train_rows=4000, valid_rows=64),
                 seed=1, progress=False)
    paths = {name: str(root / name) for name in ("mdlm", "ar", "nce")}
    run_on_ranks(_train, 1, str(data), paths["mdlm"], ["train.steps=300"], timeout=300)
    run_on_ranks(_train, 1, str(data), paths["ar"], ["train.objective=ar", "train.steps=60"], timeout=300)
    run_on_ranks(_train, 1, str(data), paths["nce"], ["train.objective=nce", "train.steps=5",
                                                       f"train.diffusion_ckpt={paths['mdlm']}"], timeout=300)
    return paths


def _sample(capsys, out: Path, *overrides: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["sample", DEMO, "--out", str(out), "logging.progress=false", *overrides])
    return code, capsys.readouterr().err


def _read(out: Path):
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def _oracle_nll(out: Path, language) -> dict:
    """Mean exact NLL per row (nats) of a sample folder and its standard error, from the evaluation API."""
    nll = score_sample_file(out / "samples.jsonl", ExactSyntheticOracle(language), entropy=False)[1].nll
    return {"mean_nll": float(nll.mean()), "stderr": float(nll.std() / math.sqrt(len(nll)))}


def test_edlm_with_the_exact_oracle_beats_mdlm_at_few_steps(runs, tmp_path, capsys):
    """T = L/8 = 4 steps, 96 samples each, k = 8 proposals over the whole trajectory (w = 1). Observed on
    this setup: MDLM ~310 vs EDLM-oracle ~276 nats per row (stderr ~3 each). Required: EDLM lower by
    more than 5 nats AND by more than 3 standard errors of the difference (one-sided z > 3, p < 0.0014)."""
    common = [f"sample.diffusion_ckpt={runs['mdlm']}", "sample.steps=4", "sample.num_samples=96",
              "sample.batch_size=48", "sample.seed=3"]
    assert _sample(capsys, tmp_path / "mdlm", "sample.sampler=mdlm", *common)[0] == 0
    assert _sample(capsys, tmp_path / "edlm", "sample.sampler=edlm", "sample.energy=oracle", "sample.k=8",
                   "sample.window=1.0", *common)[0] == 0
    language = synthetic_language_for(read_weights_meta(runs["mdlm"])[1])
    mdlm, edlm = _oracle_nll(tmp_path / "mdlm", language), _oracle_nll(tmp_path / "edlm", language)
    gap = mdlm["mean_nll"] - edlm["mean_nll"]
    stderr = math.hypot(mdlm["stderr"], edlm["stderr"])
    assert gap > 10.0 and gap > 4.0 * stderr, (mdlm, edlm)


def test_sample_cli_writes_samples_and_summary(runs, tmp_path, capsys):
    out = tmp_path / "coar"
    code, err = _sample(capsys, out, "sample.sampler=edlm", "sample.energy=coar", f"sample.ar_ckpt={runs['ar']}",
                        f"sample.diffusion_ckpt={runs['mdlm']}", "sample.num_samples=7", "sample.batch_size=3",
                        "sample.steps=6", "sample.k=3", "sample.window=0.5", "sample.seed=5")
    assert code == 0, err
    rows, summary = _read(out)
    dit, meta, _ = load_trained_model(runs["mdlm"], expect_kind="dit")
    language = synthetic_language_for(meta)
    tokens = torch.tensor([r["tokens"] for r in rows])
    assert [r["index"] for r in rows] == list(range(7)) and tokens.shape == (7, 32)
    assert [r["text"] for r in rows] == [language.tokenizer.decode(t) for t in tokens.tolist()]
    assert all(r["seconds"] > 0 and 1.0 <= r["mean_ess"] <= 3.0 for r in rows)
    torch.testing.assert_close(score_sample_file(out / "samples.jsonl", ExactSyntheticOracle(language),
                                                 entropy=False)[1].nll, -language.log_prob(tokens))
    for key, value in {"sampler": "edlm", "energy": "coar", "update": "ddpm_cache", "steps": 6, "k": 3,
                       "window": 0.5, "temperature": 1.0, "precision": "float64", "use_ema": True, "seed": 5,
                       "num_samples": 7, "redraw_every_step": True, "proposal_parallel": 1}.items():
        assert summary[key] == value, key
    assert summary["checkpoints"]["diffusion"]["path"] == str(Path(runs["mdlm"]).resolve())
    assert summary["checkpoints"]["ar"]["kind"] == "ar" and "git_commit" in summary
    ess_steps = summary["ess_per_step"]  # window 0.5 on T = 6: t = 1, .83, .67, .5 are IS steps
    assert [v is not None for v in ess_steps] == [True] * 4 + [False] * 2
    assert summary["mean_ess"] == pytest.approx(sum(r["mean_ess"] for r in rows) / 7)
    # Same rows as the engine called directly on one batch: sample i does not depend on the batching.
    from edlm_dist.sampling.model_energies import AREnergy

    ar = load_trained_model(runs["ar"], expect_kind="ar")[0]
    settings = SamplerSettings(sampler="edlm", steps=6, k=3, window=0.5, seed=5)
    direct = sample_batch(ModelDenoiser(dit, meta["mask_id"], meta["vocab_size"]), settings, range(7), length=32,
                          mask_id=meta["mask_id"], energy_fn=AREnergy(ar, meta["mask_id"], carry_over=True))
    assert torch.equal(direct.tokens, tokens)
    # NCE and plain MDLM run too; MDLM records no EDLM-only settings.
    assert _sample(capsys, tmp_path / "nce", "sample.sampler=edlm", "sample.energy=nce",
                   f"sample.energy_ckpt={runs['nce']}", f"sample.diffusion_ckpt={runs['mdlm']}",
                   "sample.num_samples=2")[0] == 0
    code, _ = _sample(capsys, tmp_path / "mdlm", f"sample.diffusion_ckpt={runs['mdlm']}", "sample.num_samples=2",
                      "sample.update=ddpm", "sample.precision=float32")
    summary = _read(tmp_path / "mdlm")[1]
    assert code == 0 and summary["k"] is None and summary["energy"] is None and summary["mean_ess"] is None
    assert summary["update"] == "ddpm" and summary["precision"] == "float32"


def test_prompts_infilling_long_rows_and_show(runs, tmp_path, capsys):
    """Prompts from three places (text, token ids, a JSONL file), an infilling template, 48-token rows
    from a 32-token model (semi-AR windows), EDLM-coAR: fixed tokens kept, samples per prompt, readable
    fields, --show printing, and the summary recording it all."""
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"infill": "w1 [MASK:3] w2"}) + "\n")
    capsys.readouterr()
    code = main(["sample", DEMO, "--out", str(tmp_path / "p"), "logging.progress=false", "sample.sampler=edlm",
                 "sample.energy=coar", f"sample.ar_ckpt={runs['ar']}", f"sample.diffusion_ckpt={runs['mdlm']}",
                 "sample.num_samples=2", "sample.batch_size=4", "sample.steps=4", "sample.k=2", "sample.length=48",
                 "sample.stride=8", "--prompt", "w3 w30", "--prompt-ids", "32 7 _ 8", "--prompts-file",
                 str(prompts_file), "--show", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows, summary = _read(tmp_path / "p")
    starts = {0: [32, 3, 30], 1: [32, 7, None, 8], 2: [32, 1, None, None, None, 2]}
    assert [r["prompt_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    for row in rows:
        assert len(row["tokens"]) == 48 and 34 not in row["tokens"]
        for position, token in enumerate(starts[row["prompt_index"]]):
            assert token is None or row["tokens"][position] == token  # fixed tokens kept
        fixed = [position for start, end, kind in row["spans"] if kind == "fixed" for position in range(start, end)]
        assert fixed == [p for p, t in enumerate(starts[row["prompt_index"]]) if t is not None]
        assert row["marked_text"].startswith("[BOS] ") and "[[" in row["marked_text"]
    assert summary["prompts"] == ["w3 w30", "32 7 _ 8", "w1 [MASK:3] w2"]
    assert summary["length"] == 48 and summary["stride"] == 8 and summary["windows"] == 4
    assert summary["samples_per_prompt"] == 2 and summary["num_samples"] == 6
    assert captured.out.count("--- sample") == 3 and rows[0]["marked_text"] in captured.out


def test_ar_baseline_sampler_from_the_cli(runs, tmp_path, capsys):
    """sample.sampler=ar needs only the AR model; the rows are the AR sampler's own draws (with and without
    the KV cache), continue the prompt, and end with the model's EOS."""
    from edlm_dist.sampling.ar_sampler import sample_ar_batch

    common = [f"sample.ar_ckpt={runs['ar']}", "sample.sampler=ar", "sample.num_samples=3", "sample.seed=4"]
    assert _sample(capsys, tmp_path / "ar", *common, "--prompt", "w3 w30")[0] == 0
    assert _sample(capsys, tmp_path / "ar_full", *common, "sample.kv_cache=false", "--prompt", "w3 w30")[0] == 0
    rows, summary = _read(tmp_path / "ar")
    ar, meta, _ = load_trained_model(runs["ar"], expect_kind="ar")
    x_init = torch.full((3, 32), meta["mask_id"])
    x_init[:, :3] = torch.tensor([32, 3, 30])
    direct = sample_ar_batch(ar, SamplerSettings(sampler="ar", seed=4), range(3), length=32, mask_id=meta["mask_id"],
                             bos_id=32, x_init=x_init)
    assert [r["tokens"] for r in rows] == direct.tokens.tolist() == [r["tokens"] for r in _read(tmp_path / "ar_full")[0]]
    assert all(r["nfe"] == 29 == r["sequential_calls"] for r in rows)  # 29 tokens drawn: prefill + 28 decodes
    assert summary["sampler"] == "ar" and summary["kv_cache"] and summary["checkpoints"].keys() == {"ar"}


def _sample_on_rank(overrides: list[str], out: str, proposal_parallel: int, prompts: list[str]):
    from edlm_dist.config.load import load_config
    from edlm_dist.sampling.run import run_sampling

    cfg = load_config(DEMO, overrides)
    cfg.sample.prompts = prompts  # what --prompt sets
    summary = run_sampling(cfg, out, proposal_parallel=proposal_parallel)
    return None if summary is None else (summary["proposal_parallel"], summary["data_parallel_groups"])


def test_two_rank_sample_runs_write_the_single_rank_samples(runs, tmp_path, capsys):
    """Under a 2-rank launch the CLI path (layout, gather to rank 0, writing) gives the one-process rows,
    both as one proposal group (P = 2, the default for k >= 2) and as two data-parallel groups (P = 1):
    unconditional rows, and rows with a prompt and an infilling template written past the context (40
    tokens from a 32-token model: two semi-AR windows)."""
    overrides = ["logging.progress=false", "sample.sampler=edlm", "sample.energy=oracle", "sample.k=3",
                 "sample.window=0.5", "sample.steps=5", "sample.num_samples=5", "sample.batch_size=2",
                 f"sample.diffusion_ckpt={runs['mdlm']}"]
    prompts = ["w3 w30", "w1 [MASK:3] w2"]
    prompted = [*overrides, "sample.num_samples=2", "sample.length=40", "sample.stride=8"]
    assert _sample(capsys, tmp_path / "one", *overrides[1:])[0] == 0
    assert _sample(capsys, tmp_path / "one_prompted", *prompted[1:], "--prompt", prompts[0], "--prompt", prompts[1])[0] == 0
    for name, args, given in (("", overrides, []), ("prompted", prompted, prompts)):
        single_rows = _read(tmp_path / ("one_" + name if name else "one"))[0]
        single = [r["tokens"] for r in single_rows]
        assert len(single) == (4 if given else 5) and {len(row) for row in single} == {40 if given else 32}
        for proposal_parallel, layout in ((0, (2, 1)), (1, (1, 2))):
            out = tmp_path / f"two_{name}_p{proposal_parallel}"
            results = run_on_ranks(_sample_on_rank, 2, args, str(out), proposal_parallel, given, timeout=240)
            assert results == [layout, None]  # rank 0 writes and reports
            rows, summary = _read(out)
            assert [r["tokens"] for r in rows] == single and summary["world_size"] == 2
            assert [r["spans"] for r in rows] == [r["spans"] for r in single_rows]
    fixed = {0: {1: 3, 2: 30}, 1: {1: 1, 5: 2}}  # BOS, then the template's words (w3 -> 3, w30 -> 30)
    for row in _read(tmp_path / "one_prompted")[0]:
        assert all(row["tokens"][position] == token for position, token in fixed[row["prompt_index"]].items())


def test_bad_input_gives_one_line_errors(runs, tmp_path, capsys):
    nan_run = tmp_path / "nan_nce"
    import shutil

    shutil.copytree(runs["nce"], nan_run)
    for name in ("model.safetensors", "ema.safetensors"):
        path = nan_run / "weights" / name
        if path.exists():
            state = load_file(str(path))
            state["energy_head.0.weight"] = torch.full_like(state["energy_head.0.weight"], float("nan"))
            save_file(state, str(path))
    dit = f"sample.diffusion_ckpt={runs['mdlm']}"
    cases = {
        "k must be >= 1": [dit, "sample.k=0"],
        "window must be in [0, 1]": [dit, "sample.window=1.5"],
        "steps must be >= 1": [dit, "sample.steps=0"],
        "no trained weights at": [f"sample.diffusion_ckpt={tmp_path / 'missing'}"],
        "sample.diffusion_ckpt is empty": [],
        "needs sample.energy_ckpt": [dit, "sample.sampler=edlm", "sample.energy=nce"],
        "needs sample.ar_ckpt": [dit, "sample.sampler=edlm", "sample.energy=coar"],
        "must be 'ar'": [dit, "sample.sampler=edlm", "sample.energy=ar", f"sample.ar_ckpt={runs['mdlm']}"],
        "NaN/Inf": [dit, "sample.sampler=edlm", "sample.energy=nce", f"sample.energy_ckpt={nan_run}",
                    "sample.num_samples=2"],
        "sample.sampler=ar needs sample.ar_ckpt": ["sample.sampler=ar"],
        "cannot fill gaps": ["sample.sampler=ar", f"sample.ar_ckpt={runs['ar']}", "--prompt", "w1 [MASK] w2"],
        "is not in the synthetic vocabulary": [dit, "--prompt", "w3 hello"],
        "outside the vocabulary": [dit, "--prompt-ids", "3 99"],
        "sample.stride=31 must be in [1, L-3]": [dit, "sample.length=64", "sample.stride=31"],
        "shorter than the diffusion model's rows": [dit, "sample.length=16"],
        "has 34 tokens": [dit, "--prompt", " ".join(["w1"] * 33)],
        "sample.top_k / sample.top_p apply to sample.sampler=ar only": [dit, "sample.top_k=3"],
        "prompts file": [dit, "--prompts-file", str(tmp_path / "no_such_prompts.jsonl")],
    }
    for i, (message, overrides) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        code, err = _sample(capsys, out, *overrides)
        assert code == 2, (message, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (message, err)
        assert not (out / "samples.jsonl").exists()
