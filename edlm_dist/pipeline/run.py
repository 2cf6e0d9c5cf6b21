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
import os
from pathlib import Path
from typing import Any

from edlm_dist.artifacts.files import write_json_atomic
from edlm_dist.artifacts.provenance import git_commit
from edlm_dist.artifacts.samples import read_sample_summary, samples_path, summary_path
from edlm_dist.artifacts.weights import load_trained_model, synthetic_language_for, trained_step
from edlm_dist.config.load import save_config
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import has_manifest
from edlm_dist.errors import ConfigError
from edlm_dist.evaluation.report import write_pipeline_report
from edlm_dist.evaluation.run import exact_language, likelihood_metrics, load_likelihood_models
from edlm_dist.evaluation.sample_metrics import ExactSyntheticOracle, data_reference, score_sample_file
from edlm_dist.parallel.runtime import init_parallel
from edlm_dist.sampling.model_energies import ENERGIES, build_energy
from edlm_dist.sampling.engine import ModelDenoiser
from edlm_dist.sampling.run import run_sampling
from edlm_dist.training.trainer import Trainer

log = logging.getLogger("edlm.pipeline")
RESULTS_FILE, LIKELIHOOD_FILE = "results.json", "likelihood.json"
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


def sample_metrics(folder: Path, oracle: ExactSyntheticOracle) -> dict:
    """Exact Gen PPL (token-weighted over the oracle's scored tokens), NLL per token, mean unigram entropy
    in bits and seconds per sample of one sample folder (the evaluation API, under the pipeline's names)."""
    _, scores = score_sample_file(samples_path(folder), oracle, entropy=True)
    m = scores.summary()
    return {"gen_ppl": m["gen_ppl"], "nll_per_token": m["nll_per_token"],
            "nll_per_token_stderr": m["nll_per_token_stderr"], "entropy": m["entropy_bits"],
            "seconds_per_sample": m["seconds_per_sample"], "num_samples": m["num_samples"]}


def data_values(cfg: RunConfig, data_dir: Path, oracle: ExactSyntheticOracle) -> dict:
    """The language's own values: exact entropy rate as Gen PPL, and entropy of validation rows."""
    ref = data_reference(data_dir, oracle, entropy=True, num_rows=cfg.pipeline.num_samples, language=oracle.language)
    return {"gen_ppl": ref["entropy_rate_ppl"], "nll_per_token": ref["entropy_rate_nats"],
            "nll_per_token_stderr": ref["entropy_rate_stderr"], "entropy": ref["entropy_bits"]}


def likelihood_stage(cfg: RunConfig, runs: dict[str, Path], data_dir: Path, out: Path) -> dict:
    """MDLM NELBO, AR NLL, EDLM-coAR and Theorem-1 EDLM-AR/NCE bounds on the validation rows (EMA weights)."""
    path = out / LIKELIHOOD_FILE
    if path.is_file():
        return json.loads(path.read_text())
    models, _ = load_likelihood_models({"dit": runs["mdlm"], "ar": runs["ar"], "energy": runs["nce"]})
    result = likelihood_metrics(cfg, models, data_dir)
    write_json_atomic(path, result)
    return result


def report(cfg: RunConfig, out: Path, results: dict) -> None:
    settings_line = (f"k={cfg.sample.k}, window={cfg.sample.window}, {cfg.pipeline.num_samples} samples per cell, "
                     f"sampling precision {cfg.sample.precision}, EMA weights. Gen PPL = exp(exact NLL per scored "
                     "token).")
    write_pipeline_report(results, list(METHODS), out, settings_line)


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
    oracle = ExactSyntheticOracle(exact_language(data_dir))
    results: dict[str, Any] = {"methods": {}, "settings": _settings(cfg)}
    for method in METHODS:
        for steps in p.step_counts:
            summary = sample_stage(cfg, runs, out, method, steps)
            metrics = sample_metrics(out / "samples" / f"{method}_T{steps}", oracle)
            results["methods"].setdefault(method, []).append({
                "steps": steps, **metrics,
                "k": summary.get("k"), "window": summary.get("window"), "mean_ess": summary.get("mean_ess"),
                "mean_nfe": summary.get("mean_nfe"),
            })
    results["data"] = data_values(cfg, data_dir, oracle)
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
