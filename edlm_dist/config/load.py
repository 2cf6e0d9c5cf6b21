"""Load a :class:`RunConfig` from YAML plus dotted ``key=value`` overrides, and validate it.

OmegaConf merges the typed schema, the YAML file and the command-line overrides, so unknown
keys and wrong types are caught by the schema itself; the errors are rewritten into one-line
:class:`ConfigError` messages. Cross-field rules (TP divides heads, batch divisibility, value
ranges) live in :func:`validate_config`; world-size rules in :func:`validate_world`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from edlm_dist.config.schema import MODEL_PRESETS, RunConfig, window_interval
from edlm_dist.errors import ConfigError

CONFIG_FILENAME = "config.yaml"


def _valid_keys(node: Any, prefix: str) -> str:
    names = [f.name for f in fields(node)] if is_dataclass(node) else []
    return ", ".join(names) if names else "(none)"


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    text = str(exc).splitlines()[0]
    if "Key '" in text and ("not in" in text or "not found" in text):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node: Any = RunConfig()
        for part in parent.split(".") if parent else []:
            node = getattr(node, part, None)
        return ConfigError(
            f"unknown config key '{key}' in {source}; valid keys{' under ' + parent if parent else ''}: "
            f"{_valid_keys(node, parent)}"
        )
    if "Value '" in text or "type" in text.lower():
        return ConfigError(f"wrong type for config key '{key}' in {source}: {text}")
    return ConfigError(f"invalid config in {source} at '{key}': {text}")


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Build the validated config from an optional YAML file and ``a.b=c`` overrides."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, train: ...)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(raw))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
    dotlist = list(overrides)
    for item in dotlist:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command-line overrides" if dotlist else str(path)) from None
    apply_presets(cfg)
    validate_config(cfg)
    return cfg


def apply_presets(cfg: RunConfig) -> None:
    preset = cfg.model.preset
    if preset is None:
        return
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset '{preset}' is unknown; use one of {sorted(MODEL_PRESETS)} or null")
    for key, value in MODEL_PRESETS[preset].items():
        setattr(cfg.model, key, value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(value: str, allowed: Iterable[str], key: str) -> None:
    allowed = list(allowed)
    _check(value in allowed, f"{key}='{value}' is not valid; use one of {allowed}")


def validate_config(cfg: RunConfig) -> None:
    """Cross-field checks that the schema's types cannot express."""
    m, p, t, s, d = cfg.model, cfg.parallel, cfg.train, cfg.sample, cfg.data
    for key in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio"):
        _check(getattr(m, key) >= 1, f"model.{key} must be >= 1 (got {getattr(m, key)})")
    _check(m.hidden_size % m.n_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.n_heads={m.n_heads}; pick sizes with an integer head dim")
    _check((m.hidden_size // m.n_heads) % 2 == 0, "the head dim (hidden_size / n_heads) must be even for rotary embeddings")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1) (got {m.dropout})")
    _check(p.tp >= 1 and p.pp >= 1 and p.dp >= 0, "parallel.tp and parallel.pp must be >= 1, parallel.dp >= 0 (0 = auto)")
    _check(p.pp == 1, "parallel.pp > 1 (pipeline parallelism) is not supported; use tensor and data parallelism")
    _check(m.n_heads % p.tp == 0,
           f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; choose tp among the divisors of the head count")
    # tp | n_heads and n_heads | hidden_size already imply tp | hidden_size (and tp | 4*hidden_size).
    _one_of(p.backend, ["auto", "gloo", "nccl"], "parallel.backend")
    _check(p.timeout_s >= 1, "parallel.timeout_s must be >= 1")
    _check(d.seq_len >= 4, f"data.seq_len must be >= 4 (got {d.seq_len})")
    _one_of(d.source, ["synthetic", "text", "jsonl", "hf", "text8", "pydoc"], "data.source")
    _check(d.tokenizer_vocab >= 0, f"data.tokenizer_vocab must be >= 0 (got {d.tokenizer_vocab}; 0 = automatic)")
    _check(0.0 <= d.max_unk_rate <= 1.0, f"data.max_unk_rate must be in [0, 1] (got {d.max_unk_rate})")
    _check(d.read_retries >= 0 and d.retry_delay_s >= 0,
           f"data.read_retries and data.retry_delay_s must be >= 0 (got {d.read_retries}, {d.retry_delay_s})")
    _one_of(t.objective, ["mdlm", "ar", "nce"], "train.objective")
    _one_of(t.lr_schedule, ["constant", "cosine"], "train.lr_schedule")
    _one_of(t.precision, ["auto", "fp32", "bf16"], "train.precision")
    _one_of(t.negatives_dtype, ["float64", "float32", "bfloat16"], "train.negatives_dtype")
    _check(t.steps >= 1, f"train.steps must be >= 1 (got {t.steps})")
    _check(t.micro_batch >= 1 and t.global_batch >= 1, "train.global_batch and train.micro_batch must be >= 1")
    _check(t.global_batch % t.micro_batch == 0,
           f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    _check(t.lr > 0, "train.lr must be > 0")
    _check(0.0 <= t.ema < 1.0, f"train.ema must be in [0, 1) (0 disables EMA; got {t.ema})")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3 (got {t.zero_stage})")
    _check(0.0 < t.sampling_eps < 1.0, "train.sampling_eps must be in (0, 1)")
    _check(t.n_negatives >= 1, f"train.n_negatives must be >= 1 (got {t.n_negatives})")
    _check(t.keep_last >= 1, "train.keep_last must be >= 1")
    for key in ("log_every", "val_every", "save_every"):
        _check(getattr(t, key) >= 1, f"train.{key} must be >= 1")
    _one_of(s.sampler, ["mdlm", "edlm", "ar"], "sample.sampler")
    _one_of(s.update, ["ddpm", "ddpm_cache"], "sample.update")
    _one_of(s.energy, ["ar", "coar", "nce", "oracle"], "sample.energy")
    _one_of(s.precision, ["float64", "float32", "bfloat16"], "sample.precision")
    _check(s.steps >= 1, f"sample.steps must be >= 1 (got {s.steps})")
    _check(s.k >= 1, f"sample.k must be >= 1 (got {s.k}): it is the number of importance-sampling proposals")
    try:
        window_interval(s.window, "sample.window")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _one_of(s.block_proposal, ["denoiser", "ar_first"], "sample.block_proposal")
    _check(s.block_size >= 0, f"sample.block_size must be >= 0 (got {s.block_size}); 0 means one block of the "
           "whole row")
    _check(s.block_size <= d.seq_len, f"sample.block_size={s.block_size} exceeds the row length data.seq_len="
           f"{d.seq_len}; use 0 (one block) or a size <= {d.seq_len}")
    _check(s.proposal_parallel >= 0, "sample.proposal_parallel must be >= 0 (0 = auto)")
    _check(s.temperature > 0, f"sample.temperature must be > 0 (got {s.temperature})")
    _check(s.num_samples >= 1 and s.batch_size >= 1, "sample.num_samples and sample.batch_size must be >= 1")
    _check(s.top_k >= 0, f"sample.top_k must be >= 0 (got {s.top_k}); 0 keeps every token")
    _check(0.0 < s.top_p <= 1.0, f"sample.top_p must be in (0, 1] (got {s.top_p}); 1 keeps every token")
    _check(s.sampler == "ar" or (s.top_k == 0 and s.top_p == 1.0),
           "sample.top_k / sample.top_p apply to sample.sampler=ar only; reset them or use the AR sampler")
    for metric in cfg.eval.metrics:
        _one_of(metric, ["ppl", "genppl", "entropy"], "eval.metrics entry")
    _check(cfg.eval.n_negatives >= 1, "eval.n_negatives must be >= 1")
    _one_of(cfg.logging.wandb_mode, ["disabled", "offline", "online"], "logging.wandb_mode")
    _check(all(n >= 1 for n in cfg.pipeline.step_counts), "pipeline.step_counts must all be >= 1")
    for method in cfg.pipeline.methods:
        _one_of(method, ["mdlm", "edlm-ar", "edlm-coar", "edlm-nce", "edlm-oracle"], "pipeline.methods entry")
    _check(1 <= cfg.eval.judge_order <= 10, f"eval.judge_order must be in [1, 10] (got {cfg.eval.judge_order})")


def validate_world(cfg: RunConfig, world_size: int, *, training: bool = True) -> int:
    """Check tp*dp*pp == world size (and, for training, the batch split); return the DP degree."""
    p = cfg.parallel
    if world_size % (p.tp * p.pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp={p.tp * p.pp}; launch a multiple of tp processes"
        )
    dp = world_size // (p.tp * p.pp)
    if p.dp not in (0, dp):
        raise ConfigError(
            f"parallel.tp={p.tp} x dp={p.dp} x pp={p.pp} = {p.tp * p.dp * p.pp} != world size {world_size}; "
            f"set parallel.dp={dp} or 0 (auto)"
        )
    per_step = cfg.train.micro_batch * dp
    if training and cfg.train.global_batch % per_step != 0:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not a multiple of micro_batch*dp={per_step}; "
            "adjust global_batch or micro_batch"
        )
    return dp


def config_to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a config saved by :func:`save_config` (checkpoints, exports)."""
    try:
        cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "a saved config") from None
    return cfg


def save_config(cfg: RunConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config next to a run's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILENAME
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
