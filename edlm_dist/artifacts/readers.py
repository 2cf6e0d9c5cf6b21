"""The one read path of the artifact formats: a corrupt, truncated or incomplete file is one ``error:`` line.

Every reader in :mod:`edlm_dist.artifacts` loads its secondary files through here -- checkpoint rank states
and EMA shards (``torch.load``), weights and exports (safetensors), metadata (JSON with its required keys),
and the library calls that rebuild a model from them. A file cut short by a full disk, flipped bytes, a
missing key or a tensor of the wrong shape surfaces as :class:`~edlm_dist.errors.CheckpointError` naming
the file, what was wrong and the fix, never as the library's own traceback (pickle, zip, safetensors,
KeyError, size-mismatch errors all look different and are all caught here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
from safetensors.torch import load_file

from edlm_dist.errors import CheckpointError, EdlmError
from edlm_dist.storage.files import read_json

T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}{': ' + text[:160] if text else ''}"


def guarded(call: Callable[[], T], *, what: str, fix: str) -> T:
    """``call()``, with any failure but our own one-line errors turned into ``CheckpointError(what ... fix)``."""
    try:
        return call()
    except EdlmError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files raise pickle, zip, safetensors, Key/Value/Runtime errors
        raise CheckpointError(f"{what} ({_reason(exc)}); {fix}") from None


def load_torch_file(path: str | os.PathLike, *, what: str, fix: str, required: Iterable[str] = (),
                    map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file (a checkpoint's rank state or EMA shard); missing, corrupt or lacking a key of
    ``required`` (for a dict): one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing; {fix}")
    payload = guarded(lambda: torch.load(path, map_location=map_location, weights_only=False),
                      what=f"{what} {path} is corrupt or truncated", fix=fix)
    missing = [key for key in required if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise CheckpointError(f"{what} {path} lacks {', '.join(repr(k) for k in missing)}; {fix}")
    return payload


def load_safetensors(path: str | os.PathLike, *, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file (weights, an export): missing or corrupt is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing; {fix}")
    return guarded(lambda: load_file(str(path)), what=f"{what} {path} is corrupt or truncated", fix=fix)


def read_meta_json(path: str | os.PathLike, *, what: str, fix: str, required: Iterable[str] = ()) -> dict:
    """A JSON metadata file with its ``required`` keys (dotted for nested ones)."""
    return read_json(path, what=what, fix=fix, required=required, error=CheckpointError)


def check_tensors_finite(state: dict[str, torch.Tensor], path: Optional[Path], *, what: str, fix: str) -> None:
    """Refuse weights holding NaN/Inf (a model that would sample garbage without a word)."""
    bad = [name for name, tensor in state.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        where = f" {path}" if path is not None else ""
        raise CheckpointError(f"{what}{where} hold NaN/Inf in {len(bad)} tensor(s) (first: {bad[0]}); {fix}")
