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
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from edlm_dist.data.locations import TRANSIENT_ERRORS, DataLocation, RetryPolicy, backoff, close_quietly, is_remote
from edlm_dist.data.tokenizers import Tokenizer, build_tokenizer
from edlm_dist.errors import DataError
from edlm_dist.storage.files import write_atomic, write_json_atomic

FORMAT_NAME = "edlm-dist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SAMPLE_EXT = "tokens.npy"
ROW_DTYPE = np.int32
SPLITS = ("train", "valid")


def rerun_hint(data_dir: str | Path | DataLocation) -> str:
    if is_remote(str(data_dir)):
        return f"re-run `edlm prepare-data ... --out DIR` and publish DIR again at {data_dir}"
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
    write_atomic(path, data)
    return {"file": name, "rows": int(len(rows)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _rows_once(url: str, start: int) -> Iterator[np.ndarray]:
    """Rows ``start, start+1, ...`` of one shard, opened once through WebDataset's URL layer."""
    stream = gopen(url, "rb")
    finished = False
    try:
        for index, sample in enumerate(tar_file_iterator(stream, skip_meta=None)):
            if not sample["fname"].endswith("." + SAMPLE_EXT):
                raise DataError(f"unexpected member {sample['fname']!r}")
            if index >= start:
                yield decode_row(sample["data"])
        finished = True
    finally:
        # Read to the end: a command's or curl's failure status counts (the tail may be missing).
        # Abandoned half-way: the reader's own close makes the command exit on a broken pipe.
        close_quietly(stream, raise_errors=finished)


def iter_shard_rows(url: str | Path, start: int = 0, data_dir: str | Path | None = None, *,
                    expected_rows: Optional[int] = None, retry: RetryPolicy = RetryPolicy()) -> Iterator[np.ndarray]:
    """Rows ``start, start+1, ...`` of one shard (a local path, ``pipe:`` command or URL; see :mod:`locations`).

    A local shard that is missing or corrupt raises at once. A remote one is re-opened after a failure
    (including ending before ``expected_rows`` rows) and continues at the row it had reached, up to
    ``retry.retries`` times; then a :class:`DataError` names the URL. No row is skipped or repeated.
    """
    url = str(url)
    hint = rerun_hint(data_dir if data_dir is not None else Path(url).parent.parent)
    remote, index, failures = is_remote(url), start, 0
    while True:
        try:
            for row in _rows_once(url, index):
                yield row
                index, failures = index + 1, 0
            if remote and expected_rows is not None and index < expected_rows:
                raise EOFError(f"the stream ended after {index} of {expected_rows} rows")
            return
        except DataError as err:
            raise DataError(f"shard {url} is corrupt ({err}); {hint}") from err
        except (tarfile.TarError, *TRANSIENT_ERRORS) as err:
            if isinstance(err, FileNotFoundError) and not remote:
                raise DataError(f"shard file {url} is missing; {hint}") from err
            if not remote:
                raise DataError(f"shard {url} is corrupt or truncated ({err}); {hint}") from err
            failures += 1
            backoff(url, failures, retry, err)


class ShardCursor:
    """Reads consecutive row ranges, keeping the last shard open so sequential reads do not re-skip."""

    def __init__(self, data_dir: str | Path, rows_per_file: Optional[dict[str, int]] = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.location = DataLocation(data_dir)
        self.rows_per_file = rows_per_file or {}
        self.retry = retry
        self._file: Optional[str] = None
        self._next = 0
        self._rows: Optional[Iterator[np.ndarray]] = None

    def read(self, file: str, start: int, count: int) -> list[np.ndarray]:
        if self._rows is None or file != self._file or start != self._next:
            self.close()
            self._rows = iter_shard_rows(self.location.url(file), start, self.location,
                                         expected_rows=self.rows_per_file.get(file), retry=self.retry)
            self._file = file
        out = []
        for _ in range(count):
            row = next(self._rows, None)
            if row is None:
                raise DataError(
                    f"shard {self.location.url(file)} is corrupt or truncated (fewer rows than its manifest "
                    f"says); {rerun_hint(self.location)}"
                )
            out.append(row)
        self._next = start + count
        return out

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # closes the tar stream inside the generator
        self._rows, self._file = None, None


# ------------------------------------------------------------------------------------ manifest


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write atomically (temp file + rename): a manifest only ever describes finished shards."""
    write_json_atomic(Path(data_dir) / MANIFEST, manifest, indent=2, sort_keys=True)


def load_manifest(data_dir: str | Path | DataLocation, retry: RetryPolicy = RetryPolicy()) -> dict:
    """The manifest of a prepared dataset (a folder or a URL); :class:`DataError` when it is not one."""
    location = data_dir if isinstance(data_dir, DataLocation) else DataLocation(data_dir)
    if not location.is_dir():
        raise DataError(f"data dir {location} does not exist; run `edlm prepare-data ... --out {location}` "
                        "first (or fix data.dir)")
    path = location.url(MANIFEST)
    if not location.remote and not Path(path).is_file():
        raise DataError(f"{location} has no {MANIFEST} (not prepared, or prepare-data was interrupted); "
                        f"{rerun_hint(location)}")
    try:
        manifest = json.loads(location.read_bytes(MANIFEST, retry).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is unreadable or not valid JSON ({err}); {rerun_hint(location)}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not an edlm-dist data manifest; {rerun_hint(location)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('format_version')}, this edlm-dist reads "
                        f"version {FORMAT_VERSION}; {rerun_hint(location)}")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} {problem}; {rerun_hint(location)}")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problem(manifest: dict) -> Optional[str]:
    """What is missing or malformed in a manifest (every key a reader uses), or None."""
    for key, kind in (("seq_len", int), ("vocab_size", int), ("tokenizer", dict), ("splits", dict),
                      ("source", dict)):
        if key not in manifest:
            return f"lacks the key {key!r}"
        if not (_is_int(manifest[key]) if kind is int else isinstance(manifest[key], kind)):
            return f"has a malformed {key!r} (expected {kind.__name__})"
    for key in ("name", "mask_id", "bos_id", "eos_id"):
        if key not in manifest["tokenizer"]:
            return f"lacks the key 'tokenizer.{key}'"
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"has no shard list for split {split!r} ('splits.{split}.shards')"
        for index, record in enumerate(info["shards"]):
            missing = [k for k in ("file", "rows", "bytes", "sha256") if not isinstance(record, dict) or k not in record]
            if missing:
                return f"lacks {missing[0]!r} in shard record {index} of split {split!r}"
            if not (_is_int(record["rows"]) and _is_int(record["bytes"]) and isinstance(record["file"], str)):
                return f"has a malformed shard record {index} of split {split!r}"
    return None


def has_manifest(data_dir: str | Path) -> bool:
    """True when the local folder ``data_dir`` is a finished prepared folder (its manifest is written last)."""
    return bool(str(data_dir)) and (Path(data_dir) / MANIFEST).is_file()


def saved_tokenizer(data_dir: str | Path, manifest: Optional[dict] = None) -> Tokenizer:
    """The tokenizer ``edlm prepare-data`` saved with the data (``DIR/tokenizer``)."""
    folder = (manifest or {}).get("tokenizer_dir", TOKENIZER_DIR)
    return build_tokenizer(str(Path(data_dir) / folder))


def split_shards(manifest: dict, split: str, data_dir: str | Path) -> list[dict]:
    """The shard records of ``split``; :class:`DataError` when there are none."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if not shards or sum(int(s["rows"]) for s in shards) == 0:
        raise DataError(f"the {split} split of {data_dir} has no shards (empty shard list); {rerun_hint(data_dir)} "
                        "with more input data")
    return shards


# ---------------------------------------------------------------------------------- validation


def _check_config(manifest: dict, data_dir: DataLocation, seq_len: int, vocab_size: Optional[int],
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


def _check_rows(rows: Iterator[np.ndarray], name: str, record: dict, seq_len: int, vocab_size: int,
                hint: str) -> None:
    count = 0
    for row in rows:
        if row.ndim != 1 or row.shape[0] != seq_len:
            raise DataError(f"shard {name} row {count} has shape {tuple(row.shape)}, expected ({seq_len},) "
                            f"(seq_len from the manifest); {hint}")
        if row.dtype.kind not in "iu":
            raise DataError(f"shard {name} row {count} has dtype {row.dtype}, expected integer ids; {hint}")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= vocab_size:
            raise DataError(f"shard {name} row {count} holds token id {high if high >= vocab_size else low} "
                            f"outside the vocabulary [0, {vocab_size}); {hint} with the right tokenizer")
        count += 1
    if count != int(record["rows"]):
        raise DataError(f"shard {name} is corrupt or truncated (it holds {count} readable rows, the manifest "
                        f"says {record['rows']}); {hint}")


def _check_size(name: str, size: int, record: dict, hint: str) -> None:
    if size < int(record["bytes"]):
        raise DataError(f"shard {name} is truncated ({size} of {record['bytes']} bytes); {hint}")
    if size != int(record["bytes"]):
        raise DataError(f"shard {name} has {size} bytes, the manifest says {record['bytes']} (checksum "
                        f"mismatch: the file changed after prepare-data); {hint}")


def _check_shard(location: DataLocation, record: dict, seq_len: int, vocab_size: int, check_contents: bool,
                 retry: RetryPolicy) -> None:
    hint = rerun_hint(location)
    name = location.url(record["file"])
    if location.remote:  # one download, checked like a local file
        data = location.read_bytes(record["file"], retry)
        _check_size(name, len(data), record, hint)
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DataError(f"shard {name} fails its sha256 checksum (the file changed after prepare-data); {hint}")
        try:
            rows = [decode_row(s["data"]) for s in tar_file_iterator(io.BytesIO(data), skip_meta=None)]
        except (tarfile.TarError, ValueError, EOFError) as err:
            raise DataError(f"shard {name} is corrupt or truncated ({err}); {hint}") from err
        _check_rows(iter(rows), name, record, seq_len, vocab_size, hint)
        return
    if not Path(name).is_file():
        raise DataError(f"shard file {name} is missing; {hint}")
    _check_size(name, Path(name).stat().st_size, record, hint)
    if not check_contents:
        return
    _check_rows(iter_shard_rows(name, 0, location), name, record, seq_len, vocab_size, hint)
    if sha256_file(name) != record["sha256"]:
        raise DataError(f"shard {name} fails its sha256 checksum (the file changed after prepare-data); {hint}")


def validate_dataset(
    data_dir: str | Path,
    *,
    seq_len: int,
    vocab_size: Optional[int] = None,
    tokenizer_name: Optional[str] = None,
    check_contents: bool = True,
    splits: tuple[str, ...] = SPLITS,
    retry: RetryPolicy = RetryPolicy(),
) -> dict:
    """Check a prepared dataset against the run config before training; returns the manifest.

    Always: manifest present, agreeing with ``seq_len`` / ``vocab_size`` (0 or None: not checked) /
    ``tokenizer_name`` (the tokenizer's name or the spec given to prepare-data), every split has shards.
    A local folder: every shard exists with its recorded byte size; with ``check_contents`` (reads
    everything once) tars parse, every row has length ``seq_len`` and ids in ``[0, vocab_size)``, row
    counts and sha256 match the manifest. A remote dataset (URL, ``pipe:``): the first shard of each split
    gets that full check (downloading every shard on every rank before training would cost more than the
    run's first epoch); the rest are checked as they stream (a corrupt or missing one raises then).
    """
    location = DataLocation(data_dir)
    manifest = load_manifest(location, retry)
    _check_config(manifest, location, seq_len, vocab_size, tokenizer_name)
    for split in splits:
        records = split_shards(manifest, split, location)
        for record in records[:1] if location.remote else records:
            _check_shard(location, record, int(manifest["seq_len"]), int(manifest["vocab_size"]), check_contents,
                         retry)
    return manifest
