"""`edlm eval` end to end: metrics.json / metrics.md / plots, 2 ranks = 1 rank, numbers against direct
computations, on-the-fly sampling through `edlm sample`, and bad inputs failing before any work."""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import yaml

from edlm_dist.config.load import load_config
from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.errors import CheckpointError, ConfigError, DataError
from edlm_dist.evaluation.cli import cli_main
from tests.spawn import run_on_ranks
from tests.tolerances import approx_across, network_reduction_size

LANG_CFG = SyntheticConfig(num_tokens=8, num_topics=2, branching=2, train_rows=8, valid_rows=24)
SEQ_LEN = 12
MODEL = {"hidden_size": 16, "n_blocks": 1, "n_heads": 2, "cond_dim": 8, "use_apex": False}
NETWORK_N = network_reduction_size(SimpleNamespace(**MODEL), SEQ_LEN, 11)  # 8 tokens + BOS, EOS, mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared synthetic data, three exported tiny models and four sample files (two samplers × two T)."""
    from edlm_dist.data.prepare import prepare_data
    from edlm_dist.models.build import build_model
    from edlm_dist.artifacts.weights import export_weights, weights_meta

    root = tmp_path_factory.mktemp("eval_cli")
    manifest = prepare_data("synthetic", root / "data", seq_len=SEQ_LEN, tokenizer_spec="synthetic",
                            synthetic_cfg=LANG_CFG, seed=1, progress=False)
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [f"data.seq_len={SEQ_LEN}", f"data.dir={root / 'data'}"]
    vocab = manifest["vocab_size"]
    runs = {}
    for i, kind in enumerate(("dit", "ar", "energy")):
        cfg = load_config(None, overrides + ([f"train.diffusion_ckpt={runs['dit']}"] if runs else []))
        torch.manual_seed(i)
        model = build_model(kind, cfg.model, vocab, SEQ_LEN)
        with torch.no_grad():  # non-trivial outputs instead of the zero-initialised last layers
            for name, param in model.named_parameters():
                if name.startswith(("output_layer.linear", "energy_head.2")):
                    param.normal_(0.0, 0.3)
        runs[kind] = str(root / kind)
        export_weights(model, runs[kind], meta=weights_meta(cfg, kind=kind, vocab_size=vocab, step=0,
                                                            tokenizer=manifest["tokenizer"],
                                                            extra={"data_dir": str(root / "data")}), write=True)
    language = SyntheticLanguage(LANG_CFG, SEQ_LEN)
    samples = []
    for seed, (sampler, steps) in enumerate((("mdlm", 4), ("mdlm", 8), ("edlm", 4), ("edlm", 8))):
        folder = root / "samples" / f"{sampler}_T{steps}"
        folder.mkdir(parents=True)
        rows = language.sample(9, torch.Generator().manual_seed(seed)).tolist()
        with open(folder / "samples.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps({"tokens": row, "text": language.tokenizer.decode(row),
                                         "seconds": 0.01 * steps}) + "\n")
        summary = {"sampler": sampler, "energy": "ar", "steps": steps, "k": 2, "window": 0.2}
        (folder / "summary.json").write_text(json.dumps(summary))
        samples.append(str(folder / "samples.jsonl"))
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"seq_len": SEQ_LEN, "dir": str(root / "data"), "synthetic": {"num_tokens": 8}},
        "eval": {"diffusion_ckpt": runs["dit"], "ar_ckpt": runs["ar"], "energy_ckpt": runs["energy"],
                 "n_negatives": 4, "batch_size": 8, "samples": samples},
        "logging": {"progress": False}}))
    return {"root": root, "config": str(config), "runs": runs, "samples": samples, "language": language}


def _args(config, out, *overrides):
    return argparse.Namespace(config=config, overrides=list(overrides), out=str(out))


def _run_cli(config, out, overrides):
    return cli_main(_args(config, out, *overrides))


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}/").items()}
    return {prefix: tree} if isinstance(tree, float) else {}


@pytest.mark.multirank
def test_eval_cli_writes_tables_and_plots_and_two_ranks_equal_one(setup):
    root, language = setup["root"], setup["language"]
    assert run_on_ranks(_run_cli, 1, setup["config"], root / "one", []) == [0]
    # Two ranks, and the diffusion model found through the NCE run's recorded train.diffusion_ckpt.
    assert run_on_ranks(_run_cli, 2, setup["config"], root / "two", ["eval.diffusion_ckpt=''"]) == [0, 0]
    one = json.loads((root / "one" / "metrics.json").read_text())
    two = json.loads((root / "two" / "metrics.json").read_text())
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert one["settings"]["config"]["eval"]["n_negatives"] == 4
    nums_one = {k: v for k, v in _numbers(one).items() if not k.startswith("settings/")}
    nums_two = {k: v for k, v in _numbers(two).items() if not k.startswith("settings/")}
    assert nums_one.keys() == nums_two.keys() and len(nums_one) > 40
    for key, value in nums_one.items():
        # fp32 forwards on 12 + 12 rows instead of 24: other batch shapes, then float64 sums over the rows
        assert nums_two[key] == approx_across(value, dtype=torch.float32, reduction_size=NETWORK_N + 24), key

    lik = one["likelihood"]
    assert lik["rows"] == 24 and lik["settings"]["n_negatives"] == 4
    assert set(lik["methods"]) == {"ar", "mdlm", "edlm_coar", "edlm_ar", "edlm_nce"}
    assert lik["methods"]["ar"]["tokens"] == 24 * (SEQ_LEN - 1)
    for method in ("edlm_ar", "edlm_nce"):
        entry = lik["methods"][method]
        assert entry["upper"]["nll"] >= entry["lower"]["nll"]  # pointwise property of Theorem 1's pair
        assert entry["upper"]["ppl"] == pytest.approx(math.exp(entry["upper"]["nll"]))
    # Every sample file: Gen PPL and entropy against direct computations, settings carried along.
    assert len(one["samples"]) == 4
    for result in one["samples"]:
        rows = [json.loads(line)["tokens"] for line in open(result["file"])]
        log_p = language.log_prob(torch.tensor(rows))
        assert result["gen_ppl"] == pytest.approx(math.exp(-log_p.sum().item() / (len(rows) * (SEQ_LEN - 1))))
        hand = sum(-sum(c / len(r) * math.log2(c / len(r)) for c in Counter(r).values()) for r in rows) / len(rows)
        assert result["entropy_bits"] == pytest.approx(hand)
        assert result["sampler_settings"]["steps"] == result["steps"]
        for key in ("gen_ppl", "entropy_bits", "seconds_per_sample"):
            interval = result[f"{key}_interval"]
            assert interval["low"] <= result[key] == interval["estimate"] <= interval["high"], key
    assert {s["method"] for s in one["samples"]} == {"MDLM", "EDLM-AR"}
    # EDLM-AR against MDLM at T = 4 and 8: the ratio of their Gen PPLs, Holm over the two comparisons
    by_cell = {(s["method"], s["steps"]): s for s in one["samples"]}
    assert [(c["method"], c["steps"]) for c in one["comparisons"]] == [("EDLM-AR", 4), ("EDLM-AR", 8)]
    for c in one["comparisons"]:
        ratio = by_cell["EDLM-AR", c["steps"]]["gen_ppl"] / by_cell["MDLM", c["steps"]]["gen_ppl"]
        assert c["estimate"] == pytest.approx(ratio, rel=1e-12) and c["low"] <= c["estimate"] <= c["high"]
        assert c["significant"] == (not c["low"] <= 1 <= c["high"]) and (c["significant"] or not c["significant_holm"])
    reference = one["data_reference"]
    assert reference["num_samples"] == 9
    assert reference["entropy_rate_ppl"] == pytest.approx(math.exp(language.entropy_per_token()[0]))

    report = (root / "one" / "metrics.md").read_text()
    for row in ("| AR |", "| MDLM |", "| EDLM-coAR |", "| EDLM-coAR predicted from AR |", "| MDLM | 4 |",
                "| EDLM-AR | 8 |", "| Data (exact entropy rate) |", "## Each method against MDLM at equal steps",
                '| EDLM-AR | Theorem 1 "upper" (n negatives; biased high for large n) |',
                "| EDLM-NCE | one negative (the reference code's value; biased low) |"):
        assert row in report, row
    # The Eq.-13 figures sit under a title that calls them estimates, after the likelihood table, with the docs linked
    likelihoods, estimates = report.split("### EDLM-AR and EDLM-NCE: estimates of the paper's Eq. 13 (not bounds")
    assert "EDLM-AR" not in likelihoods and "Thm-1" not in report
    assert "likelihood_bounds.md#eq13-estimates)" in estimates  # the target: tests/evaluation/test_report.py
    sample = next(s for s in one["samples"] if (s["method"], s["steps"]) == ("MDLM", 4))
    assert f"| {sample['gen_ppl']:.2f} [{sample['gen_ppl_interval']['low']:.2f}, " in report
    for png in ("genppl_frontier.png", "entropy_vs_genppl.png"):
        assert (root / "one" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multirank
def test_empty_samples_list_samples_on_the_fly(setup):
    """No sample files: `edlm eval` runs the real `edlm sample` first, then scores what it wrote."""
    out = setup["root"] / "otf"
    runs = setup["runs"]
    overrides = ["eval.samples=[]", "eval.metrics=[genppl,entropy]", "sample.sampler=edlm", "sample.energy=nce",
                 "sample.steps=4", "sample.k=2", "sample.num_samples=5", "sample.batch_size=5",
                 f"sample.diffusion_ckpt={runs['dit']}", f"sample.energy_ckpt={runs['energy']}"]
    assert run_on_ranks(_run_cli, 1, setup["config"], out, overrides) == [0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "likelihood" not in metrics
    (result,) = metrics["samples"]
    assert result["file"] == str(out / "samples" / "samples.jsonl") and result["method"] == "EDLM-NCE"
    rows = [json.loads(line)["tokens"] for line in open(result["file"])]
    assert len(rows) == 5
    log_p = setup["language"].log_prob(torch.tensor(rows))
    assert result["gen_ppl"] == pytest.approx(math.exp(-log_p.sum().item() / (5 * (SEQ_LEN - 1))))


def test_bad_inputs_fail_with_one_line_errors_before_any_work(setup, tmp_path, capsys):
    from edlm_dist.cli import main

    config, out = setup["config"], tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2]}\n{"tokens": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON"):
        cli_main(_args(config, out, f"eval.samples=[{bad}]"))
    # Through the `edlm` entry point: exit status 2 and a single `error:` line.
    assert main(["eval", config, "--out", str(out), f"eval.samples=[{bad}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line 2" in err and "\n" not in err
    with pytest.raises(DataError, match="does not exist"):
        cli_main(_args(config, out, "eval.oracle=/no/such/oracle_model"))
    with pytest.raises(ConfigError, match="no model is given"):
        cli_main(_args(config, out, "eval.diffusion_ckpt=''", "eval.ar_ckpt=''", "eval.energy_ckpt=''",
                       "eval.metrics=[ppl]"))
    with pytest.raises(CheckpointError, match="holds a 'ar' model but a 'dit' model"):
        cli_main(_args(config, out, f"eval.diffusion_ckpt={setup['runs']['ar']}"))
    from edlm_dist.data.prepare import prepare_data

    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} of plain text data" for i in range(40)))
    prepare_data("text", tmp_path / "text_data", seq_len=16, tokenizer_spec="char", input_path=tmp_path / "corpus.txt",
                 progress=False)
    with pytest.raises(ConfigError, match="eval.oracle=exact needs data prepared from the synthetic language"):
        cli_main(_args(config, out, f"data.dir={tmp_path / 'text_data'}", "eval.metrics=[genppl]"))
    assert not out.exists()  # nothing was started or written
