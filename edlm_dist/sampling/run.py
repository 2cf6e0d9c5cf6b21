"""Sampling runs: MDLM or EDLM samples of trained models into a sample folder (:mod:`edlm_dist.artifacts.samples`).

``edlm sample`` and the pipeline call :func:`run_sampling`. It only samples: scoring the samples
(Gen PPL under an oracle, entropy) is :mod:`edlm_dist.evaluation.sample_metrics`' job.

Every setting is checked (and every checkpoint's meta.json read) before a model is loaded, so bad
input fails in a second with one line. Under torchrun (WORLD_SIZE > 1) the ranks are cut into
proposal groups and data-parallel groups (:mod:`edlm_dist.parallel.proposals`); rank 0 writes.
Sample i depends only on (models, settings, seed, i): not on batch size or rank layout.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from edlm_dist.artifacts.provenance import git_commit
from edlm_dist.artifacts.samples import SAMPLES_FILE, write_sample_folder
from edlm_dist.artifacts.weights import load_trained_model, read_weights_meta, synthetic_language_for, tokenizer_for
from edlm_dist.config.load import config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import CheckpointError, ConfigError, DataError
from edlm_dist.parallel.precision import inference_precision
from edlm_dist.parallel.proposals import sampling_layout
from edlm_dist.parallel.runtime import init_parallel, shutdown_parallel
from edlm_dist.sampling.block_denoiser import check_block_sampling, make_denoiser, model_block_size
from edlm_dist.sampling.conditioning import annotate, load_prompts, start_rows, start_states
from edlm_dist.sampling.engine import SamplerSettings
from edlm_dist.sampling.generate import Generator
from edlm_dist.sampling.long_text import window_plan
from edlm_dist.sampling.model_energies import build_energy

log = logging.getLogger("edlm.sample")
# Which checkpoint each energy needs: (config key, model kind).
ENERGY_CHECKPOINT = {"ar": ("ar_ckpt", "ar"), "coar": ("ar_ckpt", "ar"), "nce": ("energy_ckpt", "energy")}


def _checkpoint_record(path: str, meta: dict) -> dict:
    return {"path": str(Path(path).resolve()), "kind": meta.get("kind"), "step": meta.get("step")}


def check_inputs(cfg: RunConfig) -> dict[str, tuple[str, dict]]:
    """Read every needed meta.json and check kinds and compatibility; loads no weights.

    Returns ``{"diffusion": (path, meta), "ar"|"energy": (path, meta)}`` (only ``"ar"`` for the AR sampler).
    """
    s = cfg.sample
    if s.sampler == "ar":
        if not s.ar_ckpt:
            raise ConfigError("sample.sampler=ar needs sample.ar_ckpt=<the --out folder of an `edlm train "
                              "train.objective=ar` run>")
        needed = {"ar": (s.ar_ckpt, "ar")}
    elif not s.diffusion_ckpt:
        raise ConfigError("sample.diffusion_ckpt is empty; pass sample.diffusion_ckpt=<the --out folder of an "
                          "`edlm train` MDLM run>")
    else:
        needed = {"diffusion": (s.diffusion_ckpt, "dit")}
    if s.sampler == "edlm" and s.energy in ENERGY_CHECKPOINT:
        key, kind = ENERGY_CHECKPOINT[s.energy]
        if not getattr(s, key):
            objective = "ar" if kind == "ar" else "nce"
            raise ConfigError(f"sample.energy={s.energy} needs sample.{key}=<the --out folder of an `edlm train "
                              f"train.objective={objective}` run>")
        needed["ar" if kind == "ar" else "energy"] = (getattr(s, key), kind)
    found = {}
    for role, (path, kind) in needed.items():
        _, meta = read_weights_meta(path)
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path} holds a '{meta.get('kind')}' model but the {role} checkpoint must be "
                                  f"'{kind}'; pass the run folder of the right `edlm train` objective")
        found[role] = (path, meta)
    reference = model_meta(found)
    if s.block_size > int(reference.get("seq_len") or s.block_size):
        raise ConfigError(f"sample.block_size={s.block_size} exceeds the diffusion model's row length "
                          f"{reference.get('seq_len')}; use 0 (one block) or a size <= {reference.get('seq_len')}")
    check_block_sampling(model_block_size(reference), s.block_size, int(reference.get("seq_len") or 0))
    for role, (path, meta) in found.items():
        for key in ("vocab_size", "seq_len", "mask_id"):
            if meta.get(key) != reference.get(key):
                raise CheckpointError(f"the {role} checkpoint {path} has {key}={meta.get(key)} but the diffusion "
                                      f"model has {reference.get(key)}; use models trained on the same data")
    return found


def model_meta(found: dict[str, tuple[str, dict]]) -> dict:
    """The meta.json that defines the rows (vocabulary, length, mask id, data): the sampler's own model."""
    return found["diffusion"][1] if "diffusion" in found else found["ar"][1]


def row_shape(cfg: RunConfig, context: int, prompts: list, mask_id: int) -> tuple[int, int]:
    """(tokens per row N, new tokens per window) of a run, checked before any model loads."""
    s = cfg.sample
    total = s.length or context
    if s.sampler != "ar" and total < context:
        raise ConfigError(f"sample.length={total} is shorter than the diffusion model's rows ({context}); use 0 or "
                          f">= {context}")
    stride = s.stride or context // 2
    window_plan(total, context, stride, causal=s.sampler == "ar")  # raises on a stride that does not fit
    start_rows(prompts, total, mask_id)  # raises on a template longer than the row
    if s.sampler == "ar" and any(prompt.kind == "infill" for prompt in prompts):
        raise ConfigError("sample.sampler=ar continues prompts but cannot fill gaps; use sampler=mdlm or edlm for "
                          "infilling templates")
    return total, stride


def load_tokenizer(meta: dict):
    """The data's tokenizer for decoding samples, or None (samples then hold token ids only)."""
    try:
        return tokenizer_for(meta)
    except DataError as exc:
        log.warning("no tokenizer for decoding (%s); %s gets token ids only", exc, SAMPLES_FILE)
        return None


def _batches(num_samples: int, batch_size: int, data_rank: int, data_size: int) -> list[list[int]]:
    """Batches of consecutive sample ids, dealt round-robin to the data-parallel groups."""
    batches = [list(range(i, min(num_samples, i + batch_size))) for i in range(0, num_samples, batch_size)]
    return batches[data_rank::data_size]


def _init_runtime(cfg: RunConfig):
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return init_parallel(cfg, training=False)


def run_sampling(cfg: RunConfig, out_dir: str | os.PathLike, *, proposal_parallel: int = 0) -> Optional[dict]:
    """Sample ``cfg.sample.num_samples`` rows (per prompt, with prompts) into ``out_dir``; returns the summary
    on the writing rank."""
    settings = SamplerSettings.from_config(cfg.sample)
    found = check_inputs(cfg)
    dmeta = model_meta(found)
    tokenizer = load_tokenizer(dmeta)
    prompts = []
    if cfg.sample.prompts or cfg.sample.prompts_file:
        if tokenizer is None:
            raise ConfigError("prompts need the data's tokenizer, which this model's meta.json cannot rebuild; keep "
                              "the prepared data folder (data_dir in meta.json) next to the weights")
        prompts = load_prompts(cfg.sample.prompts, cfg.sample.prompts_file, tokenizer)
    shape = row_shape(cfg, int(dmeta["seq_len"]), prompts, int(dmeta["mask_id"]))
    needs_language = settings.sampler == "edlm" and cfg.sample.energy == "oracle"
    language = synthetic_language_for(dmeta) if needs_language else None
    if needs_language and language is None:
        raise ConfigError("sample.energy=oracle needs the exact synthetic language, but the diffusion model was "
                          "trained on non-synthetic data; use energy=ar, coar or nce")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _init_runtime(cfg)
    try:
        inputs = RunInputs(found, language, tokenizer, prompts, *shape)
        return _sample_and_write(cfg, settings, inputs, out, ctx, proposal_parallel)
    finally:
        if ctx is not None:
            shutdown_parallel()


@dataclass
class RunInputs:
    """What a run samples with, checked before any model loads."""

    found: dict  # role -> (checkpoint path, meta)
    language: object  # the exact synthetic language (oracle energy) or None
    tokenizer: object  # the data's tokenizer or None
    prompts: list  # conditioning.Prompt, possibly empty
    length: int  # tokens per row
    stride: int  # new tokens per window when length > the model's L


def _generator(cfg, settings, inputs: RunInputs, device, layout) -> Generator:
    s, meta = cfg.sample, model_meta(inputs.found)
    mask_id, vocab = int(meta["mask_id"]), int(meta["vocab_size"])
    models = {role: load_trained_model(inputs.found[role][0], use_ema=s.use_ema, expect_kind=kind, device=device)[0]
              for role, kind in (("diffusion", "dit"), ("ar", "ar"), ("energy", "energy")) if role in inputs.found}
    tokens = tokenizer_ids(meta, inputs.tokenizer)
    parts = {"proposals": layout.proposals}
    if settings.sampler == "ar":
        parts["ar_model"] = models["ar"]
    else:
        parts["denoiser"] = make_denoiser(models["diffusion"], mask_id, vocab)
    if settings.sampler == "edlm":
        parts["energy_fn"] = build_energy(s.energy, mask_id=mask_id, language=inputs.language,
                                          ar_model=models.get("ar"), energy_model=models.get("energy"))
    return Generator(settings, int(meta["seq_len"]), mask_id, tokens["bos_id"], tokens["eos_id"], device, **parts)


def tokenizer_ids(meta: dict, tokenizer) -> dict:
    """BOS / EOS ids of the data: from the tokenizer, else from the tokenizer description in meta.json."""
    described = meta.get("tokenizer") or {}
    out = {key: getattr(tokenizer, key, None) if tokenizer is not None else described.get(key)
           for key in ("bos_id", "eos_id")}
    if None in out.values():
        raise ConfigError("the checkpoint's meta.json names no BOS/EOS ids and the data's tokenizer is gone; keep the "
                          "prepared data folder next to the weights")
    return {key: int(value) for key, value in out.items()}


def _sample_and_write(cfg, settings, inputs: RunInputs, out, ctx, proposal_parallel) -> Optional[dict]:
    s = cfg.sample
    device = ctx.device if ctx is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mask_id = int(model_meta(inputs.found)["mask_id"])
    if settings.sampler != "edlm":  # no proposals to share: every rank samples its own sequences
        proposal_parallel, k_for_layout = 1, 1
    else:
        k_for_layout = settings.k
    layout = sampling_layout(ctx, proposal_parallel, k_for_layout)
    generator = _generator(cfg, settings, inputs, device, layout)
    num_rows = s.num_samples * max(1, len(inputs.prompts))
    my_batches = _batches(num_rows, s.batch_size, layout.data_rank, layout.data_size)
    records, ess_steps = [], []
    show = cfg.logging.progress and (ctx is None or ctx.rank == 0)
    started = time.perf_counter()
    with tqdm(total=sum(len(b) for b in my_batches), desc=f"sample {settings.sampler}", unit="seq",
              disable=not show) as bar:
        for ids in my_batches:
            x_init = start_states(ids, inputs.prompts, s.num_samples, inputs.length, mask_id).to(device)
            tick = time.perf_counter()
            with inference_precision(device, s.model_precision):
                result = generator.generate(ids, x_init, stride=inputs.stride)
            seconds = (time.perf_counter() - tick) / len(ids)
            tokens = result.tokens.cpu()
            ess = result.row_mean_ess if result.row_ess_sum is not None else torch.full((len(ids),), math.nan)
            for r, index in enumerate(ids):
                records.append({"index": index, "tokens": tokens[r].tolist(), "seconds": seconds, "nfe": result.nfe,
                                "sequential_calls": result.nfe + result.energy_calls + result.prefix_calls,
                                "mean_ess": None if math.isnan(float(ess[r])) else float(ess[r]),
                                "start": x_init[r].tolist()})
            ess_steps.append((len(ids), result.ess_per_step))
            bar.update(len(ids))
    elapsed = time.perf_counter() - started
    if ctx is not None:
        gathered = [None] * ctx.world_size if ctx.rank == 0 else None
        dist.gather_object((records, ess_steps) if layout.writes else ([], []), gathered, dst=0)
        if ctx.rank != 0:
            return None
        records = [r for part in gathered for r in part[0]]
        ess_steps = [e for part in gathered for e in part[1]]
    records.sort(key=lambda r: r["index"])
    for record in records:
        record["text"] = inputs.tokenizer.decode(record["tokens"]) if inputs.tokenizer is not None else None
        annotate(record, record.pop("start"), mask_id, inputs.tokenizer, inputs.prompts, s.num_samples)
    summary = _summary(cfg, settings, inputs, records, ess_steps, elapsed, ctx, layout)
    written = write_sample_folder(out, records, summary)
    if summary["ess_per_step"] is not None:
        log.info("ESS per step (of k=%d): %s", settings.k,
                 " ".join("-" if v is None else f"{v:.2f}" for v in summary["ess_per_step"]))
    log.info("wrote %d samples to %s (mean ESS %s, %.3f s/sample)", len(records), written,
             summary["mean_ess"], summary["mean_seconds_per_sample"])
    return summary


def _mean_ess_per_step(ess_steps: list) -> list:
    """Row-weighted mean over batches of each step's mean ESS (None where no row ran IS)."""
    if not ess_steps:
        return []
    out = []
    for step in range(len(ess_steps[0][1])):
        pairs = [(n, per_step[step]) for n, per_step in ess_steps if per_step[step] is not None]
        out.append(sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else None)
    return out


def _summary(cfg, settings, inputs: RunInputs, records, ess_steps, elapsed, ctx, layout) -> dict:
    s, edlm, found = cfg.sample, settings.sampler == "edlm", inputs.found
    context = int(model_meta(found)["seq_len"])
    ess_values = [r["mean_ess"] for r in records if r["mean_ess"] is not None]
    summary = {
        "num_samples": len(records),
        **asdict(settings),
        "energy": s.energy if edlm else None,
        "k": settings.k if edlm else None,
        "window": settings.window if edlm else None,
        "temperature": settings.temperature if settings.sampler != "mdlm" else None,
        "redraw_every_step": settings.redraw_every_step if edlm else None,
        "batch_size": s.batch_size,
        "use_ema": s.use_ema,
        "checkpoints": {role: _checkpoint_record(path, meta) for role, (path, meta) in found.items()},
        "seq_len": context,
        "length": inputs.length,
        "stride": inputs.stride if inputs.length > context else None,
        "windows": len(window_plan(inputs.length, context, inputs.stride, causal=settings.sampler == "ar")),
        "prompts": [prompt.source for prompt in inputs.prompts],
        "samples_per_prompt": s.num_samples if inputs.prompts else None,
        "git_commit": git_commit(),
        "world_size": 1 if ctx is None else ctx.world_size,
        "tp": 1 if ctx is None else ctx.tp_size,
        "proposal_parallel": layout.proposal_size,
        "data_parallel_groups": layout.data_size,
        "mean_ess": sum(ess_values) / len(ess_values) if ess_values else None,
        "ess_per_step": _mean_ess_per_step(ess_steps) if edlm else None,
        "mean_seconds_per_sample": sum(r["seconds"] for r in records) / max(1, len(records)),
        "wall_seconds": elapsed,
        "mean_nfe": sum(r["nfe"] for r in records) / max(1, len(records)),
        "mean_sequential_calls": sum(r["sequential_calls"] for r in records) / max(1, len(records)),
        "config": config_to_dict(cfg),
    }
    return summary


