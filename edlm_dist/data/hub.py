"""Offline first: local files before the Hugging Face hub, and no hub at all under ``HF_HUB_OFFLINE=1``.

A hub name (a tokenizer ``hf:NAME``, an ``eval.oracle`` model) is first looked up in the local HF cache
with ``local_files_only=True``, which answers at once; the network is tried only after a cache miss, and
never when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set: then the miss is an immediate error
instead of minutes of connection retries. Local folders are always read directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value: never touch the network."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def from_pretrained_offline_first(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained``: a folder directly; a hub name from the local cache, then the network.

    Raises what ``from_pretrained`` raises (``OSError`` for a miss) when nothing local has it and the hub is
    off limits or does not answer.
    """
    if Path(name_or_path).is_dir():
        return loader.from_pretrained(name_or_path, **kwargs)
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except OSError:
        if hub_offline():
            raise
    return loader.from_pretrained(name_or_path, **kwargs)
