"""WebDataset shards of token rows: writing, reading, the manifest, and validation.

Layout of a prepared folder (``edlm prepare-data --out DIR``)::

    DIR/manifest.json                 written last: its presence means the folder is complete
    DIR/tokenizer/                    Tokenizer.save() files
    DIR/train/shard-000000.tar ...    ``shard_rows`` rows each (the last one may hold fewer)
    DIR/valid/shard-000000.tar ...

Each row is one WebDataset sample: key = the row's index in its split (9 digits), one member
``<key>.tokens.npy`` = the row as a 1-D ``int32`` ``.npy`` (any reader: ``np.load``; WebDataset's
default decoder also handles ``.npy``). Tars are byte-reproducible: USTAR format, mtime 0, uid/gid
0, mode 0444, members in row order. The manifest records, per split, every shard's file name,
row count, byte size and sha256, so :func:`validate_dataset` can catch missing, truncated,
corrupt or edited shards before a training run starts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from edlm_dist.errors import ConfigError, DataError

FORMAT_NAME = "edlm-dist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SAMPLE_EXT = "tokens.npy"
ROW_DTYPE = np.int32
SPLITS = ("train", "valid")


def rerun_hint(data_dir: str | Path) -> str:
    return f"re-run `edlm prepare-data ... --out {data_dir}` (add --overwrite to replace it)"


def shard_file(split: str, index: int) -> str:
    """Shard path relative to the data folder, e.g. ``train/shard-000003.tar``."""
    return f"{split}/shard-{index:06d}.tar"


def encode_row(row: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(row, dtype=ROW_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def decode_row(data: bytes) -> np.ndarray:
    """The array of one ``.npy`` member, as ``np.load`` reads it (corrupt or truncated bytes: ValueError).

    Every row of a shard has the same ``.npy`` header, so its parse (``np.load`` evaluates it with
    ``ast``: 2/3 of the read cost of a short row) is cached by the header's bytes.
    """
    if len(data) < 10 or data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # not format 1.0/2.0: np.load explains
    size_bytes = 2 if data[6] == 1 else 4  # header length: uint16 in format 1.0, uint32 in 2.0
    offset = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    dtype, shape, fortran_order = _npy_header(bytes(data[:offset]))
    if fortran_order and len(shape) > 1:
        return np.load(io.BytesIO(data), allow_pickle=False)
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f".npy member holds {len(data) - offset} data bytes, its header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    return dtype, tuple(shape), bool(fortran_order)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tar_bytes(rows: np.ndarray, first_index: int) -> bytes:
    """A reproducible tar holding ``rows`` as samples ``first_index, first_index + 1, ...``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, row in enumerate(rows):
            payload = encode_row(row)
            info = tarfile.TarInfo(f"{first_index + offset:09d}.{SAMPLE_EXT}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def write_shard(data_dir: Path, split: str, index: int, rows: np.ndarray, first_index: int) -> dict:
    """Write one shard; returns its manifest record."""
    name = shard_file(split, index)
    data = tar_bytes(rows, first_index)
    path = data_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"file": name, "rows": int(len(rows)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def iter_shard_rows(path: str | Path, start: int = 0, data_dir: str | Path | None = None) -> Iterator[np.ndarray]:
    """Rows ``start, start+1, ...`` of one shard (members before ``start`` are skipped unread)."""
    hint = rerun_hint(data_dir if data_dir is not None else Path(path).parent.parent)
    try:
        with tarfile.open(path, mode="r:") as tar:
            index = 0
            while (member := tar.next()) is not None:
                if index >= start:
                    if not member.isfile() or not member.name.endswith("." + SAMPLE_EXT):
                        raise DataError(f"shard {path} is corrupt (unexpected member {member.name!r}); {hint}")
                    yield decode_row(tar.extractfile(member).read())
                index += 1
    except FileNotFoundError as err:
        raise DataError(f"shard file {path} is missing; {hint}") from err
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DataError(f"shard {path} is corrupt or truncated ({err}); {hint}") from err


class ShardCursor:
    """Reads consecutive row ranges, keeping the last shard open so sequential reads do not re-skip."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self._file: Optional[str] = None
        self._next = 0
        self._rows: Optional[Iterator[np.ndarray]] = None

    def read(self, file: str, start: int, count: int) -> list[np.ndarray]:
        if self._rows is None or file != self._file or start != self._next:
            self.close()
            self._rows = iter_shard_rows(self.data_dir / file, start, self.data_dir)
            self._file = file
        out = []
        for _ in range(count):
            row = next(self._rows, None)
            if row is None:
                raise DataError(
                    f"shard {self.data_dir / file} is corrupt or truncated (fewer rows than its manifest "
                    f"says); {rerun_hint(self.data_dir)}"
                )
            out.append(row)
        self._next = start + count
        return out

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # closes the tar file inside the generator
        self._rows, self._file = None, None


# ------------------------------------------------------------------------------------ manifest


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write atomically (temp file + rename): a manifest only ever describes finished shards."""
    path = Path(data_dir) / MANIFEST
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder; :class:`DataError` when the folder is not one."""
    if not str(data_dir):
        raise ConfigError("data.dir is empty; run `edlm prepare-data ... --out DIR` and set data.dir=DIR")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist; run `edlm prepare-data ... --out {data_dir}` "
                        "first (or fix data.dir)")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir} has no {MANIFEST} (not prepared, or prepare-data was interrupted); "
                        f"{rerun_hint(data_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is unreadable or not valid JSON ({err}); {rerun_hint(data_dir)}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not an edlm-dist data manifest; {rerun_hint(data_dir)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('format_version')}, this edlm-dist reads "
                        f"version {FORMAT_VERSION}; {rerun_hint(data_dir)}")
    for key in ("seq_len", "vocab_size", "tokenizer", "splits"):
        if key not in manifest:
            raise DataError(f"{path} lacks the key {key!r}; {rerun_hint(data_dir)}")
    return manifest


def split_shards(manifest: dict, split: str, data_dir: str | Path) -> list[dict]:
    """The shard records of ``split``; :class:`DataError` when there are none."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if not shards or sum(int(s["rows"]) for s in shards) == 0:
        raise DataError(f"the {split} split of {data_dir} has no shards (empty shard list); {rerun_hint(data_dir)} "
                        "with more input data")
    return shards


# ---------------------------------------------------------------------------------- validation


def _check_config(manifest: dict, data_dir: Path, seq_len: int, vocab_size: Optional[int],
                  tokenizer_name: Optional[str]) -> None:
    hint = rerun_hint(data_dir)
    if int(manifest["seq_len"]) != int(seq_len):
        raise DataError(f"{data_dir} holds rows of seq_len={manifest['seq_len']} but the config asks for "
                        f"data.seq_len={seq_len}; set data.seq_len={manifest['seq_len']} or {hint} "
                        f"with seq_len={seq_len}")
    if vocab_size and int(manifest["vocab_size"]) != int(vocab_size):
        raise DataError(f"{data_dir} was tokenized with vocab_size={manifest['vocab_size']} but the config says "
                        f"data.vocab_size={vocab_size}; set data.vocab_size=0 (take it from the manifest) or {hint}")
    if tokenizer_name:
        known = {manifest["tokenizer"].get("name"), manifest.get("tokenizer_spec")}
        if tokenizer_name not in known:
            raise DataError(f"{data_dir} was tokenized with tokenizer {manifest.get('tokenizer_spec')!r} "
                            f"({manifest['tokenizer'].get('name')}) but the config says data.tokenizer="
                            f"{tokenizer_name!r}; set data.tokenizer={manifest.get('tokenizer_spec')} or {hint}")


def _check_shard(data_dir: Path, record: dict, seq_len: int, vocab_size: int, check_contents: bool) -> None:
    hint = rerun_hint(data_dir)
    path = data_dir / record["file"]
    if not path.is_file():
        raise DataError(f"shard file {path} is missing; {hint}")
    size = path.stat().st_size
    if size < int(record["bytes"]):
        raise DataError(f"shard {path} is truncated ({size} of {record['bytes']} bytes); {hint}")
    if size != int(record["bytes"]):
        raise DataError(f"shard {path} has {size} bytes, the manifest says {record['bytes']} (checksum "
                        f"mismatch: the file changed after prepare-data); {hint}")
    if not check_contents:
        return
    count = 0
    for row in iter_shard_rows(path, 0, data_dir):
        if row.ndim != 1 or row.shape[0] != seq_len:
            raise DataError(f"shard {path} row {count} has shape {tuple(row.shape)}, expected ({seq_len},) "
                            f"(seq_len from the manifest); {hint}")
        if row.dtype.kind not in "iu":
            raise DataError(f"shard {path} row {count} has dtype {row.dtype}, expected integer ids; {hint}")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= vocab_size:
            raise DataError(f"shard {path} row {count} holds token id {high if high >= vocab_size else low} "
                            f"outside the vocabulary [0, {vocab_size}); {hint} with the right tokenizer")
        count += 1
    if count != int(record["rows"]):
        raise DataError(f"shard {path} is corrupt or truncated (it holds {count} readable rows, the manifest "
                        f"says {record['rows']}); {hint}")
    if sha256_file(path) != record["sha256"]:
        raise DataError(f"shard {path} fails its sha256 checksum (the file changed after prepare-data); {hint}")


def validate_dataset(
    data_dir: str | Path,
    *,
    seq_len: int,
    vocab_size: Optional[int] = None,
    tokenizer_name: Optional[str] = None,
    check_contents: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> dict:
    """Check a prepared folder against the run config before training; returns the manifest.

    Always: folder + manifest present, manifest agrees with ``seq_len`` / ``vocab_size`` (0 or None:
    not checked) / ``tokenizer_name`` (the tokenizer's name or the spec given to prepare-data),
    every split has shards, every shard exists with its recorded byte size. With
    ``check_contents`` (reads everything once): tars parse, every row has length ``seq_len`` and
    ids in ``[0, vocab_size)``, row counts and sha256 match the manifest.
    """
    manifest = load_manifest(data_dir)  # before Path(): Path("") would read as "."
    data_dir = Path(data_dir)
    _check_config(manifest, data_dir, seq_len, vocab_size, tokenizer_name)
    for split in splits:
        for record in split_shards(manifest, split, data_dir):
            _check_shard(data_dir, record, int(manifest["seq_len"]), int(manifest["vocab_size"]), check_contents)
    return manifest
