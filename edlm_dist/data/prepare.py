"""``edlm prepare-data``: documents -> tokenized, framed rows -> WebDataset shards + manifest.

Pipeline per split (``train``, ``valid``):

1. documents from a source (:mod:`edlm_dist.data.sources`), or framed rows from the synthetic
   language (already ``[BOS] + tokens + [EOS]`` documents of length L: never wrapped);
2. tokenize as plain text (a literal special-token string is spelled, never a special id) and frame: MDLM wrapping (``wrap=True``, spec §1.2) or one document per
   row(s) (``wrap=False``), see :mod:`edlm_dist.data.wrap`. A ``char`` or ``byte`` tokenizer is first
   learnt from the training documents (:mod:`edlm_dist.data.learned_tokenizers`). Every split's share of
   ``[UNK]`` tokens is counted, printed and recorded (``manifest["unknown_tokens"]``); a split above
   ``max_unk_rate`` is refused before its shards are written (text the tokenizer cannot spell is lost);
3. rows are spilled to a temporary raw file, then written in ``shard_rows``-row tars. Training
   rows are written in a seeded random order (``shuffle_train``) so that a streaming reader's
   neighbouring rows are not neighbouring text; validation rows keep corpus order.
4. ``tokenizer/`` and finally ``manifest.json`` (see :mod:`edlm_dist.data.shards`).

All of it is written into ``OUT/.building`` and swapped in only once complete
(:func:`edlm_dist.storage.files.swap_in_entries`): with ``--overwrite`` the previous dataset stays intact
until the new one is known good (an input refused half-way, a full disk or a kill leaves it as it was).

Everything depends only on the inputs and ``seed``: two runs give byte-identical tars and manifest.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data import shards as shard_io
from edlm_dist.data import sources
from edlm_dist.data.learned_tokenizers import learn_tokenizer
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.data.tokenizers import LEARNED, build_tokenizer
from edlm_dist.data.wrap import MDLM_GROUP_SIZE, frame_documents, wrap_documents
from edlm_dist.errors import ConfigError, DataError
from edlm_dist.storage.files import output_error, remove_quietly, swap_in_entries
from edlm_dist.storage.outputs import LOCK_FILE

SOURCES = ("synthetic", "text", "jsonl", "hf", "text8", "pydoc")
SYNTHETIC_CHUNK_ROWS = 4096  # rows drawn per call: bounds memory; part of the determinism contract


def _split_seed(seed: int, split: str) -> int:
    """Independent, reproducible seeds per split (train and valid never share a random stream)."""
    return int(np.random.SeedSequence([int(seed), shard_io.SPLITS.index(split)]).generate_state(1)[0])


def _synthetic_blocks(language: Any, n_rows: int, seed: int, split: str) -> Iterator[np.ndarray]:
    generator = torch.Generator().manual_seed(_split_seed(seed, split))
    for start in range(0, n_rows, SYNTHETIC_CHUNK_ROWS):
        yield language.sample(min(SYNTHETIC_CHUNK_ROWS, n_rows - start), generator).numpy()


@dataclass
class UnknownCount:
    """Tokens and ``[UNK]`` tokens of one split, counted as the documents are encoded."""

    tokens: int = 0
    unknown: int = 0

    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def record(self) -> dict:
        return {"tokens": self.tokens, "unknown": self.unknown, "rate": self.rate()}

    def counted(self, token_lists: Iterable[list[int]], unk_id: Optional[int]) -> Iterator[list[int]]:
        for ids in token_lists:
            self.tokens += len(ids)
            if unk_id is not None:
                self.unknown += sum(1 for i in ids if i == unk_id)
            yield ids


def check_unknown_rate(count: UnknownCount, split: str, tokenizer_spec: str, max_rate: float) -> None:
    """Refuse a split whose share of ``[UNK]`` tokens exceeds ``max_rate`` (that text would be lost)."""
    if count.rate() <= max_rate:
        return
    accept = min(1.0, float(f"{count.rate():.2g}") + 0.01)
    better = ("--tokenizer byte (nothing is unknown to it; the characters missing from the training text "
              "are the [UNK]s here)" if tokenizer_spec == "char" else "--tokenizer char or byte (learnt from this text)")
    raise DataError(f"{count.rate():.2%} of the {split} tokens ({count.unknown} of {count.tokens}) are [UNK] under "
                    f"tokenizer {tokenizer_spec!r}, above data.max_unk_rate={max_rate:g}: that text would be lost; "
                    f"fix: {better}, or accept the loss with --max-unk-rate {accept:g}")


def _document_blocks(docs: Iterable[str], tokenizer: Any, *, seq_len: int, wrap: bool, group_size: int,
                     count: UnknownCount) -> Iterator[np.ndarray]:
    token_lists = count.counted((tokenizer.encode_text(text) for text in docs), getattr(tokenizer, "unk_id", None))
    if wrap:
        return wrap_documents(token_lists, seq_len=seq_len, bos_id=tokenizer.bos_id,
                              eos_id=tokenizer.eos_id, group_size=group_size)
    return frame_documents(token_lists, seq_len=seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def _spill(blocks: Iterable[np.ndarray], path: Path, seq_len: int, vocab_size: int) -> np.ndarray:
    """Write row blocks to a raw int32 file and map it back as (n, seq_len); checks id ranges."""
    n_rows = 0
    with open(path, "wb") as handle:
        for block in blocks:
            if len(block) == 0:
                continue
            if block.shape[1] != seq_len or block.min() < 0 or block.max() >= vocab_size:
                raise DataError(f"the tokenizer produced ids outside [0, {vocab_size}) or rows of the wrong "
                                "length; check --tokenizer matches the data")
            handle.write(np.ascontiguousarray(block, dtype=shard_io.ROW_DTYPE).tobytes())
            n_rows += len(block)
    if n_rows == 0:
        return np.zeros((0, seq_len), dtype=shard_io.ROW_DTYPE)
    return np.memmap(path, dtype=shard_io.ROW_DTYPE, mode="r", shape=(n_rows, seq_len))


def _write_split(out_dir: Path, split: str, rows: np.ndarray, *, shard_rows: int, order: Optional[np.ndarray],
                 progress: bool) -> dict:
    records = []
    starts = range(0, len(rows), shard_rows)
    for index, start in enumerate(tqdm(starts, desc=f"{split}: write shards", disable=not progress)):
        stop = min(start + shard_rows, len(rows))
        block = rows[order[start:stop]] if order is not None else rows[start:stop]
        records.append(shard_io.write_shard(out_dir, split, index, np.asarray(block), start))
    return {"rows": int(len(rows)), "shards": records}


@dataclass
class _Plan:
    """What to write: the tokenizer, the manifest's source record, and row blocks per split."""

    tokenizer: Any
    tokenizer_spec: str
    record: dict
    totals: dict[str, int]  # documents (or synthetic rows) per split, for messages
    make_blocks: Callable[[str], Iterator[np.ndarray]]
    unknown: dict[str, UnknownCount] = field(default_factory=dict)  # text sources only


def _synthetic_plan(cfg: Optional[SyntheticConfig], seq_len: int, tokenizer_spec: Optional[str], seed: int,
                    progress: bool) -> _Plan:
    cfg = cfg or SyntheticConfig()
    if tokenizer_spec not in ("synthetic", None, ""):
        raise ConfigError(f"source synthetic has its own vocabulary; set data.tokenizer=synthetic "
                          f"(got {tokenizer_spec!r})")
    language = SyntheticLanguage(cfg, seq_len)
    counts = {"train": cfg.train_rows, "valid": cfg.valid_rows}

    def make_blocks(split: str) -> Iterator[np.ndarray]:
        chunks = _synthetic_blocks(language, counts[split], seed, split)
        total = -(-counts[split] // SYNTHETIC_CHUNK_ROWS)
        return iter(tqdm(chunks, total=total, desc=f"{split}: sample rows", disable=not progress))

    record = {"name": "synthetic", "language": language.describe(), "config": asdict(cfg)}
    return _Plan(language.tokenizer, "synthetic", record, counts, make_blocks)


def _document_spans(source: str, *, seq_len: int, wrap: bool, input_path: Any, valid_fraction: float,
                    valid_docs: Optional[int], text_field: str, text_unit: str, hf_name: Optional[str],
                    hf_dataset: Any, hf_split: str, hf_valid_split: Optional[str],
                    text8_eval_split: str) -> tuple[dict[str, sources.DocSpan], dict]:
    """Train/valid document ranges of a text source, and the manifest's source record."""
    record: dict[str, Any] = {"name": source}
    if source == "text8":
        if input_path is None:
            raise ConfigError("source text8 needs --input pointing at the text8 file (or text8.zip)")
        chunk = seq_len if wrap else seq_len - 2  # wrap=False: one chunk = one framed row
        spans = sources.text8_splits(input_path, chunk_chars=chunk, eval_split=text8_eval_split)
        record.update(input=str(input_path), chunk_chars=chunk, eval_split=text8_eval_split, split="d3pm 90/5/5")
        return spans, record
    if source == "hf":
        given = hf_dataset if hf_dataset is not None else input_path
        docs = sources.HFDocuments(sources.load_hf_dataset(hf_name=hf_name, hf_dataset=given, split=hf_split),
                                   text_field)
        where = str(given) if isinstance(given, (str, Path)) else (hf_name or "in-memory datasets.Dataset")
        record.update(input=where, split=hf_split, valid_split=hf_valid_split, text_field=text_field)
        if hf_valid_split:
            valid = sources.HFDocuments(
                sources.load_hf_dataset(hf_name=hf_name, hf_dataset=given, split=hf_valid_split), text_field)
            spans = {"train": sources.DocSpan(docs, 0, len(docs)), "valid": sources.DocSpan(valid, 0, len(valid))}
            return spans, record
    elif source == "pydoc":
        docs = sources.PydocTopics()
        record.update(input="pydoc_data.topics", python=platform.python_version(), text_unit="paragraph")
    else:
        if input_path is None:
            raise ConfigError(f"source {source} needs --input pointing at a local file")
        docs = (sources.JsonlDocuments(input_path, text_field) if source == "jsonl"
                else sources.TextFileDocuments(input_path, text_unit))
        record.update(input=str(input_path), text_field=text_field if source == "jsonl" else None,
                      text_unit=text_unit if source == "text" else None)
    spans = sources.split_last(docs, valid_fraction=valid_fraction, valid_docs=valid_docs)
    record.update(valid_docs=len(spans["valid"]), train_docs=len(spans["train"]))
    return spans, record


def _document_plan(spans: dict[str, sources.DocSpan], record: dict, tokenizer_spec: str, *, seq_len: int,
                   wrap: bool, group_size: int, tokenizer_vocab: int, progress: bool) -> _Plan:
    totals = {s: len(spans[s]) for s in shard_io.SPLITS}
    if tokenizer_spec in LEARNED:  # fitted on the training documents only: validation text stays unseen
        docs = tqdm(spans["train"], total=totals["train"], desc=f"train: learn {tokenizer_spec} tokenizer",
                    unit=" docs", disable=not progress)
        tokenizer = learn_tokenizer(tokenizer_spec, docs, tokenizer_vocab)
    else:
        tokenizer = build_tokenizer(tokenizer_spec)
    record = {**record, "group_size": group_size if wrap else None}
    unknown = {s: UnknownCount() for s in shard_io.SPLITS}

    def make_blocks(split: str) -> Iterator[np.ndarray]:
        docs = tqdm(spans[split], total=totals[split], desc=f"{split}: tokenize", unit=" docs", disable=not progress)
        return _document_blocks(docs, tokenizer, seq_len=seq_len, wrap=wrap, group_size=group_size,
                                count=unknown[split])

    return _Plan(tokenizer, str(tokenizer_spec), record, totals, make_blocks, unknown)


PAYLOAD = (shard_io.TOKENIZER_DIR, *shard_io.SPLITS)  # a data folder's entries besides its manifest
BUILD_DIR = ".building"  # the new dataset is written here, inside --out, and swapped in once complete
OWN_ENTRIES = {*PAYLOAD, shard_io.MANIFEST, BUILD_DIR, ".replaced", LOCK_FILE}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work: a file as --out, a finished dataset without --overwrite, a folder of other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; choose a folder path")
    if (out_dir / shard_io.MANIFEST).exists() and not overwrite:
        raise DataError(f"{out_dir} already holds a prepared dataset; pass --overwrite to replace it "
                        "or choose another --out")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OWN_ENTRIES) if out_dir.is_dir() else []
    if foreign:
        raise DataError(f"--out {out_dir} holds other files ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
                        "), not a prepared dataset; choose an empty or new folder")


def prepare_data(
    source: str,
    out_dir: str | Path,
    *,
    seq_len: int,
    tokenizer_spec: str = "synthetic",
    wrap: Optional[bool] = None,
    shard_rows: int = 5000,
    seed: int = 1,
    input_path: Optional[str | Path] = None,
    valid_fraction: float = 0.05,
    valid_docs: Optional[int] = None,
    synthetic_cfg: Optional[SyntheticConfig] = None,
    text_field: str = "text",
    text_unit: str = "paragraph",
    hf_name: Optional[str] = None,
    hf_dataset: Any = None,
    hf_split: str = "train",
    hf_valid_split: Optional[str] = None,
    text8_eval_split: str = "test",
    group_size: int = MDLM_GROUP_SIZE,
    tokenizer_vocab: int = 0,
    max_unk_rate: float = 0.01,
    shuffle_train: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize, frame and shard ``source`` into ``out_dir``; returns the manifest.

    ``source``: ``synthetic`` (rows from ``SyntheticLanguage(synthetic_cfg, seq_len)``; train/valid
    row counts from the config; tokenizer must be ``synthetic``), ``text`` / ``jsonl`` (local file
    ``input_path``; paragraph/line documents; JSONL field ``text_field``), ``hf`` (``hf_dataset``:
    a ``datasets.Dataset``/``DatasetDict`` or a ``save_to_disk`` folder, also taken from
    ``input_path``; else hub name ``hf_name``), ``text8`` (local text8 file or zip).
    ``wrap``: None means the source default (False for synthetic, True otherwise); synthetic rows are
    whole documents whose exact likelihood is known, so wrapping them is refused. Train/valid:
    last ``valid_docs`` (else ``ceil(valid_fraction * n)``) documents are validation, unless
    ``hf_valid_split`` names an HF split; text8 uses the D3PM character split. ``tokenizer_spec``
    ``char``/``byte`` learns the tokenizer from the training documents (``tokenizer_vocab``: its size, 0 =
    automatic); any split with more than ``max_unk_rate`` ``[UNK]`` tokens is refused.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    if seq_len < 3 or shard_rows < 1:
        raise ConfigError(f"need seq_len >= 3 and shard_rows >= 1, got seq_len={seq_len}, shard_rows={shard_rows}")
    if wrap is None:
        wrap = source != "synthetic"
    if source == "synthetic" and wrap:
        raise ConfigError("synthetic rows are already whole [BOS]...[EOS] documents with an exact likelihood; "
                          "set data.wrap=false for source synthetic")
    if source != "synthetic" and tokenizer_spec in ("synthetic", None, ""):
        raise ConfigError(f"source {source} needs a text tokenizer; set data.tokenizer to char or byte (learnt "
                          "from the text), gpt2, text8 or a tokenizer folder")
    if valid_docs is not None and valid_docs < 1:
        raise ConfigError(f"--valid-docs must be >= 1 (got {valid_docs}): the number of final documents held out "
                          "for validation")
    if not 0.0 <= max_unk_rate <= 1.0:
        raise ConfigError(f"max_unk_rate={max_unk_rate} must be in [0, 1] (the largest accepted share of [UNK])")
    out_dir = Path(out_dir)
    if source == "synthetic":
        plan = _synthetic_plan(synthetic_cfg, seq_len, tokenizer_spec, seed, progress)
    else:
        spans, record = _document_spans(
            source, seq_len=seq_len, wrap=wrap, input_path=input_path, valid_fraction=valid_fraction,
            valid_docs=valid_docs, text_field=text_field, text_unit=text_unit, hf_name=hf_name,
            hf_dataset=hf_dataset, hf_split=hf_split, hf_valid_split=hf_valid_split,
            text8_eval_split=text8_eval_split)
        plan = _document_plan(spans, record, tokenizer_spec, seq_len=seq_len, wrap=wrap, group_size=group_size,
                              tokenizer_vocab=tokenizer_vocab, progress=progress)
    tokenizer = plan.tokenizer

    _check_out_dir(out_dir, overwrite)
    final_dir, out_dir = out_dir, out_dir / BUILD_DIR  # the old dataset stays untouched until the new one is complete
    remove_quietly(out_dir)
    out_dir.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "format": shard_io.FORMAT_NAME, "format_version": shard_io.FORMAT_VERSION, "seq_len": int(seq_len),
        "vocab_size": int(tokenizer.vocab_size), "tokenizer": tokenizer.describe(),
        "tokenizer_spec": plan.tokenizer_spec,
        "tokenizer_dir": shard_io.TOKENIZER_DIR, "source": plan.record, "wrap": bool(wrap), "seed": int(seed),
        "shard_rows": int(shard_rows), "row_dtype": np.dtype(shard_io.ROW_DTYPE).name,
        "sample_key": shard_io.SAMPLE_EXT, "shuffled_train": bool(shuffle_train), "splits": {},
    }
    spills = {split: out_dir / f".rows-{split}.tmp" for split in shard_io.SPLITS}
    try:
        rows = {}
        for split in shard_io.SPLITS:  # tokenize every split before writing any shard
            unit = "rows" if source == "synthetic" else "documents"
            rows[split] = _spill(plan.make_blocks(split), spills[split], seq_len, tokenizer.vocab_size)
            if len(rows[split]) == 0:
                raise DataError(f"the {split} split produced no rows of length {seq_len} ({plan.totals[split]} "
                                f"{unit}); use more input data or a smaller seq_len")
            if split in plan.unknown:
                check_unknown_rate(plan.unknown[split], split, plan.tokenizer_spec, max_unk_rate)
        if plan.unknown:
            manifest["unknown_tokens"] = {split: count.record() for split, count in plan.unknown.items()}
        for split in shard_io.SPLITS:
            order = None
            if split == "train" and shuffle_train:  # its own stream, not the synthetic sampler's
                order = np.random.default_rng([int(seed), 1000]).permutation(len(rows[split]))
            manifest["splits"][split] = _write_split(out_dir, split, rows[split], shard_rows=shard_rows, order=order,
                                                     progress=progress)
        del rows
        tokenizer.save(out_dir / shard_io.TOKENIZER_DIR)
        shard_io.write_manifest(out_dir, manifest)
    except OSError as exc:
        remove_quietly(out_dir)
        raise output_error(final_dir, exc, after="the previous dataset there, if any, is unchanged") from None
    except BaseException:
        remove_quietly(out_dir)  # refused input or interrupted: the previous dataset is untouched
        raise
    finally:
        for spill in spills.values():
            remove_quietly(spill)
    swap_in_entries(out_dir, final_dir, PAYLOAD, marker=shard_io.MANIFEST)
    return manifest
