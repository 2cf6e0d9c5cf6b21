"""Atomic, resumable training checkpoints and consolidated weight exports.

Layout under ``OUT/checkpoints``::

    step_00000100/     DeepSpeed engine state (model, ZeRO optimizer shards, LR scheduler)
                       + rank_00000.pt ... (RNG states, loader state, noise generator per rank)
                       + ema_tp00.pt ...   (EMA shadow, one per TP rank)
                       + meta.json         (format, step, config, model signature) -- written last
    latest             the tag of the newest complete checkpoint (replaced atomically)

Each save writes into ``.partial-step_...`` and is renamed only after every rank has finished,
so a kill at any moment leaves ``latest`` pointing at a complete checkpoint. The consolidated
weights that sampling, eval and export read are a different format (:mod:`edlm_dist.artifacts.weights`);
:mod:`edlm_dist.artifacts.zero_to_fp32` turns a checkpoint into one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from edlm_dist.artifacts.readers import guarded, load_torch_file, read_meta_json
from edlm_dist.config.load import config_from_dict, config_to_dict
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import CheckpointError, OutputError
from edlm_dist.parallel.collectives import any_rank
from edlm_dist.storage.files import diagnose_write_failure, remove_quietly, swap_in, write_atomic, write_json_atomic

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
META_FILE = "meta.json"
META_KEYS = ("format_version", "step", "signature", "config")
RANK_STATE_KEYS = ("step", "loader", "noise", "rng")
EARLIER = "use an earlier checkpoint (point checkpoints/latest at it) or a fresh --out"


def model_signature(cfg: RunConfig, kind: str, vocab_size: int) -> dict[str, Any]:
    m = cfg.model
    signature = {"kind": kind, "vocab_size": vocab_size, "seq_len": cfg.data.seq_len, "hidden_size": m.hidden_size,
                 "n_blocks": m.n_blocks, "n_heads": m.n_heads, "cond_dim": m.cond_dim, "mlp_ratio": m.mlp_ratio}
    if kind == "dit" and m.block_size not in (0, cfg.data.seq_len):  # MDLM signatures stay as they were
        signature["block_size"] = m.block_size
    return signature


def _accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_state() -> dict[str, Any]:
    """This rank's default generators; the device-specific ones (CUDA, Megatron's tracker, which holds CPU
    generator states under the CPU shims) are tagged with the device type they belong to."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "device_type": _accelerator()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        state["megatron"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # tracker not initialised: nothing TP-specific to restore
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> bool:
    """Restore :func:`rng_state`. The device-specific states are restored only on the device type that wrote
    them (a CPU state cannot seed a CUDA generator); returns False when they were left at this run's seeding."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("device_type", "cpu") != _accelerator():
        return False
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron" in state:
        get_cuda_rng_tracker().set_states(dict(state["megatron"]))
    return True


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True only if every rank succeeded (so all ranks agree on raising)."""
    return not any_rank(not ok)


def latest_checkpoint(out_dir: str | os.PathLike) -> Optional[Path]:
    root = Path(out_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc}); write the tag of a complete checkpoint into it "
                              "(e.g. step_00000100) or delete it to start over") from None
    path = root / tag
    if not tag or "/" in tag or tag in (".", ".."):
        raise CheckpointError(f"{pointer} holds {tag!r}, not a checkpoint tag; write the tag of a complete "
                              f"checkpoint into it (e.g. step_00000100) or delete it to start over")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{pointer} names '{tag}' but {path}/{META_FILE} is missing; "
                              f"restore the folder or delete {pointer} to start over")
    return path


def read_meta(path: Path) -> dict:
    return read_meta_json(path / META_FILE, what="checkpoint metadata", fix=EARLIER, required=META_KEYS)


def check_compatible(meta: dict, signature: dict, path: Path) -> None:
    version = meta.get("format_version", -1)
    version = version if isinstance(version, int) and not isinstance(version, bool) else -1
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this edlm-dist "
                              f"supports ({FORMAT_VERSION}); upgrade edlm-dist to load it")
    if version < 1:
        raise CheckpointError(f"checkpoint {path} has no valid format version; it was not written by edlm-dist")
    theirs = meta.get("signature") if isinstance(meta.get("signature"), dict) else {}
    diffs = [f"{k} {theirs.get(k)} vs {v}" for k, v in signature.items() if theirs.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diffs)} in the config); "
                              "use a matching config or a fresh --out")


def save_checkpoint(engine, out_dir: str | os.PathLike, step: int, *, cfg: RunConfig, signature: dict,
                    extras: dict[str, Any], ema_state: Optional[dict], tp_rank: int, dp_rank: int,
                    keep_last: int) -> Path:
    """Write a complete checkpoint for ``step`` on every rank; raise CheckpointError on failure."""
    root = Path(out_dir) / CHECKPOINT_DIR
    tag = f"step_{step:08d}"
    partial_tag = f".partial-{tag}"
    partial = root / partial_tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    error: Optional[BaseException] = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        _barrier()
        engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
        torch.save({"rng": rng_state(), **extras}, partial / f"rank_{rank:05d}.pt")
        if ema_state is not None and dp_rank == 0:
            torch.save(ema_state, partial / f"ema_tp{tp_rank:02d}.pt")
    except (OSError, RuntimeError) as exc:
        error = exc
    final = root / tag
    if _all_ok(error is None) and rank == 0:
        try:  # the last writes can fail too (disk full at META_FILE): same clear error, same cleanup
            meta = {"format_version": FORMAT_VERSION, "step": step, "signature": signature,
                    "config": config_to_dict(cfg), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "ema": ema_state is not None, "state_checked_finite": True}
            write_json_atomic(partial / META_FILE, meta)
            swap_in(partial, final)  # a complete checkpoint of this step from an earlier attempt goes only now
            write_atomic(root / LATEST, tag)
        except (OSError, OutputError) as exc:
            error = exc
    if not _all_ok(error is None):  # every rank raises together
        if rank == 0:
            remove_quietly(partial)
        previous = latest_checkpoint(out_dir)
        reason = _write_reason(error, root)
        raise CheckpointError(f"could not write checkpoint step {step} under {root} ({reason}); "
                              f"the previous checkpoint ({previous.name if previous else 'none'}) is kept; "
                              "free disk space or fix permissions, then re-run to resume")
    if rank == 0:
        _prune(root, keep_last)
    _barrier()
    return final


def _write_reason(error: Optional[BaseException], root: Path) -> str:
    if error is None:
        return "another rank failed to write"
    if isinstance(error, OSError):
        return error.strerror or str(error).splitlines()[0]
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, OutputError):
        return text.split(" (", 1)[-1].split(");")[0]
    cause = diagnose_write_failure(root)  # torch.save turns ENOSPC / EFBIG into a RuntimeError without the errno
    return f"{cause}; the writer said: {text[:120]}" if cause else text


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(".partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def load_checkpoint(engine, path: Path, *, signature: dict, tp_rank: int, dp_rank: int) -> tuple[dict, Optional[dict]]:
    """Restore engine state; return (this rank's extras, EMA state or None)."""
    meta = read_meta(path)
    check_compatible(meta, signature, path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", world) != world:
        raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world}; "
                              "resume with the same number of processes")
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_path, _ = guarded(lambda: engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                          load_lr_scheduler_states=True),
                           what=f"checkpoint {path} could not be loaded", fix=EARLIER)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {path}; {EARLIER}")
    extras = load_torch_file(path / f"rank_{rank:05d}.pt", what="checkpoint rank state", fix=EARLIER,
                             required=RANK_STATE_KEYS)
    ema_file = path / f"ema_tp{tp_rank:02d}.pt"
    ema = None
    if ema_file.is_file() or meta.get("ema", False):  # a checkpoint that had EMA must still have it
        ema = load_torch_file(ema_file, what="checkpoint EMA shard", fix=EARLIER,
                              required=("num_updates", "shadow"))
    return extras, ema


def saved_config(path: Path) -> RunConfig:
    return config_from_dict(read_meta(path)["config"])
