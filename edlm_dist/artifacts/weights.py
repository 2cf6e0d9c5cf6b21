"""Consolidated model weights: the single-folder export that sampling, eval and export-hf read.

``OUT/weights/`` holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights,
when EMA is on) and ``meta.json`` (model kind and signature, config, tokenizer description,
step, data folder). Tensors are full (TP-gathered, vocabulary padding trimmed), so a model trained
at TP=8 loads at TP=1 and back. Written into a temporary folder and renamed, so it is never
half-written. The readers also rebuild what a model needs from its meta: the tokenizer
(:func:`tokenizer_for`) and, for synthetic data, the exact language (:func:`synthetic_language_for`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from edlm_dist.artifacts import hf_models
from edlm_dist.config.load import config_from_dict, config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.shards import TOKENIZER_DIR, has_manifest, load_manifest, saved_tokenizer
from edlm_dist.data.synthetic import SyntheticLanguage, language_from_manifest
from edlm_dist.data.tokenizers import Tokenizer, tokenizer_from_description
from edlm_dist.errors import CheckpointError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_tensors, load_full_state_dict

WEIGHTS_DIR = "weights"
META_FILE = "meta.json"
HF_EXPORT_META = "edlm_meta.json"  # the meta of an `edlm export-hf` folder (artifacts/hf_export.py)
MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"
FORMAT_VERSION = 1


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
        save_file(raw, str(tmp / MODEL_FILE))
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE))
        (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
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
    if (path / WEIGHTS_DIR / META_FILE).is_file():
        return path / WEIGHTS_DIR
    if (path / META_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    raise CheckpointError(f"no trained weights at '{path}' (expected {path}/{WEIGHTS_DIR}/{META_FILE}); "
                          "pass the --out folder of a finished `edlm train` run")


def is_hf_export(path: str | os.PathLike) -> bool:
    """An ``edlm export-hf`` folder (``edlm_meta.json`` + HF files) rather than a weights folder."""
    return (Path(path) / HF_EXPORT_META).is_file() and not (Path(path) / META_FILE).is_file()


def read_weights_meta(path: str | os.PathLike) -> tuple[Path, dict]:
    if is_hf_export(path):  # sample and eval accept export folders too
        try:
            return Path(path), json.loads((Path(path) / HF_EXPORT_META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}/{HF_EXPORT_META} is unreadable ({exc}); export the run again") from None
    folder = resolve_weights_dir(path)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}/{META_FILE} is unreadable ({exc}); re-export the weights") from None
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"weights at {folder} have format {meta['format_version']}, newer than this "
                              f"edlm-dist supports ({FORMAT_VERSION}); upgrade edlm-dist")
    return folder, meta


def weights_file(folder: Path, use_ema: bool) -> str:
    """The file to load from a weights folder: the EMA weights when asked for and present, else the raw ones."""
    return EMA_FILE if use_ema and (folder / EMA_FILE).is_file() else MODEL_FILE


def trained_step(path: str | os.PathLike) -> Optional[int]:
    """The step of the finished weights under a run folder, or None when it holds none."""
    try:
        return read_weights_meta(path)[1].get("step")
    except CheckpointError:
        return None


def load_trained_model(path: str | os.PathLike, *, use_ema: bool = True, expect_kind: Optional[str] = None,
                       device: Optional[torch.device] = None) -> tuple[torch.nn.Module, dict, RunConfig]:
    """Build the model recorded in ``meta.json`` for the current TP group and load its weights."""
    folder, meta = read_weights_meta(path)
    kind = meta["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"'{path}' holds a '{kind}' model but a '{expect_kind}' model is needed here; "
                              "pass the run folder of the right `edlm train` objective")
    cfg = config_from_dict(meta["config"])
    model = build_model(kind, cfg.model, meta["vocab_size"], meta["seq_len"], device=device)
    exported = is_hf_export(folder)  # an export holds the weights it was made from (EMA unless --no-ema)
    name = "model.safetensors" if exported else weights_file(folder, use_ema)
    try:
        state = (hf_models.edlm_module_from_export(str(folder), kind, cfg.model) if exported
                 else load_file(str(folder / name)))
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


def tokenizer_for(meta: dict) -> Tokenizer:
    """The tokenizer of the data a model was trained on: the prepared data folder's saved copy, else
    rebuilt from the description in ``meta`` (DataError when neither works)."""
    data_dir = meta.get("data_dir")
    if data_dir and (Path(data_dir) / TOKENIZER_DIR).is_dir():
        return saved_tokenizer(data_dir)
    return tokenizer_from_description(meta.get("tokenizer") or {})


def synthetic_language_for(meta: dict) -> Optional[SyntheticLanguage]:
    """The exact synthetic language a model was trained on, or None for other data.

    Read from the manifest of the weights' data folder (the language that generated the rows); falls back
    to the run's ``data.synthetic`` config when the data folder is gone.
    """
    data_cfg = (meta.get("config") or {}).get("data") or {}
    data_dir = meta.get("data_dir") or data_cfg.get("dir")
    if data_dir and has_manifest(data_dir):
        return language_from_manifest(load_manifest(data_dir))
    if data_cfg.get("source") != "synthetic":
        return None
    recorded = {"source": {"name": "synthetic", "config": data_cfg.get("synthetic") or {}}, "seq_len": meta["seq_len"]}
    return language_from_manifest(recorded)
