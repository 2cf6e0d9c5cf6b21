"""Evaluation runs: likelihood, Gen PPL and entropy of trained models and sample files (``edlm eval``).

``eval.metrics`` picks ``ppl`` (validation likelihood of every model given: MDLM NELBO, AR exact,
EDLM-coAR, EDLM-AR and EDLM-NCE with Theorem-1 bounds; likelihood.py), ``genppl`` and ``entropy``
(of the sample files in ``eval.samples``, or of samples drawn on the fly with ``edlm sample`` when
that list is empty; sample_metrics.py). Runs on any number of ranks (torchrun / SLURM / one
process): validation rows and samples are split over the ranks and the float64 sums all-reduced.

Writes ``metrics.json`` (every number with the settings that produced it), ``metrics.md`` (the
methods side by side, like the paper's tables) and, when sample files with several step counts are
given, the paper's Fig. 1a / Fig. 4 plots. Checkpoints: ``eval.*_ckpt``, falling back to
``sample.*_ckpt``; an NCE energy without a diffusion checkpoint uses the one it was trained on.
All input checks run before any process group or model is started.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from edlm_dist.artifacts.hf_export import META_FILE as HF_META_FILE
from edlm_dist.artifacts.hf_export import read_export_meta
from edlm_dist.artifacts.samples import read_samples_jsonl, samples_path
from edlm_dist.artifacts.weights import EMA_FILE, load_trained_model, read_weights_meta, resolve_weights_dir
from edlm_dist.config.load import config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.loader import build_eval_loader
from edlm_dist.data.shards import load_manifest, saved_tokenizer, validate_dataset
from edlm_dist.data.synthetic import SyntheticLanguage, language_from_manifest
from edlm_dist.errors import CheckpointError, ConfigError, DataError
from edlm_dist.evaluation.genppl import check_oracle_location
from edlm_dist.evaluation.likelihood import (
    LikelihoodModels,
    LikelihoodSettings,
    Sums,
    expected_keys,
    likelihood_batch_terms,
    summarize_likelihood,
)
from edlm_dist.evaluation.ngram_judge import KneserNeyJudge
from edlm_dist.evaluation.report import write_outputs
from edlm_dist.evaluation.sample_metrics import (
    ExactSyntheticOracle,
    HFOracle,
    Oracle,
    compare_at_equal_steps,
    data_reference,
    file_metrics,
    fit_ngram_judge,
    score_sample_file,
)
from edlm_dist.parallel.precision import inference_precision
from edlm_dist.parallel.collectives import all_reduce_float64
from edlm_dist.parallel.runtime import init_parallel, shutdown_parallel
from edlm_dist.sampling.run import run_sampling

log = logging.getLogger("edlm.eval")


@dataclass
class EvalPlan:
    """Everything resolved from the config before any distributed work."""

    metrics: list[str]
    checkpoints: dict[str, str]  # kind -> run folder (dit / ar / energy)
    data_dir: str
    sample_files: list[str] = field(default_factory=list)
    oracle: str = "exact"

    @property
    def needs_samples(self) -> bool:
        return "genppl" in self.metrics or "entropy" in self.metrics


def _checkpoint_meta(path: str, kind: str) -> dict:
    _, meta = read_weights_meta(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"'{path}' holds a '{meta.get('kind')}' model but a '{kind}' model is needed here; "
                              "pass the run folder of the right `edlm train` objective")
    return meta


def exact_language(data_dir: str | os.PathLike) -> SyntheticLanguage:
    """The exact oracle's language: the one that generated ``data_dir``; ConfigError for other data."""
    language = language_from_manifest(load_manifest(data_dir))
    if language is None:
        raise ConfigError("eval.oracle=exact needs data prepared from the synthetic language; for text data set "
                          "eval.oracle=ngram (a judge fitted on the held-out text) or a local HF causal LM folder")
    return language


def resolve_plan(cfg: RunConfig) -> EvalPlan:
    """Check checkpoints, data, oracle and sample files; ConfigError/DataError/CheckpointError one-liners."""
    e, s = cfg.eval, cfg.sample
    metrics = list(dict.fromkeys(e.metrics))
    if not metrics:
        raise ConfigError("eval.metrics is empty; use e.g. eval.metrics=[ppl,genppl,entropy]")
    paths = {"dit": e.diffusion_ckpt or s.diffusion_ckpt, "ar": e.ar_ckpt or s.ar_ckpt,
             "energy": e.energy_ckpt or s.energy_ckpt}
    metas = {kind: _checkpoint_meta(path, kind) for kind, path in paths.items() if path}
    if "energy" in metas and "dit" not in metas:
        recorded = metas["energy"].get("config", {}).get("train", {}).get("diffusion_ckpt")
        if not recorded:
            raise ConfigError("the NCE energy needs its diffusion model; set eval.diffusion_ckpt=<MDLM run>")
        paths["dit"], metas["dit"] = recorded, _checkpoint_meta(recorded, "dit")
    data_dir = cfg.data.dir or next((m.get("data_dir") for m in metas.values() if m.get("data_dir")), "")
    if "ppl" in metrics:
        if "dit" not in metas and "ar" not in metas:
            raise ConfigError("eval.metrics has ppl but no model is given; set eval.diffusion_ckpt and/or eval.ar_ckpt")
        if not data_dir:
            raise ConfigError("ppl needs the validation data; set data.dir=<prepared data folder>")
        signatures = {(m["vocab_size"], m["seq_len"], m.get("mask_id")) for m in metas.values()}
        if len(signatures) > 1:
            raise CheckpointError(f"the checkpoints disagree on (vocab_size, seq_len, mask_id): {sorted(signatures)}; "
                                  "evaluate models trained on the same data together")
    plan = EvalPlan(metrics, {k: paths[k] for k in metas}, str(data_dir), [str(p) for p in e.samples], e.oracle)
    if plan.needs_samples:
        if "genppl" in metrics and e.oracle == "exact":
            if not data_dir:
                raise ConfigError("eval.oracle=exact needs the synthetic data's folder; set data.dir=<prepared data>")
            exact_language(data_dir)  # ConfigError for non-synthetic data
        if "genppl" in metrics and e.oracle == "ngram" and not data_dir:
            raise ConfigError("eval.oracle=ngram fits its judge on the validation text; set data.dir=<prepared data>")
        if "genppl" in metrics and e.oracle not in ("exact", "ngram"):
            check_oracle_location(e.oracle)
        for path in plan.sample_files:
            read_samples_jsonl(path)  # parse errors surface now, with the line number
    return plan


# ---------------------------------------------------------------------------------- likelihood
def evaluate_likelihood(models: LikelihoodModels, data_dir, *, settings: LikelihoodSettings, batch_size: int,
                        max_rows: Optional[int] = None, split: str = "valid", dp_rank: int = 0, dp_size: int = 1,
                        dp_group=None, progress: bool = False) -> dict:
    """Every (or the first ``max_rows``) validation row once across the DP ranks; returns the summary.

    Collective over ``dp_group`` when torch.distributed is initialised; identical on every rank.
    """
    methods = models.methods()
    device = models.device()
    loader = build_eval_loader(data_dir, split, micro_batch=batch_size, dp_rank=dp_rank, dp_world=dp_size,
                               max_rows=max_rows)
    row = loader.stream.block(0)[0]  # this rank's first global row index (one reader stream)
    sums = Sums()
    batches = tqdm(loader, total=loader.num_batches(), desc="likelihood", dynamic_ncols=True, disable=not progress)
    rows_seen = 0
    for batch in batches:
        if batch.shape[1] != models.seq_len:
            raise DataError(f"validation rows of {data_dir} have length {batch.shape[1]} but the models were "
                            f"trained on seq_len={models.seq_len}; evaluate on the data the models were trained on")
        x0 = batch.to(device)
        row_ids = torch.arange(row, row + x0.shape[0])
        for key, (values, weight) in likelihood_batch_terms(models, x0, row_ids, settings).items():
            sums.add(key, values, weight)
        row += x0.shape[0]
        rows_seen += x0.shape[0]
    # Ranks without rows still take part with zero sums under the same keys.
    for key in expected_keys(methods, settings):
        sums.values.setdefault(key, [0.0, 0.0])
    sums.load_flat(all_reduce_float64(sums.flat(), dp_group, device))
    total_rows = int(all_reduce_float64([float(rows_seen)], dp_group, device)[0])
    return summarize_likelihood(sums, methods, settings, total_rows, models.seq_len, models.block_size())


def likelihood_settings(cfg: RunConfig) -> LikelihoodSettings:
    """The estimator settings of a config (``eval`` section; t's lower end is the training's sampling_eps)."""
    e = cfg.eval
    return LikelihoodSettings(n_negatives=e.n_negatives, seed=e.seed, strata=e.batch_size,
                              sampling_eps=cfg.train.sampling_eps, chunk_rows=e.batch_size)


def load_likelihood_models(checkpoints: dict[str, str | os.PathLike], device=None):
    """``(LikelihoodModels, {kind: (model, meta, config)})`` from run folders keyed dit / ar / energy (EMA weights)."""
    loaded = {kind: load_trained_model(path, use_ema=True, expect_kind=kind, device=device)
              for kind, path in checkpoints.items()}
    meta = next(iter(loaded.values()))[1]
    return LikelihoodModels(vocab_size=int(meta["vocab_size"]), seq_len=int(meta["seq_len"]),
                            mask_id=int(meta["mask_id"]), diffusion=loaded.get("dit", (None,))[0],
                            ar=loaded.get("ar", (None,))[0], energy=loaded.get("energy", (None,))[0]), loaded


def likelihood_metrics(cfg: RunConfig, models: LikelihoodModels, data_dir: str | os.PathLike, ctx=None) -> dict:
    """Validation likelihood of ``models`` with the config's estimator settings, over the ranks of ``ctx``
    (one process when None). ``eval.max_batches`` counts single-rank batches, so the rows (and numbers)
    do not depend on the rank count."""
    e = cfg.eval
    max_rows = e.max_batches * e.batch_size if e.max_batches > 0 else None
    split = dict(dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, dp_group=ctx.dp_group) if ctx is not None else {}
    return evaluate_likelihood(models, data_dir, settings=likelihood_settings(cfg), batch_size=e.batch_size,
                               max_rows=max_rows, progress=cfg.logging.progress and (ctx is None or ctx.is_main),
                               **split)


def run_likelihood(cfg: RunConfig, plan: EvalPlan, ctx) -> dict:
    """``edlm eval``'s likelihood: the metrics plus where the data and the weights came from."""
    models, loaded = load_likelihood_models(plan.checkpoints, ctx.device)
    validate_dataset(plan.data_dir, seq_len=models.seq_len, vocab_size=models.vocab_size, splits=("valid",))
    result = likelihood_metrics(cfg, models, plan.data_dir, ctx)
    result["data_dir"] = plan.data_dir
    result["checkpoints"] = {
        kind: {"path": plan.checkpoints[kind], "step": meta.get("step"),
               "weights": "ema" if (resolve_weights_dir(plan.checkpoints[kind]) / EMA_FILE).is_file() else "raw"}
        for kind, (_, meta, _) in loaded.items()}
    return result


# -------------------------------------------------------------------------------- sample files
def build_judge(oracle: str, data_dir: str | os.PathLike, *, judge_order: int, batch_size: int,
                checkpoints: dict, device: torch.device | str = "cpu", tokenizer=None) -> tuple[Oracle, str]:
    """The Gen-PPL judge ``eval.oracle`` names, and its description for reports (``edlm eval`` and the pipeline).

    ``exact``: the synthetic language that generated ``data_dir`` (ConfigError for other data); ``ngram``: a
    Kneser-Ney model fitted on the validation split only; else a local HF causal LM folder, with a warning when
    it is EDLM's own AR energy or saw the models' training text (``checkpoints``: the runs being judged).
    """
    if oracle == "exact":
        return ExactSyntheticOracle(exact_language(data_dir)), "the exact language (synthetic data)"
    if oracle == "ngram":
        judge = fit_ngram_judge(data_dir, judge_order)
        return judge, (f"a Kneser-Ney {judge.order}-gram fitted on the validation split only "
                       f"({judge.fitted_tokens:,} tokens no model trained on)")
    warn_if_judge_is_not_independent(oracle, checkpoints, str(data_dir))
    return HFOracle(oracle, device=device, batch_size=batch_size, tokenizer=tokenizer), oracle


def reference_split(oracle: Optional[Oracle]) -> str:
    """The split of the data's own reference rows: rows the judge never saw. The n-gram judge was fitted on the
    validation rows, so its reference comes from training rows; every other judge gets the validation rows."""
    return "train" if isinstance(oracle, KneserNeyJudge) else "valid"


def warn_if_judge_is_not_independent(oracle: str, checkpoints: dict, data_dir: Optional[str]) -> Optional[str]:
    """A Gen-PPL judge exported from our own AR run is EDLM's energy (circular) or at least saw the models'
    training text: say so in a warning (returned too, for the results)."""
    if not (Path(oracle) / HF_META_FILE).is_file():
        return None
    meta = read_export_meta(oracle)
    message = None
    ar = checkpoints.get("ar")
    if ar and meta.get("kind") == "ar":
        _, ar_meta = read_weights_meta(ar)
        if ar_meta.get("step") == meta.get("step") and ar_meta.get("config") == meta.get("config"):
            message = (f"eval.oracle {oracle} is EDLM's own AR energy (exported from the run {ar}): Gen PPL of "
                       "EDLM-AR samples under it is circular; judge with eval.oracle=ngram or an independent model")
    if message is None and data_dir and str((meta.get("config") or {}).get("data", {}).get("dir")) == str(data_dir):
        message = (f"eval.oracle {oracle} was trained on the models' own training data ({data_dir}), so it is not an "
                   "independent judge; judge with eval.oracle=ngram (fitted on held-out text) or an independent model")
    if message:
        log.warning("%s", message)
    return message


def run_sample_metrics(cfg: RunConfig, plan: EvalPlan, ctx) -> tuple[list[dict], Optional[dict], list[dict]]:
    """Each sample file's metrics with their intervals, the data's reference values, and every method
    against MDLM at equal steps (Gen PPL ratios, Holm-corrected; empty without an oracle or MDLM files)."""
    manifest = load_manifest(plan.data_dir) if plan.data_dir else None
    tokenizer = saved_tokenizer(plan.data_dir, manifest) if manifest is not None else None
    oracle = None
    if "genppl" in plan.metrics:
        oracle, _ = build_judge(cfg.eval.oracle, plan.data_dir, judge_order=cfg.eval.judge_order,
                                batch_size=cfg.eval.oracle_batch_size, checkpoints=plan.checkpoints,
                                device=ctx.device, tokenizer=tokenizer)
    entropy = "entropy" in plan.metrics
    # Samples are split over every rank (TP peers too): the oracle is not tensor-parallel.
    split = dict(dp_rank=ctx.rank, dp_size=ctx.world_size, dp_group=None, device=ctx.device)
    results, cells = [], {}
    for path in plan.sample_files:
        settings, scores = score_sample_file(path, oracle, entropy=entropy, **split)
        results.append(file_metrics(settings, scores))
        label = settings["method"]
        if (label, settings["steps"]) in cells:  # two files of one method and T (other k, ...): name the folder
            label = f"{label} ({Path(path).parent.name})"
        cells[label, settings["steps"]] = scores
    comparisons = compare_at_equal_steps(cells, baseline="MDLM") if oracle is not None else []
    reference = None
    if manifest is not None and results:
        num_rows = max(r["num_samples"] for r in results)
        reference = data_reference(plan.data_dir, oracle, entropy=entropy, num_rows=num_rows, tokenizer=tokenizer,
                                   language=getattr(oracle, "language", None), split=reference_split(oracle), **split)
    return results, reference, comparisons


# ------------------------------------------------------------------------------------ the run
def run_evaluation(cfg: RunConfig, out_dir: str | os.PathLike) -> dict:
    """``edlm eval``: resolve the plan, sample on the fly if needed, evaluate, write metrics.json/.md."""
    out = Path(out_dir)
    plan = resolve_plan(cfg)
    if plan.needs_samples and not plan.sample_files:  # `edlm sample` with the same config, its own process group
        run_sampling(cfg, out / "samples", proposal_parallel=cfg.sample.proposal_parallel)
        plan.sample_files = [str(samples_path(out / "samples"))]
    ctx = init_parallel(cfg, training=False)
    try:
        dist.barrier()  # on-the-fly samples are written by one rank
        for path in plan.sample_files:
            if not Path(path).is_file():
                raise DataError(f"sample file {path} does not exist; check eval.samples or the `edlm sample` run")
        results: dict = {"settings": {"metrics": plan.metrics, "oracle": plan.oracle, "data_dir": plan.data_dir,
                                      "checkpoints": plan.checkpoints, "sample_files": plan.sample_files,
                                      "world_size": ctx.world_size, "dp_size": ctx.dp_size, "tp_size": ctx.tp_size,
                                      "device": str(ctx.device), "config": config_to_dict(cfg)}}
        with inference_precision(ctx.device, cfg.eval.model_precision) as precision:
            results["settings"]["model_precision"] = precision
            if "ppl" in plan.metrics:
                results["likelihood"] = run_likelihood(cfg, plan, ctx)
            if plan.needs_samples:
                results["samples"], reference, comparisons = run_sample_metrics(cfg, plan, ctx)
            if reference is not None:
                results["data_reference"] = reference
            if comparisons:
                results["comparisons"] = comparisons
        if ctx.is_main:
            write_outputs(results, out)
    finally:
        shutdown_parallel()
    return results
