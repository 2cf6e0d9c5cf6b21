"""``edlm eval CONFIG [key=value ...] --out DIR``: likelihood, Gen PPL and entropy in one command.

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

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edlm_dist.config.load import config_to_dict, load_config
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import CheckpointError, ConfigError, DataError
from edlm_dist.evaluation.sample_metrics import read_samples_jsonl

LIKELIHOOD_ROWS = [  # (metrics key, estimate, table label)
    ("ar", None, "AR"), ("mdlm", None, "MDLM"), ("edlm_coar", None, "EDLM-coAR"),
    ("edlm_ar", "upper", "EDLM-AR (Thm-1 upper)"), ("edlm_ar", "lower", "EDLM-AR (Thm-1 lower)"),
    ("edlm_ar", "plugin", "EDLM-AR (plug-in, ref. code)"), ("edlm_nce", "upper", "EDLM-NCE (Thm-1 upper)"),
    ("edlm_nce", "lower", "EDLM-NCE (Thm-1 lower)"), ("edlm_nce", "plugin", "EDLM-NCE (plug-in, ref. code)"),
]
NOTES = """Notes (docs/likelihood_bounds.md):
- Per token over all L positions (AR: the L−1 predicted ones); PPL = exp(NLL), bits = NLL / ln 2 (BPC for characters).
- MDLM: one (t, mask) Monte-Carlo term of the NELBO per row; an upper bound on the NLL up to O(ε) truncation.
- EDLM rows estimate the paper's Eq. 13, which uses the *joint* likelihood where the masked-diffusion NELBO needs
  per-token marginals, so they are not certified bounds on the NLL (spec §6.6). Thm-1 upper/lower plug Theorem 1's
  upper / lower log Z estimates (n negatives from pθ) into Eq. 13; the upper one is biased high only for n large
  enough. The plug-in is the released code's one-negative value (biased low).
- EDLM-coAR reduces exactly to the AR likelihood: E[coAR] = (1−ε)·(L−1)/L·AR per token plus pθ's NLL of the
  first token (`ar_prediction_nll` and `position0_nll` in metrics.json; row "predicted from AR").
"""


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
    from edlm_dist.training.weights import read_weights_meta

    _, meta = read_weights_meta(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"'{path}' holds a '{meta.get('kind')}' model but a '{kind}' model is needed here; "
                              "pass the run folder of the right `edlm train` objective")
    return meta


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
            from edlm_dist.data.shards import load_manifest
            from edlm_dist.evaluation.sample_metrics import synthetic_language_from_manifest

            synthetic_language_from_manifest(load_manifest(data_dir))  # ConfigError for non-synthetic data
        if "genppl" in metrics and e.oracle != "exact":
            from edlm_dist.evaluation.genppl import _check_oracle_location

            _check_oracle_location(e.oracle)
        for path in plan.sample_files:
            read_samples_jsonl(path)  # parse errors surface now, with the line number
    return plan


def sample_on_the_fly(args: argparse.Namespace, out: Path) -> list[str]:
    """Run ``edlm sample`` with the same config into OUT/samples (its own process-group lifetime)."""
    try:
        from edlm_dist.sampling import cli as sample_cli
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("edlm_dist"):
            raise ConfigError("eval.samples is empty and `edlm sample` is not available in this install; pass "
                              "eval.samples=[path/to/samples.jsonl,...]") from None
        raise
    folder = out / "samples"
    sample_cli.cli_main(argparse.Namespace(config=args.config, overrides=list(args.overrides or []), out=str(folder)))
    return [str(folder / "samples.jsonl")]


def _load_models(plan: EvalPlan, device):
    from edlm_dist.evaluation.likelihood import LikelihoodModels
    from edlm_dist.training.weights import load_trained_model

    loaded = {kind: load_trained_model(path, use_ema=True, expect_kind=kind, device=device)
              for kind, path in plan.checkpoints.items()}
    meta = next(iter(loaded.values()))[1]
    return LikelihoodModels(vocab_size=int(meta["vocab_size"]), seq_len=int(meta["seq_len"]),
                            mask_id=int(meta["mask_id"]), diffusion=loaded.get("dit", (None,))[0],
                            ar=loaded.get("ar", (None,))[0], energy=loaded.get("energy", (None,))[0]), loaded


def run_likelihood(cfg: RunConfig, plan: EvalPlan, ctx) -> dict:
    from edlm_dist.data.shards import validate_dataset
    from edlm_dist.evaluation.likelihood import LikelihoodSettings, evaluate_likelihood

    models, loaded = _load_models(plan, ctx.device)
    validate_dataset(plan.data_dir, seq_len=models.seq_len, vocab_size=models.vocab_size, splits=("valid",))
    e = cfg.eval
    settings = LikelihoodSettings(n_negatives=e.n_negatives, seed=e.seed, strata=e.batch_size,
                                  sampling_eps=cfg.train.sampling_eps, chunk_rows=e.batch_size)
    # max_batches counts single-rank batches, so the rows (and numbers) do not depend on the rank count.
    max_rows = e.max_batches * e.batch_size if e.max_batches > 0 else None
    result = evaluate_likelihood(models, plan.data_dir, settings=settings, batch_size=e.batch_size, max_rows=max_rows,
                                 dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, dp_group=ctx.dp_group,
                                 progress=cfg.logging.progress and ctx.is_main)
    result["data_dir"] = plan.data_dir
    from edlm_dist.training.weights import resolve_weights_dir

    result["checkpoints"] = {
        kind: {"path": plan.checkpoints[kind], "step": meta.get("step"),
               "weights": "ema" if (resolve_weights_dir(plan.checkpoints[kind]) / "ema.safetensors").is_file()
               else "raw"}
        for kind, (_, meta, _) in loaded.items()}
    return result


def _build_oracle(cfg: RunConfig, plan: EvalPlan, ctx, manifest: Optional[dict], tokenizer):
    from edlm_dist.evaluation.sample_metrics import ExactSyntheticOracle, HFOracle, synthetic_language_from_manifest

    if "genppl" not in plan.metrics:
        return None, None
    if cfg.eval.oracle == "exact":
        language = synthetic_language_from_manifest(manifest or {})
        return ExactSyntheticOracle(language), language
    oracle = HFOracle(cfg.eval.oracle, device=ctx.device, batch_size=cfg.eval.oracle_batch_size, tokenizer=tokenizer)
    return oracle, None


def run_sample_metrics(cfg: RunConfig, plan: EvalPlan, ctx) -> tuple[list[dict], Optional[dict]]:
    from edlm_dist.data.shards import load_manifest
    from edlm_dist.evaluation.sample_metrics import data_reference, evaluate_sample_file

    manifest = load_manifest(plan.data_dir) if plan.data_dir else None
    tokenizer = None
    if manifest is not None:
        from edlm_dist.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(str(Path(plan.data_dir) / manifest.get("tokenizer_dir", "tokenizer")))
    oracle, language = _build_oracle(cfg, plan, ctx, manifest, tokenizer)
    entropy = "entropy" in plan.metrics
    # Samples are split over every rank (TP peers too): the oracle is not tensor-parallel.
    split = dict(dp_rank=ctx.rank, dp_size=ctx.world_size, dp_group=None, device=ctx.device)
    results = [evaluate_sample_file(path, oracle, entropy=entropy, **split) for path in plan.sample_files]
    reference = None
    if manifest is not None and results:
        num_rows = max(r["num_samples"] for r in results)
        reference = data_reference(plan.data_dir, oracle, entropy=entropy, num_rows=num_rows, tokenizer=tokenizer,
                                   language=language, **split)
    return results, reference


# ------------------------------------------------------------------------------------- outputs
def _fmt(value, spec: str = "{:.3f}") -> Optional[str]:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _nll_row(label: str, estimate: str, nll: float) -> dict:
    from edlm_dist.evaluation.likelihood import safe_exp

    return {"Method": label, "Estimate": estimate, "NLL (nats/token)": _fmt(nll, "{:.4f}"),
            "PPL": _fmt(safe_exp(nll), "{:.2f}"),
            "Bits/token": _fmt(nll / math.log(2), "{:.4f}")}


def markdown_report(results: dict) -> str:
    from edlm_dist.evaluation.report import markdown_table

    parts = ["# edlm eval\n"]
    lik = results.get("likelihood")
    if lik:
        parts.append(f"## Validation likelihood\n\n{lik['rows']} rows × {lik['seq_len']} tokens of "
                     f"`{lik['data_dir']}`, n = {lik['settings']['n_negatives']} negatives, seed "
                     f"{lik['settings']['seed']}.\n")
        rows = []
        for key, estimate, label in LIKELIHOOD_ROWS:
            entry = lik["methods"].get(key)
            if entry is None:
                continue
            entry = entry[estimate] if estimate else entry
            rows.append(_nll_row(label, entry["estimate"], entry["nll"]))
            if key == "edlm_coar" and "ar_prediction_nll" in entry:  # the exact relation, side by side
                rows.append(_nll_row("EDLM-coAR predicted from AR", "(1−ε)(L−1)/L · AR + pθ's first token",
                                     entry["ar_prediction_nll"] + entry["position0_nll"]))
        parts.append(markdown_table(rows, ["Method", "Estimate", "NLL (nats/token)", "PPL", "Bits/token"]))
        parts.append("\n" + NOTES)
    samples = results.get("samples")
    if samples:
        oracle = next((s.get("oracle") for s in samples if s.get("oracle")), None)
        parts.append(f"\n## Samples\n\nGen PPL oracle: `{oracle or '-'}`; entropy: unigram, bits, mean over samples.\n")
        columns = ["Method", "Steps", "k", "Window", "Gen PPL", "Entropy (bits)", "s/sample", "Samples", "File"]
        rows = []
        reference = results.get("data_reference")
        if reference:
            rows.append({"Method": "Data (validation rows)", "Gen PPL": _fmt(reference.get("gen_ppl"), "{:.2f}"),
                         "Entropy (bits)": _fmt(reference.get("entropy_bits")),
                         "Samples": reference.get("num_samples")})
            if "entropy_rate_ppl" in reference:
                rows.append({"Method": "Data (exact entropy rate)",
                             "Gen PPL": _fmt(reference["entropy_rate_ppl"], "{:.2f}")})
        for s in sorted(samples, key=lambda s: (s["method"], s.get("steps") or 0)):
            rows.append({"Method": s["method"], "Steps": s.get("steps"), "k": s.get("k"), "Window": s.get("window"),
                         "Gen PPL": _fmt(s.get("gen_ppl"), "{:.2f}"), "Entropy (bits)": _fmt(s.get("entropy_bits")),
                         "s/sample": _fmt(s.get("seconds_per_sample"), "{:.4f}"), "Samples": s["num_samples"],
                         "File": Path(s["file"]).parent.name + "/" + Path(s["file"]).name})
        parts.append(markdown_table(rows, columns))
    for name, path in results.get("plots", {}).items():
        parts.append(f"\n![{name}]({Path(path).name})\n")
    return "\n".join(parts)


def make_plots(samples: list[dict], out: Path) -> dict[str, str]:
    """Fig. 1a (Gen PPL vs steps and vs s/sample) and Fig. 4 (entropy vs Gen PPL) when steps vary."""
    from edlm_dist.evaluation.report import plot_entropy_vs_genppl, plot_frontier

    steps = {s.get("steps") for s in samples if s.get("steps") is not None}
    if len(samples) < 2 or len(steps) < 2 or not any("gen_ppl" in s for s in samples):
        return {}
    by_method: dict[str, list[dict]] = {}
    for s in samples:
        by_method.setdefault(s["method"], []).append(
            {"steps": s.get("steps"), "gen_ppl": s.get("gen_ppl"), "seconds_per_sample": s.get("seconds_per_sample"),
             "entropy": s.get("entropy_bits")})
    plots = {"frontier": plot_frontier(by_method, out / "genppl_frontier.png")}
    if any("entropy_bits" in s for s in samples):
        plots["entropy_vs_genppl"] = plot_entropy_vs_genppl(by_method, out / "entropy_vs_genppl.png")
    return plots


def _finite(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if results.get("samples"):
        results["plots"] = make_plots(results["samples"], out)
    (out / "metrics.json").write_text(json.dumps(_finite(results), indent=1, ensure_ascii=False) + "\n")
    (out / "metrics.md").write_text(markdown_report(results))


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    plan = resolve_plan(cfg)
    if plan.needs_samples and not plan.sample_files:
        plan.sample_files = sample_on_the_fly(args, out)
    import torch.distributed as dist

    from edlm_dist.parallel.runtime import init_parallel, shutdown_parallel

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
        if "ppl" in plan.metrics:
            results["likelihood"] = run_likelihood(cfg, plan, ctx)
        if plan.needs_samples:
            results["samples"], reference = run_sample_metrics(cfg, plan, ctx)
            if reference is not None:
                results["data_reference"] = reference
        if ctx.is_main:
            write_outputs(results, out)
    finally:
        shutdown_parallel()
    return 0
