"""The whole EDLM story on one machine, end to end (``edlm pipeline CONFIG --out DIR``).

Stages (each writes into its own folder under DIR and is skipped when already complete, so a
re-run reuses finished work and an interrupted one resumes):

1. ``data/``      the config's data: ``data.dir`` when set (used as it is), else ``data.source`` prepared
                  here (the synthetic language, ``pydoc``, or ``data.input`` for text / jsonl / text8 / hf)
2. ``mdlm/``, ``ar/``, ``nce/``  the trained models the methods need (``edlm train`` runs; resumable); with
   ``pipeline.block_size`` b also ``block/``: a block-causal MDLM (model.block_size=b, docs/block_diffusion.md)
3. ``samples/<method>_T<steps>/``  the ``pipeline.methods`` (MDLM; EDLM with AR, coAR, NCE, exact energies);
   with a block model also ``block-mdlm`` and ``block-edlm-ar``, block by block (T = steps per block);
   ``samples/ar/`` the AR baseline sampler (``pipeline.ar_baseline``); ``samples/prompted/<method>/`` prompted
   generation (``pipeline.prompts``, exact judge only)
4. ``likelihood.json``  validation likelihood: MDLM NELBO, AR NLL, EDLM-coAR, Theorem-1 bounds (and
   ``likelihood_block.json``: the block model's block NELBO)
5. ``results.json``, ``results.md``, ``samples.md`` (decoded samples), ``frontier.png``, ``entropy_vs_genppl.png``

The judge of Gen PPL is the exact language on synthetic data, and on real text the Kneser-Ney n-gram model
fitted on the validation split only (``eval.oracle=ngram``): independent of the models and of EDLM's energy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from edlm_dist.artifacts.provenance import git_commit
from edlm_dist.artifacts.samples import read_sample_summary, read_samples_jsonl, samples_path, summary_path
from edlm_dist.artifacts.weights import load_trained_model, synthetic_language_for, trained_step
from edlm_dist.config.load import save_config
from edlm_dist.config.schema import METHOD_MODELS, RunConfig
from edlm_dist.data.loader import build_eval_loader
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import has_manifest, load_manifest, saved_tokenizer, validate_dataset
from edlm_dist.errors import ConfigError
from edlm_dist.evaluation.report import write_pipeline_report
from edlm_dist.evaluation.run import (
    build_judge,
    likelihood_metrics,
    load_likelihood_models,
    reference_split,
)
from edlm_dist.evaluation.sample_metrics import (
    ExactSyntheticOracle,
    PromptedExactOracle,
    SampleScores,
    compare_at_equal_steps,
    data_reference,
    score_sample_file,
    score_samples,
)
from edlm_dist.parallel.runtime import init_parallel
from edlm_dist.storage.files import read_json, write_atomic, write_json_atomic
from edlm_dist.sampling.model_energies import ENERGIES, build_energy
from edlm_dist.sampling.engine import ModelDenoiser
from edlm_dist.sampling.conditioning import IDS_PREFIX
from edlm_dist.sampling.run import run_sampling
from edlm_dist.training.trainer import Trainer

log = logging.getLogger("edlm.pipeline")
RESULTS_FILE, LIKELIHOOD_FILE = "results.json", "likelihood.json"
RUN_NAMES = ("mdlm", "ar", "nce")  # the trained models' folders under OUT

SAMPLES_REPORT = "samples.md"
SPLIT_ROWS = {"train": "training rows", "valid": "validation rows"}
AR_METHOD = "ar"  # the AR baseline sampler (spec §5.7): one row, no step count
PROMPTED_METHODS = ("mdlm", "edlm-ar", AR_METHOD)  # the prompted-generation cell (those that ran)
METHODS = {  # name -> (sampler, energy)
    "mdlm": ("mdlm", None),
    "edlm-ar": ("edlm", "ar"),
    "edlm-coar": ("edlm", "coar"),
    "edlm-nce": ("edlm", "nce"),
    "edlm-oracle": ("edlm", "oracle"),
}
BLOCK_METHODS = {  # the block-causal model (pipeline.block_size), sampled block by block: name -> (sampler, energy)
    "block-mdlm": ("mdlm", None),
    "block-edlm-ar": ("edlm", "ar"),
}
TIMING_FILE = "train_seconds.json"  # wall seconds of a stage's training, written when this pipeline trains it


def prepare_stage(cfg: RunConfig, out: Path) -> str:
    """The run's data: ``data.dir`` as given, else ``data.source`` prepared into OUT/data (never a silent
    substitute: a folder prepared from another source or tokenizer is refused)."""
    d = cfg.data
    if d.dir:
        validate_dataset(d.dir, seq_len=d.seq_len, vocab_size=d.vocab_size or None, check_contents=False)
        log.info("data: %s (data.dir)", d.dir)
        return d.dir
    data_dir = out / "data"
    spec = "synthetic" if d.source == "synthetic" else d.tokenizer
    if has_manifest(data_dir):
        manifest = load_manifest(data_dir)
        if (manifest["source"].get("name"), manifest.get("tokenizer_spec")) != (d.source, spec):
            raise ConfigError(f"{data_dir} holds {manifest['source'].get('name')} data tokenized with "
                              f"{manifest.get('tokenizer_spec')}, but the config asks for data.source={d.source} with "
                              f"data.tokenizer={spec}; use a new --out folder")
        log.info("data: reusing %s", data_dir)
        return str(data_dir)
    prepare_data(d.source, data_dir, seq_len=d.seq_len, tokenizer_spec=spec, wrap=d.wrap,
                 synthetic_cfg=d.synthetic, seed=d.seed, shard_rows=d.shard_rows, input_path=d.input or None,
                 tokenizer_vocab=d.tokenizer_vocab, max_unk_rate=d.max_unk_rate, progress=cfg.logging.progress,
                 overwrite=True)
    return str(data_dir)


def train_stage(cfg: RunConfig, data_dir: str, run_dir: Path, objective: str, steps: int, **extra) -> Path:
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
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    write_json_atomic(run_dir / TIMING_FILE, {"seconds": time.perf_counter() - started, "steps": steps})
    return run_dir


def train_seconds(run_dir: Path) -> float | None:
    """Wall seconds the stage's training took when a pipeline trained it (None: trained elsewhere)."""
    path = run_dir / TIMING_FILE
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def block_config(cfg: RunConfig) -> RunConfig:
    """The block-causal model's config: the MDLM recipe with model.block_size = pipeline.block_size."""
    stage = copy.deepcopy(cfg)
    stage.model.block_size = cfg.pipeline.block_size
    return stage


def sample_stage(cfg: RunConfig, runs: dict[str, Path], out: Path, method: str, steps: int, *,
                 folder: Optional[Path] = None, prompts: Optional[list[str]] = None, num_samples: int = 0) -> dict:
    """Samples of ``method`` (a METHODS / BLOCK_METHODS key or ``ar``) into ``folder`` (default
    samples/<method>_T<steps>)."""
    folder = folder or out / "samples" / f"{method}_T{steps}"
    if summary_path(folder).is_file():
        return read_sample_summary(samples_path(folder))
    sampler, energy = {**METHODS, **BLOCK_METHODS}.get(method, (AR_METHOD, None))
    stage = copy.deepcopy(cfg)
    s = stage.sample
    s.sampler, s.steps, s.num_samples = sampler, steps, num_samples or cfg.pipeline.num_samples
    s.energy = energy or s.energy
    s.diffusion_ckpt, s.ar_ckpt, s.energy_ckpt = (str(runs.get(name, "")) for name in ("mdlm", "ar", "nce"))
    if method in BLOCK_METHODS:  # block by block with the block-causal model (prefix-cached); T = steps per block
        s.diffusion_ckpt, s.block_size = str(runs["block"]), cfg.pipeline.block_size
    s.prompts = list(prompts or [])
    return run_sampling(stage, folder)


def validation_prompts(cfg: RunConfig, data_dir: str) -> list[str]:
    """The prompted cell's prompts: the first ``prompt_tokens`` tokens (BOS included) of the first
    ``pipeline.prompts`` validation rows, as token-id templates."""
    p = cfg.pipeline
    tokens = p.prompt_tokens or cfg.data.seq_len // 4
    rows = next(iter(build_eval_loader(data_dir, "valid", micro_batch=p.prompts, max_rows=p.prompts)))
    return [IDS_PREFIX + " ".join(map(str, row[:tokens].tolist())) for row in rows]


def prompted_stage(cfg: RunConfig, runs: dict[str, Path], data_dir: str, out: Path, language) -> dict:
    """Prompted generation: MDLM, EDLM-AR (at the largest step count) and the AR baseline continue the same
    validation prompts; conditional Gen PPL = exp(−log p(continuation | prompt) per generated token) under the
    exact language, the data's own continuations scored the same way, and a few samples as text."""
    prompts = validation_prompts(cfg, data_dir)
    per_prompt = max(1, cfg.pipeline.num_samples // len(prompts))
    steps = max(cfg.pipeline.step_counts)
    oracle = PromptedExactOracle(language)
    tokens = len(prompts[0][len(IDS_PREFIX):].split())
    cell: dict[str, Any] = {"prompts": prompts, "prompt_tokens": tokens, "samples_per_prompt": per_prompt,
                            "steps": steps, "methods": {}}
    ran = [m for m in PROMPTED_METHODS if m == AR_METHOD and "ar" in runs or m in cfg.pipeline.methods]
    for method in ran:
        folder = out / "samples" / "prompted" / method
        summary = sample_stage(cfg, runs, out, method, steps, folder=folder, prompts=prompts, num_samples=per_prompt)
        rows = read_samples_jsonl(samples_path(folder))
        cell["methods"][method] = {**sample_metrics(folder, oracle)[0],
                                   "mean_sequential_calls": summary.get("mean_sequential_calls"),
                                   "examples": [row["marked_text"] for row in rows[:: per_prompt * max(1, len(prompts) // 2)]]}
    rows = next(iter(build_eval_loader(data_dir, "valid", micro_batch=len(prompts), max_rows=len(prompts))))
    held_out = [{"tokens": row.tolist(), "spans": [[0, tokens, "fixed"], [tokens, len(row), "generated"]]}
                for row in rows]
    cell["data"] = score_samples(held_out, oracle, entropy=True).summary()
    return cell


def pipeline_judge(cfg: RunConfig, data_dir: str, out: Path, device) -> tuple[Any, str]:
    """The Gen-PPL judge of ``eval.oracle`` (evaluation.run.build_judge) and its description. Real text has no
    exact language: ``exact`` there means the n-gram judge fitted on the held-out text."""
    oracle = cfg.eval.oracle
    if oracle == "exact" and load_manifest(data_dir)["source"].get("name") != "synthetic":
        log.info("judge: real text has no exact oracle; using the n-gram judge fitted on held-out text")
        oracle = "ngram"
    ours = {"ar": str(out / "ar")} if trained_step(out / "ar") is not None else {}  # for the circularity warning
    return build_judge(oracle, data_dir, judge_order=cfg.eval.judge_order, batch_size=cfg.eval.oracle_batch_size,
                       checkpoints=ours, device=device, tokenizer=saved_tokenizer(data_dir))


def sample_metrics(folder: Path, oracle: Any) -> tuple[dict, SampleScores]:
    """Gen PPL under the judge (token-weighted over its scored tokens), NLL per token, mean unigram entropy in
    bits and seconds per sample of one sample folder, each with its 95 % bootstrap interval over the samples
    (``<key>_interval``; the evaluation API under the pipeline's names), and the per-sample scores."""
    _, scores = score_sample_file(samples_path(folder), oracle, entropy=True)
    m = scores.summary()
    return {"gen_ppl": m["gen_ppl"], "gen_ppl_interval": m["gen_ppl_interval"], "nll_per_token": m["nll_per_token"],
            "nll_per_token_stderr": m["nll_per_token_stderr"], "entropy": m["entropy_bits"],
            "entropy_interval": m["entropy_bits_interval"], "seconds_per_sample": m["seconds_per_sample"],
            "seconds_per_sample_interval": m["seconds_per_sample_interval"], "num_samples": m["num_samples"]}, scores


def data_values(cfg: RunConfig, data_dir: str, oracle: Any) -> dict:
    """The data's own values. Synthetic: the exact entropy rate as Gen PPL, entropy of validation rows.
    Real text: rows the judge never saw (evaluation.run.reference_split) under the judge."""
    split = reference_split(oracle)
    ref = data_reference(data_dir, oracle, entropy=True, num_rows=cfg.pipeline.num_samples, split=split,
                         language=getattr(oracle, "language", None))
    if isinstance(oracle, ExactSyntheticOracle):
        return {"gen_ppl": ref["entropy_rate_ppl"], "nll_per_token": ref["entropy_rate_nats"],
                "nll_per_token_stderr": ref["entropy_rate_stderr"], "entropy": ref["entropy_bits"],
                "entropy_interval": ref["entropy_bits_interval"]}
    return {"gen_ppl": ref["gen_ppl"], "gen_ppl_interval": ref["gen_ppl_interval"], "nll_per_token": ref["nll_per_token"],
            "nll_per_token_stderr": ref["nll_per_token_stderr"], "entropy": ref["entropy_bits"],
            "entropy_interval": ref["entropy_bits_interval"], "split": split}


def write_decoded_samples(cfg: RunConfig, out: Path, per_method: int = 3) -> Path:
    """``samples.md``: the first decoded samples of every method at the largest step count."""
    steps = max(cfg.pipeline.step_counts)
    lines = [f"# Decoded samples (T={steps}, the first {per_method} of each method)", ""]
    for method in cfg.pipeline.methods:
        rows = read_samples_jsonl(samples_path(out / "samples" / f"{method}_T{steps}"))[:per_method]
        lines += [f"## {method}", ""]
        for row in rows:
            text = row.get("text") if isinstance(row.get("text"), str) else " ".join(map(str, row["tokens"]))
            lines += ["```text", text, "```", ""]
    return write_atomic(out / SAMPLES_REPORT, "\n".join(lines))


def likelihood_stage(cfg: RunConfig, runs: dict[str, Path], data_dir: str, out: Path) -> dict:
    """MDLM NELBO, AR NLL, EDLM-coAR and Theorem-1 EDLM-AR/NCE bounds on the validation rows (EMA weights)."""
    path = out / LIKELIHOOD_FILE
    if path.is_file():
        return read_json(path, what="the likelihood results", fix=f"delete {path} to compute them again")
    kinds = {"mdlm": "dit", "ar": "ar", "nce": "energy"}
    models, _ = load_likelihood_models({kinds[name]: path for name, path in runs.items()})
    result = likelihood_metrics(cfg, models, data_dir)
    write_json_atomic(path, result)
    return result


def block_likelihood_stage(cfg: RunConfig, run_dir: Path, data_dir: str, out: Path) -> dict:
    """The block-causal model's block NELBO on the validation rows (EMA weights; same rows and noise seed)."""
    path = out / "likelihood_block.json"
    if path.is_file():
        return json.loads(path.read_text())
    models, _ = load_likelihood_models({"dit": run_dir})
    result = likelihood_metrics(cfg, models, data_dir)
    write_json_atomic(path, result)
    return result


def block_report_lines(cfg: RunConfig, results: dict) -> list[str]:
    """The block model's NELBO and every stage's training time, under the pipeline's table."""
    lines = []
    if "likelihood_block" in results:
        nelbo = results["likelihood_block"]["methods"]["mdlm"]
        lines += [f"Block-causal MDLM (b={cfg.pipeline.block_size}): block NELBO {nelbo['nll']:.4f} nats/token "
                  f"(PPL {nelbo['ppl']:.3f}); `block-*` rows sample block by block, T = steps per block.", ""]
    seconds = {name: value for name, value in results.get("train_seconds", {}).items() if value is not None}
    if seconds:
        lines += ["Training wall time (s): " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()), ""]
    return lines


def report(cfg: RunConfig, out: Path, results: dict) -> None:
    exact = results["judge"].startswith("the exact language")
    settings_line = (f"k={cfg.sample.k}, window={cfg.sample.window}, {cfg.pipeline.num_samples} samples per cell, "
                     f"sampling precision {cfg.sample.precision}, EMA weights. Judge: {results['judge']}. Gen PPL = "
                     "exp(the judge's NLL per scored token). One training run per model: the intervals cover the "
                     "sampling noise of these weights, not the spread between training runs.")
    title = ("EDLM vs MDLM on the synthetic language (exact oracle)" if exact else
             f"EDLM vs MDLM on real text ({load_manifest(results['data_dir'])['source'].get('name')}), independent judge")
    methods = list(cfg.pipeline.methods) + (list(BLOCK_METHODS) if cfg.pipeline.block_size else [])
    methods += [AR_METHOD] if AR_METHOD in results["methods"] else []
    write_pipeline_report(results, methods, out, settings_line, title=title,
                          data_label="data (exact)" if exact else f"real text ({SPLIT_ROWS[results['data']['split']]})",
                          extra_lines=block_report_lines(cfg, results))


def run_pipeline(cfg: RunConfig, out_dir: str | os.PathLike) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    ctx = init_parallel(cfg)
    p = cfg.pipeline
    data_dir = prepare_stage(cfg, out)
    oracle, judge = pipeline_judge(cfg, data_dir, out, ctx.device)
    if "edlm-oracle" in p.methods and not isinstance(oracle, ExactSyntheticOracle):
        raise ConfigError("pipeline.methods has edlm-oracle, which needs the synthetic language's exact energy; "
                          "drop it for real text")
    needed = {"mdlm"} | {model for method in p.methods for model in METHOD_MODELS[method]}
    needed |= {"ar"} if p.block_size or p.ar_baseline else set()  # block-edlm-ar; the AR baseline
    runs = {"mdlm": train_stage(cfg, data_dir, out / "mdlm", "mdlm", p.mdlm_steps)}
    if "ar" in needed:
        runs["ar"] = train_stage(cfg, data_dir, out / "ar", "ar", p.ar_steps)
    if "nce" in needed:
        runs["nce"] = train_stage(cfg, data_dir, out / "nce", "nce", p.nce_steps, diffusion_ckpt=str(runs["mdlm"]))
    if p.block_size:
        runs["block"] = train_stage(block_config(cfg), data_dir, out / "block", "mdlm", p.block_steps or p.mdlm_steps)
    results: dict[str, Any] = {"methods": {}, "settings": _settings(cfg), "judge": judge, "data_dir": data_dir}
    cells = [(method, steps) for method in p.methods for steps in p.step_counts]
    cells += [(method, steps) for method in BLOCK_METHODS for steps in p.block_step_counts] if p.block_size else []
    scores = {}
    for method, steps in cells:
        summary = sample_stage(cfg, runs, out, method, steps)
        metrics, scores[method, steps] = sample_metrics(out / "samples" / f"{method}_T{steps}", oracle)
        results["methods"].setdefault(method, []).append({
            "steps": steps, **metrics,
            "k": summary.get("k"), "window": summary.get("window"), "mean_ess": summary.get("mean_ess"),
            "mean_nfe": summary.get("mean_nfe"), "sequential_calls": summary.get("mean_sequential_calls"),
        })
    # equal T means equal work only for the whole-row samplers (block-* rows take T steps PER BLOCK)
    results["comparisons"] = compare_at_equal_steps(
        {cell: score for cell, score in scores.items() if cell[0] not in BLOCK_METHODS}, baseline="mdlm")
    if p.ar_baseline:
        summary = sample_stage(cfg, runs, out, AR_METHOD, cfg.sample.steps, folder=out / "samples" / AR_METHOD)
        results["methods"][AR_METHOD] = [{"steps": None, **sample_metrics(out / "samples" / AR_METHOD, oracle)[0],
                                          "mean_nfe": summary.get("mean_nfe")}]
    if p.prompts and isinstance(oracle, ExactSyntheticOracle):
        results["prompted"] = prompted_stage(cfg, runs, data_dir, out, oracle.language)
    results["data"] = data_values(cfg, data_dir, oracle)
    results["likelihood"] = likelihood_stage(cfg, {k: v for k, v in runs.items() if k != "block"}, data_dir, out)
    if p.block_size:
        results["likelihood_block"] = block_likelihood_stage(cfg, runs["block"], data_dir, out)
    results["train_seconds"] = {name: train_seconds(path) for name, path in runs.items()}
    write_json_atomic(out / RESULTS_FILE, results)
    report(cfg, out, results)
    write_decoded_samples(cfg, out)
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
