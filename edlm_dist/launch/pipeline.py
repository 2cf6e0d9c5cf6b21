"""``edlm pipeline CONFIG --out DIR``: the whole EDLM story on one machine, end to end.

Stages (each writes into its own folder under DIR and is skipped when already complete, so a
re-run reuses finished work and an interrupted one resumes):

1. ``data/``      synthetic shards (the embedded exact-oracle language)
2. ``mdlm/``, ``ar/``, ``nce/``  the three trained models (``edlm train`` runs; resumable)
3. ``samples/<method>_T<steps>/``  MDLM and EDLM (AR, coAR, NCE, exact-oracle energies) samples
4. ``likelihood.json``  validation likelihood: MDLM NELBO, AR NLL, EDLM-coAR, Theorem-1 bounds
5. ``results.json``, ``results.md``, ``frontier.png``, ``entropy_vs_genppl.png``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from edlm_dist.config.load import load_config, save_config
from edlm_dist.config.schema import RunConfig

log = logging.getLogger("edlm.pipeline")

METHODS = {  # name -> (sampler, energy)
    "mdlm": ("mdlm", None),
    "edlm-ar": ("edlm", "ar"),
    "edlm-coar": ("edlm", "coar"),
    "edlm-nce": ("edlm", "nce"),
    "edlm-oracle": ("edlm", "oracle"),
}


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def prepare_stage(cfg: RunConfig, out: Path) -> Path:
    from edlm_dist.data.prepare import prepare_data

    data_dir = out / "data"
    if (data_dir / "manifest.json").is_file():
        log.info("data: reusing %s", data_dir)
        return data_dir
    prepare_data("synthetic", data_dir, seq_len=cfg.data.seq_len, tokenizer_spec="synthetic",
                 synthetic_cfg=cfg.data.synthetic, seed=cfg.data.seed, shard_rows=cfg.data.shard_rows,
                 progress=cfg.logging.progress, overwrite=True)
    return data_dir


def _finished(run_dir: Path, steps: int) -> bool:
    meta = run_dir / "weights" / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("step") == steps


def train_stage(cfg: RunConfig, data_dir: Path, run_dir: Path, objective: str, steps: int, **extra) -> Path:
    from edlm_dist.training.trainer import Trainer

    if _finished(run_dir, steps):
        log.info("train %s: reusing %s", objective, run_dir)
        return run_dir
    stage = copy.deepcopy(cfg)
    stage.data.dir = str(data_dir)
    stage.train.objective = objective
    stage.train.steps = steps
    stage.train.save_every = min(stage.train.save_every, steps)
    stage.train.val_every = min(stage.train.val_every, steps)
    for key, value in extra.items():
        setattr(stage.train, key, value)
    trainer = Trainer(stage, run_dir)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run_dir


def sample_stage(cfg: RunConfig, runs: dict[str, Path], out: Path, method: str, steps: int) -> dict:
    from edlm_dist.sampling.cli import SUMMARY_FILE, run_sampling

    folder = out / "samples" / f"{method}_T{steps}"
    summary_path = folder / SUMMARY_FILE
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    sampler, energy = METHODS[method]
    stage = copy.deepcopy(cfg)
    s = stage.sample
    s.sampler, s.steps, s.num_samples = sampler, steps, cfg.pipeline.num_samples
    s.energy = energy or s.energy
    s.diffusion_ckpt, s.ar_ckpt, s.energy_ckpt = str(runs["mdlm"]), str(runs["ar"]), str(runs["nce"])
    return run_sampling(stage, folder)


def sample_metrics(folder: Path, language) -> dict:
    """Exact Gen PPL (token-weighted over the oracle's scored tokens) and mean unigram entropy in bits."""
    import torch

    from edlm_dist.evaluation.entropy import unigram_entropy_bits
    from edlm_dist.evaluation.genppl import exact_sequence_genppl

    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    tokens = torch.tensor([r["tokens"] for r in rows], dtype=torch.long)
    log_probs = language.log_prob(tokens)
    nll_per_token = -log_probs / language.num_scored_tokens
    accumulator = exact_sequence_genppl(log_probs, language.num_scored_tokens)
    return {
        "gen_ppl": accumulator.value(),
        "nll_per_token": float(nll_per_token.mean()),
        "nll_per_token_stderr": float(nll_per_token.std() / math.sqrt(len(rows))) if len(rows) > 1 else None,
        "entropy": float(unigram_entropy_bits(tokens).mean()),
        "seconds_per_sample": sum(r["seconds"] for r in rows) / len(rows),
        "num_samples": len(rows),
    }


def data_reference(cfg: RunConfig, data_dir: Path, language) -> dict:
    """The language's own values: exact entropy rate as Gen PPL, and entropy of validation rows."""
    import torch

    from edlm_dist.data.loader import build_eval_loader
    from edlm_dist.evaluation.entropy import unigram_entropy_bits

    rate, stderr = language.entropy_per_token()
    rows = torch.cat(list(build_eval_loader(data_dir, "valid", micro_batch=256, max_rows=cfg.pipeline.num_samples)))
    return {"gen_ppl": math.exp(rate), "nll_per_token": rate, "nll_per_token_stderr": stderr,
            "entropy": float(unigram_entropy_bits(rows).mean())}


def likelihood_stage(cfg: RunConfig, runs: dict[str, Path], data_dir: Path, out: Path) -> dict:
    """MDLM NELBO, AR NLL, EDLM-coAR and Theorem-1 EDLM-AR/NCE bounds on the validation rows (EMA weights)."""
    from edlm_dist.evaluation.likelihood import LikelihoodModels, LikelihoodSettings, evaluate_likelihood
    from edlm_dist.training.weights import load_trained_model

    path = out / "likelihood.json"
    if path.is_file():
        return json.loads(path.read_text())
    diffusion, meta, _ = load_trained_model(runs["mdlm"], expect_kind="dit")
    ar = load_trained_model(runs["ar"], expect_kind="ar")[0]
    energy = load_trained_model(runs["nce"], expect_kind="energy")[0]
    models = LikelihoodModels(vocab_size=meta["vocab_size"], seq_len=meta["seq_len"], mask_id=meta["mask_id"],
                              diffusion=diffusion, ar=ar, energy=energy)
    e = cfg.eval
    settings = LikelihoodSettings(n_negatives=e.n_negatives, seed=e.seed, strata=e.batch_size, chunk_rows=e.batch_size)
    max_rows = e.max_batches * e.batch_size if e.max_batches else None
    result = evaluate_likelihood(models, data_dir, settings=settings, batch_size=e.batch_size, max_rows=max_rows,
                                 progress=cfg.logging.progress)
    _write_json(path, result)
    return result


def report(cfg: RunConfig, out: Path, results: dict) -> None:
    from edlm_dist.evaluation.report import markdown_table, plot_entropy_vs_genppl, plot_frontier

    curves = {m: results["methods"][m] for m in METHODS if m in results["methods"]}
    plot_frontier(curves, out / "frontier.png")
    plot_entropy_vs_genppl(curves, out / "entropy_vs_genppl.png")
    rows = [{"method": method, **row} for method, series in curves.items() for row in series]
    rows.append({"method": "data (exact)", **results["data"]})
    lines = ["# EDLM vs MDLM on the synthetic language (exact oracle)", "",
             f"k={cfg.sample.k}, window={cfg.sample.window}, {cfg.pipeline.num_samples} samples per cell, "
             f"sampling precision {cfg.sample.precision}, EMA weights. Gen PPL = exp(exact NLL per scored token).", "",
             markdown_table(rows, ["method", "steps", "gen_ppl", "nll_per_token", "entropy", "seconds_per_sample",
                                   "k", "window"]), ""]
    if "likelihood" in results:
        lines += ["## Validation likelihood", "", _likelihood_table(results["likelihood"]), ""]
    (out / "results.md").write_text("\n".join(lines))


def _likelihood_table(likelihood: dict) -> str:
    from edlm_dist.evaluation.report import markdown_table

    rows = []
    for name, values in likelihood.get("methods", {}).items():
        estimates = {k: v for k, v in values.items() if isinstance(v, dict) and "nll" in v}
        for label, entry in (estimates or {"": values}).items():
            rows.append({"method": f"{name} {label}".strip(), "nll_per_token": entry.get("nll"),
                         "ppl": entry.get("ppl"), "estimate": entry.get("estimate", "")})
    return markdown_table(rows, ["method", "nll_per_token", "ppl", "estimate"])


def run_pipeline(cfg: RunConfig, out_dir: str | os.PathLike) -> dict:
    from edlm_dist.data.synthetic import SyntheticLanguage
    from edlm_dist.parallel.runtime import init_parallel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    init_parallel(cfg)
    p = cfg.pipeline
    data_dir = prepare_stage(cfg, out)
    runs = {"mdlm": train_stage(cfg, data_dir, out / "mdlm", "mdlm", p.mdlm_steps)}
    runs["ar"] = train_stage(cfg, data_dir, out / "ar", "ar", p.ar_steps)
    runs["nce"] = train_stage(cfg, data_dir, out / "nce", "nce", p.nce_steps, diffusion_ckpt=str(runs["mdlm"]))
    language = SyntheticLanguage(cfg.data.synthetic, cfg.data.seq_len)
    results: dict[str, Any] = {"methods": {}, "settings": _settings(cfg)}
    for method in METHODS:
        for steps in p.step_counts:
            summary = sample_stage(cfg, runs, out, method, steps)
            metrics = sample_metrics(out / "samples" / f"{method}_T{steps}", language)
            results["methods"].setdefault(method, []).append({
                "steps": steps, **metrics,
                "k": summary.get("k"), "window": summary.get("window"), "mean_ess": summary.get("mean_ess"),
                "mean_nfe": summary.get("mean_nfe"),
            })
    results["data"] = data_reference(cfg, data_dir, language)
    results["likelihood"] = likelihood_stage(cfg, runs, data_dir, out)
    _write_json(out / "results.json", results)
    report(cfg, out, results)
    return results


def _settings(cfg: RunConfig) -> dict:
    from edlm_dist.sampling.cli import git_commit

    s = cfg.sample
    return {"k": s.k, "window": s.window, "temperature": s.temperature, "precision": s.precision,
            "update": s.update, "redraw_every_step": s.redraw_every_step, "use_ema": s.use_ema, "seed": s.seed,
            "num_samples": cfg.pipeline.num_samples, "train_steps": {"mdlm": cfg.pipeline.mdlm_steps,
            "ar": cfg.pipeline.ar_steps, "nce": cfg.pipeline.nce_steps}, "git_commit": git_commit()}


def cli_main(args: argparse.Namespace) -> int:
    from edlm_dist.parallel.runtime import shutdown_parallel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.overrides)
    try:
        results = run_pipeline(cfg, args.out)
    finally:
        shutdown_parallel()
    print((Path(args.out) / "results.md").read_text())
    return 0 if results else 1
