"""Load a :class:`RunConfig` from YAML plus dotted ``key=value`` overrides, and validate it.

OmegaConf merges the typed schema, the YAML file and the command-line overrides, so unknown
keys and wrong types are caught by the schema itself; the errors are rewritten into one-line
:class:`ConfigError` messages. Each field's range or choices is declared in the schema and checked by
:func:`edlm_dist.config.fields.check_fields`; cross-field rules (TP divides heads, batch divisibility)
live in :func:`validate_config`; world-size rules in :func:`validate_world`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from edlm_dist.config.fields import check_fields
from edlm_dist.config.schema import METHOD_MODELS, MODEL_PRESETS, RunConfig
from edlm_dist.errors import ConfigError
from edlm_dist.storage.files import write_atomic

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


def validate_config(cfg: RunConfig) -> None:
    """Every field against its declared range / choices (:mod:`edlm_dist.config.fields`), then the
    cross-field rules that one field's rule cannot express."""
    check_fields(cfg)
    m, p, t, s, d = cfg.model, cfg.parallel, cfg.train, cfg.sample, cfg.data
    _check(m.hidden_size % m.n_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.n_heads={m.n_heads}; pick sizes with an integer head dim")
    _check((m.hidden_size // m.n_heads) % 2 == 0, "the head dim (hidden_size / n_heads) must be even for rotary embeddings")
    _check(m.n_heads % p.tp == 0,
           f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; choose tp among the divisors of the head count")
    # tp | n_heads and n_heads | hidden_size already imply tp | hidden_size (and tp | 4*hidden_size).
    _check(t.global_batch % t.micro_batch == 0,
           f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    _check(d.synthetic.branching <= d.synthetic.num_tokens, f"data.synthetic.branching={d.synthetic.branching} exceeds "
           f"data.synthetic.num_tokens={d.synthetic.num_tokens}; allow at most that many next tokens")
    _check(t.sampling_eps < t.sampling_eps_max,
           f"need train.sampling_eps < train.sampling_eps_max (got {t.sampling_eps}, {t.sampling_eps_max})")
    _check(m.block_size <= d.seq_len and (m.block_size == 0 or d.seq_len % m.block_size == 0),
           f"model.block_size={m.block_size} must divide data.seq_len={d.seq_len} (0 = seq_len: MDLM)")
    _check(m.block_size in (0, d.seq_len) or not m.time_conditioning,
           "model.block_size < seq_len needs model.time_conditioning=false (every block has its own noise level)")
    _check(s.block_size <= d.seq_len, f"sample.block_size={s.block_size} exceeds the row length data.seq_len="
           f"{d.seq_len}; use 0 (one block) or a size <= {d.seq_len}")
    _check(not s.block_lookahead or (s.sampler == "edlm" and s.block_size > 0),
           "sample.block_lookahead=true needs sample.sampler=edlm and sample.block_size > 0 (block-wise EDLM with a "
           "block-causal denoiser); set it to false otherwise")
    _check(s.length != 1, "sample.length must be 0 (the model's L) or >= 2 (got 1): a row holds at least BOS and EOS")
    _check(s.sampler == "ar" or (s.top_k == 0 and s.top_p == 1.0),
           "sample.top_k / sample.top_p apply to sample.sampler=ar only; reset them or use the AR sampler")
    for method in cfg.pipeline.methods:
        for model in METHOD_MODELS[method]:
            steps = getattr(cfg.pipeline, f"{model}_steps")
            _check(steps >= 1, f"pipeline.{model}_steps=0 but pipeline.methods has {method}, which needs the "
                   f"{model} model; train it (pipeline.{model}_steps >= 1) or drop {method}")
    pb = cfg.pipeline.block_size
    _check(pb == 0 or (pb < d.seq_len and d.seq_len % pb == 0),
           f"pipeline.block_size={pb} must be 0 (no block-causal model) or a divisor of data.seq_len={d.seq_len} below it")
    _check(pb == 0 or cfg.pipeline.ar_steps >= 1, f"pipeline.block_size={pb} samples block-edlm-ar, which needs the ar "
           "model; train it (pipeline.ar_steps >= 1) or set pipeline.block_size=0")
    _check(cfg.pipeline.prompt_tokens < d.seq_len, f"pipeline.prompt_tokens={cfg.pipeline.prompt_tokens} leaves "
           f"nothing to generate in rows of data.seq_len={d.seq_len}; use fewer")
    _validate_slurm(cfg.slurm)


def _validate_slurm(s) -> None:
    """What the field ranges cannot say: how processes per node follow from GPUs per node."""
    _check(s.tasks >= 1, "slurm.gpus_per_node=0 (CPU nodes) needs slurm.tasks_per_node >= 1 processes per node")
    _check(s.gpus_per_node == 0 or s.tasks == s.gpus_per_node,
           f"slurm.tasks_per_node={s.tasks_per_node} with slurm.gpus_per_node={s.gpus_per_node}: one process drives "
           "one GPU; set tasks_per_node=0 (or equal to gpus_per_node)")


def validate_world(cfg: RunConfig, world_size: int, *, training: bool = True) -> int:
    """Check tp*dp*pp == world size (and, for training, the batch split); return the DP degree."""
    p = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"a launch of {world_size} processes has nothing to run; request at least one process "
                          "(slurm.nodes x slurm.gpus_per_node >= 1)")
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
    return write_atomic(out / CONFIG_FILENAME, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
