"""Sample files written by ``edlm sample``: ``samples.jsonl`` (one JSON row per sample) + ``summary.json``.

A row holds at least ``tokens`` (the sample's token ids); ``edlm sample`` also writes ``index``,
``seconds`` (wall seconds per sample of its batch), ``nfe``, ``mean_ess`` and ``text`` (decoded, or
None without a tokenizer). ``summary.json`` next to it records the sampler settings, checkpoints and
code version. Both are written atomically, the rows first, so a summary means a complete folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from edlm_dist.errors import DataError
from edlm_dist.storage.files import remove_quietly, swap_in_entries, write_atomic, write_json_atomic

SAMPLES_FILE, SUMMARY_FILE = "samples.jsonl", "summary.json"


def samples_path(folder: str | Path) -> Path:
    return Path(folder) / SAMPLES_FILE


def summary_path(folder: str | Path) -> Path:
    return Path(folder) / SUMMARY_FILE


def write_sample_folder(folder: str | Path, records: list[dict], summary: dict) -> Path:
    """Write rows and summary into ``FOLDER/.building`` first, then swap them in (the summary last: its
    presence marks a finished folder). Earlier samples there stay intact until the new ones are complete."""
    folder = Path(folder)
    built = folder / ".building"
    remove_quietly(built)
    built.mkdir(parents=True)
    try:
        write_atomic(samples_path(built), "".join(json.dumps(r) + "\n" for r in records))
        write_json_atomic(summary_path(built), summary)
    except BaseException:
        remove_quietly(built)
        raise
    swap_in_entries(built, folder, [SAMPLES_FILE], marker=SUMMARY_FILE)
    return samples_path(folder)


def read_samples_jsonl(path: str | Path) -> list[dict]:
    """The rows of a sample file; DataError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sample file {path} does not exist; pass files written by `edlm sample` in eval.samples")
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0]}); pass a JSONL file written by `edlm sample`") from None
            tokens = row.get("tokens") if isinstance(row, dict) else None
            if not isinstance(tokens, list) or not tokens or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in tokens):
                raise DataError(f"{path} line {number} has no 'tokens' list of integer ids; pass a JSONL file "
                                "written by `edlm sample`")
            if "seconds" in row and not isinstance(row["seconds"], (int, float)):
                raise DataError(f"{path} line {number} has a non-numeric 'seconds' value; fix or drop that field")
            rows.append(row)
    if not rows:
        raise DataError(f"sample file {path} holds no samples; sample again with `edlm sample`")
    return rows


def read_sample_summary(path: str | Path) -> dict:
    """The sampler settings of a sample file (``summary.json`` in its folder; {} when there is none)."""
    summary_file = summary_path(Path(path).parent)
    if not summary_file.is_file():
        return {}
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{summary_file} is not valid JSON ({exc}); re-run `edlm sample` or delete it") from None
    return summary if isinstance(summary, dict) else {}


def sampler_setting(summary: dict, key: str):
    """A setting from a summary that may be flat or nest the settings under 'sample' / 'settings'."""
    for scope in (summary, summary.get("sample"), summary.get("settings")):
        if isinstance(scope, dict) and key in scope:
            return scope[key]
    return None
