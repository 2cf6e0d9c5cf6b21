"""The whole EDLM story on one machine, end to end (``edlm pipeline CONFIG --out DIR``).

Stages (each writes into its own folder under DIR and is skipped when already complete, so a
re-run reuses finished work and an interrupted one resumes):

1. ``data/``      synthetic shards (the embedded exact-oracle language)
2. ``mdlm/``, ``ar/``, ``nce/``  the three trained models (``edlm train`` runs; resumable)
3. ``samples/<method>_T<steps>/``  MDLM and EDLM (AR, coAR, NCE, exact-oracle energies) samples
4. ``likelihood.json``  validation likelihood: MDLM NELBO, AR NLL, EDLM-coAR, Theorem-1 bounds
5. ``results.json``, ``results.md``, ``frontier.png``, ``entropy_vs_genppl.png``
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from edlm_dist.artifacts.files import write_json_atomic
from edlm_dist.artifacts.provenance import git_commit
from edlm_dist.artifacts.samples import read_sample_summary, read_samples_jsonl, samples_path, summary_path
from edlm_dist.artifacts.weights import load_trained_model, synthetic_language_for, trained_step
from edlm_dist.config.load import save_config
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import ConfigError
from edlm_dist.data.loader import build_eval_loader
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import has_manifest
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.evaluation.entropy import unigram_entropy_bits
from edlm_dist.evaluation.genppl import exact_sequence_genppl
from edlm_dist.evaluation.likelihood import LikelihoodModels, LikelihoodSettings
from edlm_dist.evaluation.run import evaluate_likelihood
from edlm_dist.evaluation.report import markdown_table, plot_entropy_vs_genppl, plot_frontier
from edlm_dist.parallel.runtime import init_parallel
from edlm_dist.sampling.model_energies import ENERGIES, build_energy
from edlm_dist.sampling.engine import ModelDenoiser
from edlm_dist.sampling.run import run_sampling
from edlm_dist.training.trainer import Trainer

log = logging.getLogger("edlm.pipeline")
RESULTS_FILE, REPORT_FILE, LIKELIHOOD_FILE = "results.json", "results.md", "likelihood.json"
RUN_NAMES = ("mdlm", "ar", "nce")  # the trained models' folders under OUT

METHODS = {  # name -> (sampler, energy)
    "mdlm": ("mdlm", None),
    "edlm-ar": ("edlm", "ar"),
    "edlm-coar": ("edlm", "coar"),
    "edlm-nce": ("edlm", "nce"),
    "edlm-oracle": ("edlm", "oracle"),
}


def prepare_stage(cfg: RunConfig, out: Path) -> Path:
    data_dir = out / "data"
    if has_manifest(data_dir):
        log.info("data: reusing %s", data_dir)
        return data_dir
    prepare_data("synthetic", data_dir, seq_len=cfg.data.seq_len, tokenizer_spec="synthetic",
                 synthetic_cfg=cfg.data.synthetic, seed=cfg.data.seed, shard_rows=cfg.data.shard_rows,
                 progress=cfg.logging.progress, overwrite=True)
    return data_dir


def train_stage(cfg: RunConfig, data_dir: Path, run_dir: Path, objective: str, steps: int, **extra) -> Path:
    if trained_step(run_dir) == steps:
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
    folder = out / "samples" / f"{method}_T{steps}"
    if summary_path(folder).is_file():
        return read_sample_summary(samples_path(folder))
    sampler, energy = METHODS[method]
    stage = copy.deepcopy(cfg)
    s = stage.sample
    s.sampler, s.steps, s.num_samples = sampler, steps, cfg.pipeline.num_samples
    s.energy = energy or s.energy
    s.diffusion_ckpt, s.ar_ckpt, s.energy_ckpt = str(runs["mdlm"]), str(runs["ar"]), str(runs["nce"])
    return run_sampling(stage, folder)


def sample_metrics(folder: Path, language) -> dict:
    """Exact Gen PPL (token-weighted over the oracle's scored tokens) and mean unigram entropy in bits."""
    rows = read_samples_jsonl(samples_path(folder))
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
    rate, stderr = language.entropy_per_token()
    rows = torch.cat(list(build_eval_loader(data_dir, "valid", micro_batch=256, max_rows=cfg.pipeline.num_samples)))
    return {"gen_ppl": math.exp(rate), "nll_per_token": rate, "nll_per_token_stderr": stderr,
            "entropy": float(unigram_entropy_bits(rows).mean())}


def likelihood_stage(cfg: RunConfig, runs: dict[str, Path], data_dir: Path, out: Path) -> dict:
    """MDLM NELBO, AR NLL, EDLM-coAR and Theorem-1 EDLM-AR/NCE bounds on the validation rows (EMA weights)."""
    path = out / LIKELIHOOD_FILE
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
    write_json_atomic(path, result)
    return result


def report(cfg: RunConfig, out: Path, results: dict) -> None:
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
    (out / REPORT_FILE).write_text("\n".join(lines))


def _likelihood_table(likelihood: dict) -> str:
    rows = []
    for name, values in likelihood.get("methods", {}).items():
        estimates = {k: v for k, v in values.items() if isinstance(v, dict) and "nll" in v}
        for label, entry in (estimates or {"": values}).items():
            rows.append({"method": f"{name} {label}".strip(), "nll_per_token": entry.get("nll"),
                         "ppl": entry.get("ppl"), "estimate": entry.get("estimate", "")})
    return markdown_table(rows, ["method", "nll_per_token", "ppl", "estimate"])


def run_pipeline(cfg: RunConfig, out_dir: str | os.PathLike) -> dict:
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
    write_json_atomic(out / RESULTS_FILE, results)
    report(cfg, out, results)
    return results


def _settings(cfg: RunConfig) -> dict:
    s = cfg.sample
    return {"k": s.k, "window": s.window, "temperature": s.temperature, "precision": s.precision,
            "update": s.update, "redraw_every_step": s.redraw_every_step, "use_ema": s.use_ema, "seed": s.seed,
            "num_samples": cfg.pipeline.num_samples, "train_steps": {"mdlm": cfg.pipeline.mdlm_steps,
            "ar": cfg.pipeline.ar_steps, "nce": cfg.pipeline.nce_steps}, "git_commit": git_commit()}


def load_pipeline_models(out: str | os.PathLike):
    """The trained models of a finished pipeline folder, ready to sample and score with the exact oracle:
    ``(denoiser, {energy kind: energy}, exact language, diffusion meta)`` (the benchmarks' entry point)."""
    out = Path(out)
    for name in RUN_NAMES:
        if trained_step(out / name) is None:
            raise ConfigError(f"{out / name} holds no trained weights; pass the --out folder of "
                              "`edlm pipeline configs/demo.yaml`")
    dit, meta, _ = load_trained_model(out / "mdlm", expect_kind="dit")
    language = synthetic_language_for(meta)
    if language is None:
        raise ConfigError("the diffusion model was not trained on the synthetic language; the exact Gen PPL needs it "
                          "(run `edlm pipeline configs/demo.yaml`)")
    models = {"ar_model": load_trained_model(out / "ar", expect_kind="ar")[0],
              "energy_model": load_trained_model(out / "nce", expect_kind="energy")[0], "language": language}
    energies = {kind: build_energy(kind, mask_id=meta["mask_id"], **models) for kind in ENERGIES}
    return ModelDenoiser(dit, meta["mask_id"], meta["vocab_size"]), energies, language, meta
