"""Tokenizers learnt from the training text with the ``tokenizers`` library, saved with the dataset.

* ``char`` -- one token per character of the training text: every character seen, or the
  ``tokenizer_vocab`` most frequent ones; any other character becomes ``[UNK]`` (id 0). Case,
  punctuation and newlines are kept, so ``decode(encode(text)) == text`` whenever no ``[UNK]`` occurs.
* ``byte`` -- byte-level: the 256 bytes (nothing is ever unknown) plus, when ``tokenizer_vocab`` > 256,
  byte-pair merges learnt from the training text up to that size (GPT-2's scheme, on your data).
  ``decode(encode(text)) == text`` for every text.

Ids: ``0 .. n-1`` are the backend tokenizer's vocabulary, then ``[BOS] = n``, ``[EOS] = n + 1``,
``[MASK] = n + 2``; the model vocabulary is ``V = n + 3``. The specials live outside the backend: a text
that contains the string ``"[MASK]"`` is encoded as its characters, never as the mask id, so a training
row never holds a special token the data did not mean. ``decode`` renders them as ``[BOS]``, ``[EOS]``,
``[MASK]``. :meth:`LearnedTokenizer.describe` carries the backend's whole JSON, so a checkpoint's meta
rebuilds the exact tokenizer even where the data folder is gone or remote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from edlm_dist.errors import DataError
from edlm_dist.storage.files import write_json_atomic, write_with

KINDS = ("char", "byte")
TOKENIZER_FILE = "edlm_tokenizer.json"  # every saved edlm tokenizer folder: {"type": ..., ...}
BACKEND_FILE = "tokenizer.json"  # the backend, as tokenizers' Tokenizer.save writes it
UNK = "[UNK]"
SPECIALS = ("[BOS]", "[EOS]", "[MASK]")
BYTES = 256


class LearnedTokenizer:
    """A ``char`` or ``byte`` tokenizer around a ``tokenizers.Tokenizer`` (see the module docstring)."""

    def __init__(self, kind: str, backend: Tokenizer):
        if kind not in KINDS:
            raise DataError(f"learnt tokenizer kind {kind!r} is unknown; use one of {KINDS}")
        self.name = kind
        self.backend = backend
        n = backend.get_vocab_size()
        self.backend_size = n
        self.bos_id, self.eos_id, self.mask_id = n, n + 1, n + 2
        self.vocab_size = n + 3
        self.unk_id = backend.token_to_id(UNK) if kind == "char" else None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: a literal ``[UNK]`` is its characters, not the unknown id (the other
        specials live outside the backend, so ``encode`` never produces them)."""
        self.backend.encode_special_tokens = True
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int]) -> str:
        pieces, run = [], []
        for i in (int(i) for i in ids):
            if 0 <= i < self.backend_size:
                run.append(i)
                continue
            if not self.backend_size <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the {self.name} vocabulary [0, {self.vocab_size}); "
                                "fix: decode ids produced for this tokenizer")
            pieces += [self.backend.decode(run, skip_special_tokens=False), SPECIALS[i - self.backend_size]]
            run = []
        pieces.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(pieces)

    def token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (a character, a byte-level piece, or a special's name)."""
        return self.backend.id_to_token(i) if i < self.backend_size else SPECIALS[i - self.backend_size]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_with(folder / BACKEND_FILE, lambda tmp: self.backend.save(str(tmp)))
        write_json_atomic(folder / TOKENIZER_FILE, {"type": self.name, "backend": BACKEND_FILE}, indent=2)

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "mask_id": self.mask_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id, "backend": self.backend.to_str()}


def _char_backend() -> Tokenizer:
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, \n too
    backend.decoder = decoders.Fuse()
    return backend


def _byte_backend() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def learn_tokenizer(kind: str, texts: Iterable[str], vocab: int = 0) -> LearnedTokenizer:
    """Fit a ``char`` or ``byte`` tokenizer on ``texts`` (the training split); ``vocab`` as in the docstring."""
    if vocab < 0:
        raise DataError(f"data.tokenizer_vocab must be >= 0, got {vocab}")
    if kind == "char":
        backend = _char_backend()
        size = vocab + 1 if vocab else 1 << 31  # + [UNK]; 0: keep every character seen
        trainer = trainers.WordLevelTrainer(vocab_size=size, min_frequency=1, special_tokens=[UNK],
                                            show_progress=False)
    elif kind == "byte":
        backend = _byte_backend()
        trainer = trainers.BpeTrainer(vocab_size=max(vocab, BYTES), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
    else:
        raise DataError(f"learnt tokenizer kind {kind!r} is unknown; use one of {KINDS}")
    backend.train_from_iterator(texts, trainer=trainer)
    if kind == "char" and backend.get_vocab_size() <= 1:
        raise DataError("the training text is empty, so no character tokenizer can be learnt from it; "
                        "check --input")
    return LearnedTokenizer(kind, backend)


def learned_from_description(info: dict) -> LearnedTokenizer:
    """Rebuild from :meth:`LearnedTokenizer.describe` (a manifest's or checkpoint meta's ``tokenizer``)."""
    try:
        return LearnedTokenizer(info["name"], Tokenizer.from_str(info["backend"]))
    except Exception as exc:  # KeyError, or the Exception type tokenizers raises on bad JSON
        raise DataError(f"the saved {info.get('name')!r} tokenizer description is unreadable ({exc}); fix: "
                        "re-run `edlm prepare-data` to rebuild it") from None


def load_learned(folder: str | Path, kind: str) -> LearnedTokenizer:
    """Load a tokenizer saved by :meth:`LearnedTokenizer.save`."""
    path = Path(folder) / BACKEND_FILE
    try:
        return LearnedTokenizer(kind, Tokenizer.from_file(str(path)))
    except Exception as exc:  # missing file or bad JSON
        raise DataError(f"cannot load the {kind} tokenizer from {path} ({exc}); fix: re-run "
                        "`edlm prepare-data` to rebuild the dataset's tokenizer/") from None
