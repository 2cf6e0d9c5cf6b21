"""Consolidated model weights: the single-folder export that sampling, eval and export-hf read.

``OUT/weights/`` holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (EMA weights,
when EMA is on) and ``meta.json`` (model kind and signature, config, tokenizer description,
step, data folder). Tensors are full (TP-gathered, vocabulary padding trimmed), so a model trained
at TP=8 loads at TP=1 and back. Written into a temporary folder and renamed, so it is never
half-written. The readers also rebuild what a model needs from its meta: the tokenizer
(:func:`tokenizer_for`) and, for synthetic data, the exact language (:func:`synthetic_language_for`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from edlm_dist.artifacts import hf_models
from edlm_dist.artifacts.readers import check_tensors_finite, guarded, load_safetensors, read_meta_json
from edlm_dist.config.load import config_from_dict, config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.shards import TOKENIZER_DIR, has_manifest, load_manifest, saved_tokenizer
from edlm_dist.data.synthetic import SyntheticLanguage, language_from_manifest
from edlm_dist.data.tokenizers import Tokenizer, tokenizer_from_description
from edlm_dist.errors import CheckpointError, EdlmError, OutputError
from edlm_dist.models.build import build_model
from edlm_dist.parallel.sharded_state import full_tensors, load_full_state_dict
from edlm_dist.storage.files import diagnose_write_failure, remove_quietly, swap_in, write_json_atomic

WEIGHTS_DIR = "weights"
META_FILE = "meta.json"
HF_EXPORT_META = "edlm_meta.json"  # the meta of an `edlm export-hf` folder (artifacts/hf_export.py)
MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"
FORMAT_VERSION = 1
META_KEYS = ("kind", "vocab_size", "seq_len", "mask_id", "config")  # what loading a model reads
REEXPORT = "re-export them from the training run (`edlm train` again on its --out writes OUT/weights)"


def export_weights(module: torch.nn.Module, out_dir: str | os.PathLike, *, ema_shadow: Optional[list] = None,
                   meta: dict[str, Any], write: bool, values: Optional[list] = None) -> Path:
    """Collective over the TP group; the rank with ``write=True`` writes ``OUT/weights``.

    ``values``: the fp32 weights to write instead of the parameters (a bf16 model's fp32 masters), in the
    order of ``module.named_parameters()``; every tensor is written in fp32, never rounded to bf16 first.
    """
    raw = full_tensors(module, values)
    ema = full_tensors(module, ema_shadow) if ema_shadow is not None else None
    target = Path(out_dir) / WEIGHTS_DIR
    if write:
        write_weights_folder(target, raw, ema, meta)
    return target


def write_weights_folder(target: Path, raw: dict, ema: Optional[dict], meta: dict[str, Any]) -> Path:
    """Write model/ema safetensors + meta.json into ``target`` atomically (temporary folder + rename)."""
    for name, state in (("weights", raw), ("EMA weights", ema or {})):
        check_tensors_finite(state, None, what=f"the {name} to export", fix="they were not written; lower train.lr")
    tmp = target.with_name(target.name + ".tmp")
    remove_quietly(tmp)
    try:
        tmp.mkdir(parents=True)
        save_file(raw, str(tmp / MODEL_FILE))
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE))
        write_json_atomic(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta})
        swap_in(tmp, target)  # the previous weights go only once the new folder is complete
    except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError, not OSError
        remove_quietly(tmp)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        elif isinstance(exc, OutputError):
            reason = str(exc).split(" (", 1)[-1].split(");")[0]
        elif isinstance(exc, EdlmError):
            raise
        else:
            reason = diagnose_write_failure(target.parent) or f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        raise CheckpointError(f"could not write weights to {target} ({reason}); free disk space or fix "
                              "permissions (the previous weights, if any, are kept)") from None
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
        return Path(path), read_meta_json(Path(path) / HF_EXPORT_META, what="export metadata", required=META_KEYS,
                                          fix="export the run again (`edlm export-hf`)")
    folder = resolve_weights_dir(path)
    meta = read_meta_json(folder / META_FILE, what="weights metadata", fix=REEXPORT, required=META_KEYS)
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"weights metadata {folder}/{META_FILE} has no valid format_version; {REEXPORT}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"weights at {folder} have format {version}, newer than this edlm-dist supports "
                              f"({FORMAT_VERSION}); upgrade edlm-dist")
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
    model = guarded(lambda: build_model(kind, cfg.model, meta["vocab_size"], meta["seq_len"], device=device),
                    what=f"{folder} records a model that cannot be built", fix=REEXPORT)
    exported = is_hf_export(folder)  # an export holds the weights it was made from (EMA unless --no-ema)
    name = "model.safetensors" if exported else weights_file(folder, use_ema)
    if exported:
        state = guarded(lambda: hf_models.edlm_module_from_export(str(folder), kind, cfg.model),
                        what=f"the export {folder} cannot be loaded", fix="export the run again (`edlm export-hf`)")
    else:
        state = load_safetensors(folder / name, what="weights file", fix=REEXPORT)
    check_tensors_finite(state, folder / name, what="the weights", fix=REEXPORT)
    guarded(lambda: load_full_state_dict(model, state), what=f"weights {folder / name} do not fit the recorded model",
            fix=REEXPORT)
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
