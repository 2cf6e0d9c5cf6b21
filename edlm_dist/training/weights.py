"""Consolidated model weights: the single-folder export that sampling, eval and export-hf read.

``OUT/weights/`` holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights,
when EMA is on) and ``meta.json`` (model kind and signature, config, tokenizer description,
step). Tensors are full (TP-gathered, vocabulary padding trimmed), so a model trained at TP=8
loads at TP=1 and back. Written into a temporary folder and renamed, so it is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from edlm_dist.config.load import config_from_dict, config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import CheckpointError

WEIGHTS_DIR = "weights"
FORMAT_VERSION = 1


def gathered_parameters(module: torch.nn.Module, modifier_rank=None):
    """Full parameters inside the context under ZeRO-3 (a no-op otherwise).

    With ``modifier_rank`` set, that rank's in-place changes are kept when the context exits.
    """
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitions parameters
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def full_tensors(module: torch.nn.Module, local: Optional[list[torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Full tensors of ``module``'s parameters, or of ``local`` (same order, e.g. an EMA shadow)."""
    from edlm_dist.models.layers import gather_full_tensor

    out = {}
    with gathered_parameters(module):
        for i, (name, param) in enumerate(module.named_parameters()):
            value = param.detach() if local is None else local[i]
            out[name] = gather_full_tensor(param, value.to(param.dtype), None).float().cpu().contiguous()
    return out


def export_weights(module: torch.nn.Module, out_dir: str | os.PathLike, *, ema_shadow: Optional[list] = None,
                   meta: dict[str, Any], write: bool) -> Path:
    """Collective over the TP group; the rank with ``write=True`` writes ``OUT/weights``."""
    raw = full_tensors(module)
    ema = full_tensors(module, ema_shadow) if ema_shadow is not None else None
    target = Path(out_dir) / WEIGHTS_DIR
    if write:
        write_weights_folder(target, raw, ema, meta)
    return target


def write_weights_folder(target: Path, raw: dict, ema: Optional[dict], meta: dict[str, Any]) -> Path:
    """Write model/ema safetensors + meta.json into ``target`` atomically (temporary folder + rename)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(raw, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(ema, str(tmp / "ema.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write weights to {target} ({exc}); free disk space or fix permissions")
    return target


def resolve_weights_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory (``OUT``) or its ``OUT/weights`` folder."""
    path = Path(path)
    if (path / WEIGHTS_DIR / "meta.json").is_file():
        return path / WEIGHTS_DIR
    if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(f"no trained weights at '{path}' (expected {path}/{WEIGHTS_DIR}/meta.json); "
                          "pass the --out folder of a finished `edlm train` run")


def read_weights_meta(path: str | os.PathLike) -> tuple[Path, dict]:
    folder = resolve_weights_dir(path)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}/meta.json is unreadable ({exc}); re-export the weights") from None
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"weights at {folder} have format {meta['format_version']}, newer than this "
                              f"edlm-dist supports ({FORMAT_VERSION}); upgrade edlm-dist")
    return folder, meta


def load_trained_model(path: str | os.PathLike, *, use_ema: bool = True, expect_kind: Optional[str] = None,
                       device: Optional[torch.device] = None) -> tuple[torch.nn.Module, dict, RunConfig]:
    """Build the model recorded in ``meta.json`` for the current TP group and load its weights."""
    from edlm_dist.models.build import build_model
    from edlm_dist.models.layers import load_full_state_dict

    folder, meta = read_weights_meta(path)
    kind = meta["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"'{path}' holds a '{kind}' model but a '{expect_kind}' model is needed here; "
                              "pass the run folder of the right `edlm train` objective")
    cfg = config_from_dict(meta["config"])
    model = build_model(kind, cfg.model, meta["vocab_size"], meta["seq_len"], device=device)
    name = "ema.safetensors" if use_ema and (folder / "ema.safetensors").is_file() else "model.safetensors"
    try:
        state = load_file(str(folder / name))
        load_full_state_dict(model, state)
    except (OSError, ValueError, RuntimeError, CheckpointError) as exc:
        raise CheckpointError(f"weights {folder / name} do not fit the recorded model ({str(exc).splitlines()[0]}); "
                              "re-export them from the training run") from None
    model.eval()
    return model, meta, cfg


def weights_meta(cfg: RunConfig, *, kind: str, vocab_size: int, step: int, tokenizer: dict,
                 extra: Optional[dict] = None) -> dict:
    return {"kind": kind, "vocab_size": vocab_size, "seq_len": cfg.data.seq_len, "step": step,
            "mask_id": tokenizer.get("mask_id"), "tokenizer": tokenizer, "config": config_to_dict(cfg),
            **(extra or {})}
