"""Document sources for ``edlm prepare-data``: local text, JSONL, HF datasets, text8, and ``pydoc``.

Every source is a random-access list of documents (``len`` + ``iter_range(start, stop)``) so the
train/valid split is a pair of index ranges and nothing large is held in memory (text/JSONL files
are streamed twice: once to count, once to read).

Choices (the spec leaves them open):

* ``text``: one document per blank-line-separated paragraph (``text_unit="paragraph"``, lines of
  a paragraph joined by ``\\n``) or one document per non-blank line (``text_unit="line"``).
* train/valid split of text/JSONL/HF: the **last** documents are validation, like MDLM's
  OpenWebText split (``train[-100000:]``, spec §1.2): ``valid_docs`` documents when given, else
  ``ceil(valid_fraction * n)``. OpenWebText's paper split is ``source="hf", valid_docs=100000``.
  An HF dataset with its own validation split can use it instead (``hf_valid_split``).
* ``pydoc``: a real English corpus that ships with every CPython, the pydoc help topics
  (``pydoc_data.topics``: 79 topics, about 465 KB written by the Python documentation authors), as
  the paragraphs of the topics in alphabetical order. No download: the text demo runs offline.
* ``text8`` (spec §1.3): D3PM split train [0, 90M), validation [90M, 95M), test [95M, 100M) chars,
  or the same 90/5/5 proportions for a smaller file; MDLM validates on the *test* part, so
  ``valid/`` holds the test part unless ``text8_eval_split="validation"``. Each part is cut into
  chunks of ``chunk_chars`` characters, last incomplete chunk dropped.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from edlm_dist.errors import ConfigError, DataError

TEXT8_D3PM_CHARS = 100_000_000
TEXT8_BOUNDS = (90_000_000, 95_000_000)  # D3PM: train | validation | test


class Documents(Protocol):
    def __len__(self) -> int: ...

    def iter_range(self, start: int, stop: int) -> Iterator[str]: ...


@dataclass
class DocSpan:
    """Documents ``[start, stop)`` of a source: one split."""

    docs: Documents
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[str]:
        return self.docs.iter_range(self.start, self.stop)


def _unreadable(path: Path, err: BaseException) -> DataError:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return DataError(
        f"cannot read input file {path} ({reason}); pass an existing, readable UTF-8 file "
        "with --input (or data.input)"
    )


def check_readable(path: str | Path) -> Path:
    """Fail early, before any work, when ``path`` is not a readable file."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise DataError(f"cannot read input file {path} ({what}); pass an existing file with --input")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise _unreadable(path, err) from err
    return path


class TextFileDocuments:
    """Paragraphs (blank-line separated) or non-blank lines of a UTF-8 text file."""

    def __init__(self, path: str | Path, unit: str = "paragraph"):
        if unit not in ("paragraph", "line"):
            raise ConfigError(f"text_unit={unit!r} is unknown; use 'paragraph' or 'line'")
        self.path = check_readable(path)
        self.unit = unit
        self._count: Optional[int] = None

    def _lines(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as handle:
            yield from handle

    def _iter_all(self) -> Iterator[str]:
        try:
            paragraph: list[str] = []
            for line in self._lines():
                line = line.rstrip("\r\n")
                if self.unit == "line":
                    if line.strip():
                        yield line
                elif line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)
        except (OSError, UnicodeDecodeError) as err:
            raise _unreadable(self.path, err) from err

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._iter_all())
        return self._count

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        for i, doc in enumerate(self._iter_all()):
            if i >= stop:
                return
            if i >= start:
                yield doc


class JsonlDocuments(TextFileDocuments):
    """Field ``field`` of every non-blank line of a JSON-lines file."""

    def __init__(self, path: str | Path, field: str = "text"):
        super().__init__(path, unit="line")
        self.field = field

    def _iter_all(self) -> Iterator[str]:
        for number, line in enumerate(super()._iter_all(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{self.path}: record {number} is not valid JSON ({err.msg}); "
                    "fix the file (one JSON object per line)"
                ) from err
            if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
                raise DataError(
                    f"{self.path}: record {number} has no string field {self.field!r}; "
                    "set --text-field (data text field) to the field holding the text"
                )
            yield record[self.field]


class HFDocuments:
    """Column ``field`` of a ``datasets.Dataset`` (read in slices of 1000 rows)."""

    def __init__(self, dataset: Any, field: str = "text"):
        if field not in dataset.column_names:
            raise DataError(
                f"the HF dataset has no column {field!r} (columns: {dataset.column_names}); "
                "set --text-field to the text column"
            )
        self.dataset = dataset
        self.field = field

    def __len__(self) -> int:
        return len(self.dataset)

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        for lo in range(start, stop, 1000):
            yield from self.dataset[lo : min(stop, lo + 1000)][self.field]


def load_hf_dataset(
    *,
    hf_name: Optional[str] = None,
    hf_dataset: Any = None,
    split: str = "train",
) -> Any:
    """A ``datasets.Dataset``: given as an object, a ``load_from_disk`` folder, or a hub name."""
    import datasets

    if isinstance(hf_dataset, (str, Path)):
        try:
            hf_dataset = datasets.load_from_disk(str(hf_dataset))
        except (OSError, ValueError) as err:
            raise DataError(
                f"cannot load the HF dataset folder {hf_dataset} ({err}); pass a folder written "
                "by datasets' save_to_disk"
            ) from err
    elif hf_dataset is None:
        if not hf_name:
            raise ConfigError("source 'hf' needs a hub name (--hf-name) or a local dataset folder")
        try:
            hf_dataset = datasets.load_dataset(hf_name, split=split)
        except Exception as err:  # network, unknown name, missing split: one clear message
            raise DataError(
                f"cannot load HF dataset {hf_name!r} split {split!r} ({type(err).__name__}: "
                f"{err}); check the name and network, or save it with save_to_disk and pass the folder"
            ) from err
    if isinstance(hf_dataset, datasets.DatasetDict):
        if split not in hf_dataset:
            raise DataError(
                f"the HF dataset has no split {split!r} (splits: {list(hf_dataset)}); "
                "set --hf-split"
            )
        hf_dataset = hf_dataset[split]
    return hf_dataset


def split_last(docs: Documents, *, valid_fraction: float, valid_docs: Optional[int]) -> dict[str, DocSpan]:
    """Train = all but the last documents, valid = the last ones (MDLM OWT split, spec §1.2)."""
    n = len(docs)
    if valid_docs is None:
        if not 0.0 <= valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction={valid_fraction} must be in [0, 1)")
        valid_docs = math.ceil(valid_fraction * n)
    if valid_docs < 0 or valid_docs >= n:
        raise DataError(
            f"the input has {n} documents, so {valid_docs} validation documents leave no training "
            "data; use a larger input or lower valid_docs / valid_fraction"
        )
    return {"train": DocSpan(docs, 0, n - valid_docs), "valid": DocSpan(docs, n - valid_docs, n)}


class PydocTopics(TextFileDocuments):
    """Paragraphs of CPython's pydoc help topics (``pydoc_data.topics``), topics in sorted order."""

    def __init__(self):
        try:
            from pydoc_data.topics import topics
        except ImportError as err:  # some distributions split pydoc_data out
            raise DataError("this Python lacks pydoc_data (the pydoc help topics); install your distribution's "
                            "full python package, or use --source text --input FILE") from err
        self.text = "\n\n".join(topics[name] for name in sorted(topics))
        self.unit, self._count, self.path = "paragraph", None, Path("pydoc_data.topics")

    def _lines(self) -> Iterator[str]:
        return iter(self.text.splitlines(keepends=True))


class CharChunks:
    """Consecutive ``chunk_chars``-character pieces of one string (last incomplete piece dropped)."""

    def __init__(self, text: str, chunk_chars: int):
        self.text = text
        self.chunk_chars = chunk_chars

    def __len__(self) -> int:
        return len(self.text) // self.chunk_chars

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        c = self.chunk_chars
        for i in range(start, stop):
            yield self.text[i * c : (i + 1) * c]


def read_text8(path: str | Path) -> str:
    """The text8 characters from the raw file or from ``text8.zip``."""
    path = check_readable(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(archive.namelist()[0])
        else:
            data = path.read_bytes()
        return data.decode("ascii")
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile, IndexError) as err:
        raise _unreadable(path, err) from err


def text8_splits(path: str | Path, *, chunk_chars: int, eval_split: str = "test") -> dict[str, DocSpan]:
    """D3PM text8 split (spec §1.3) as chunks of ``chunk_chars`` characters."""
    if eval_split not in ("test", "validation"):
        raise ConfigError(f"text8 eval split {eval_split!r} is unknown; use 'test' or 'validation'")
    text = read_text8(path)
    n = len(text)
    if n == TEXT8_D3PM_CHARS:
        cut1, cut2 = TEXT8_BOUNDS
    else:  # a smaller (test) file: same 90 / 5 / 5 proportions
        cut1, cut2 = int(n * 0.90), int(n * 0.95)
    evaluation = text[cut2:] if eval_split == "test" else text[cut1:cut2]
    parts = {"train": CharChunks(text[:cut1], chunk_chars), "valid": CharChunks(evaluation, chunk_chars)}
    for name, chunks in parts.items():
        if len(chunks) == 0:
            raise DataError(
                f"{path} has {n} characters: its {name} part is shorter than one {chunk_chars}-char "
                "chunk; use the full text8 file or a smaller seq_len"
            )
    return {name: DocSpan(chunks, 0, len(chunks)) for name, chunks in parts.items()}
