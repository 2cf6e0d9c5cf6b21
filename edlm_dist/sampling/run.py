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
from dataclasses import asdict
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
from edlm_dist.parallel.proposals import sampling_layout
from edlm_dist.parallel.runtime import init_parallel, shutdown_parallel
from edlm_dist.sampling.block_denoiser import check_block_sampling, make_denoiser, model_block_size
from edlm_dist.sampling.blocks import sample_rows
from edlm_dist.sampling.engine import SamplerSettings
from edlm_dist.sampling.model_energies import build_energy

log = logging.getLogger("edlm.sample")
# Which checkpoint each energy needs: (config key, model kind).
ENERGY_CHECKPOINT = {"ar": ("ar_ckpt", "ar"), "coar": ("ar_ckpt", "ar"), "nce": ("energy_ckpt", "energy")}


def _checkpoint_record(path: str, meta: dict) -> dict:
    return {"path": str(Path(path).resolve()), "kind": meta.get("kind"), "step": meta.get("step")}


def check_inputs(cfg: RunConfig) -> dict[str, tuple[str, dict]]:
    """Read every needed meta.json and check kinds and compatibility; loads no weights.

    Returns ``{"diffusion": (path, meta), "ar"|"energy": (path, meta)}``.
    """
    s = cfg.sample
    if not s.diffusion_ckpt:
        raise ConfigError("sample.diffusion_ckpt is empty; pass sample.diffusion_ckpt=<the --out folder of an "
                          "`edlm train` MDLM run>")
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
    reference = found["diffusion"][1]
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
    """Sample ``cfg.sample.num_samples`` rows into ``out_dir``; returns the summary on the writing rank."""
    settings = SamplerSettings.from_config(cfg.sample)
    found = check_inputs(cfg)
    dmeta = found["diffusion"][1]
    needs_language = settings.sampler == "edlm" and cfg.sample.energy == "oracle"
    language = synthetic_language_for(dmeta) if needs_language else None
    if needs_language and language is None:
        raise ConfigError("sample.energy=oracle needs the exact synthetic language, but the diffusion model was "
                          "trained on non-synthetic data; use energy=ar, coar or nce")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _init_runtime(cfg)
    try:
        return _sample_and_write(cfg, settings, found, language, out, ctx, proposal_parallel)
    finally:
        if ctx is not None:
            shutdown_parallel()


def _sample_and_write(cfg, settings, found, language, out, ctx, proposal_parallel) -> Optional[dict]:
    s = cfg.sample
    device = ctx.device if ctx is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dmeta = found["diffusion"][1]
    mask_id, vocab, length = int(dmeta["mask_id"]), int(dmeta["vocab_size"]), int(dmeta["seq_len"])
    dit, _, _ = load_trained_model(found["diffusion"][0], use_ema=s.use_ema, expect_kind="dit", device=device)
    energy_fn = None
    if settings.sampler == "edlm":
        models = {}
        if "ar" in found:
            models["ar_model"] = load_trained_model(found["ar"][0], use_ema=s.use_ema, expect_kind="ar",
                                                    device=device)[0]
        if "energy" in found:
            models["energy_model"] = load_trained_model(found["energy"][0], use_ema=s.use_ema,
                                                        expect_kind="energy", device=device)[0]
        energy_fn = build_energy(s.energy, mask_id=mask_id, language=language, **models)
    if settings.sampler == "mdlm":  # no proposals to share: every rank samples its own sequences
        proposal_parallel, k_for_layout = 1, 1
    else:
        k_for_layout = settings.k
    layout = sampling_layout(ctx, proposal_parallel, k_for_layout)
    denoiser = make_denoiser(dit, mask_id, vocab)
    my_batches = _batches(s.num_samples, s.batch_size, layout.data_rank, layout.data_size)
    records, ess_steps = [], []
    show = cfg.logging.progress and (ctx is None or ctx.rank == 0)
    started = time.perf_counter()
    with tqdm(total=sum(len(b) for b in my_batches), desc=f"sample {settings.sampler}", unit="seq",
              disable=not show) as bar:
        for ids in my_batches:
            tick = time.perf_counter()
            result = sample_rows(denoiser, settings, ids, length=length, mask_id=mask_id, device=device,
                                 energy_fn=energy_fn, proposals=layout.proposals)
            seconds = (time.perf_counter() - tick) / len(ids)
            tokens, ess = result.tokens.cpu(), result.row_mean_ess
            for r, index in enumerate(ids):
                records.append({"index": index, "tokens": tokens[r].tolist(), "seconds": seconds, "nfe": result.nfe,
                                "sequential_calls": result.nfe + result.energy_calls + result.prefix_calls,
                                "mean_ess": None if math.isnan(float(ess[r])) else float(ess[r])})
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
    tokenizer = load_tokenizer(dmeta)
    for record in records:
        record["text"] = tokenizer.decode(record["tokens"]) if tokenizer is not None else None
    summary = _summary(cfg, settings, found, records, ess_steps, elapsed, ctx, layout)
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


def _summary(cfg, settings, found, records, ess_steps, elapsed, ctx, layout) -> dict:
    s, edlm = cfg.sample, settings.sampler == "edlm"
    ess_values = [r["mean_ess"] for r in records if r["mean_ess"] is not None]
    summary = {
        "num_samples": len(records),
        **asdict(settings),
        "energy": s.energy if edlm else None,
        "k": settings.k if edlm else None,
        "window": settings.window if edlm else None,
        "temperature": settings.temperature if edlm else None,
        "redraw_every_step": settings.redraw_every_step if edlm else None,
        "batch_size": s.batch_size,
        "use_ema": s.use_ema,
        "checkpoints": {role: _checkpoint_record(path, meta) for role, (path, meta) in found.items()},
        "seq_len": found["diffusion"][1]["seq_len"],
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


