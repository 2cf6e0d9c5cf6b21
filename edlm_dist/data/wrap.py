"""Turn tokenized documents into fixed-length training rows (spec §1.2, §1.3).

Two framings:

* :func:`wrap_documents` -- MDLM's ``wrap=True`` path, reproduced exactly: every document gets
  EOS appended, the documents of each group of ``group_size`` (HF ``map`` batch, 1000)
  documents are concatenated, cut into chunks of ``L - 2`` tokens, the remainder of *each group*
  is dropped, and every chunk becomes ``[BOS] + chunk + [EOS]`` (exactly ``L`` tokens). A
  document may therefore span rows, and documents inside a row are separated by EOS.
* :func:`frame_documents` -- our ``wrap=False`` path (MDLM pads/truncates with a pad token that
  our tokenizers do not have). Choice: no token is dropped. Each document is cut into pieces of at
  most ``L - 2`` tokens and each piece becomes ``[BOS] + piece + [EOS]``, right-padded with
  ``pad_id`` (default: EOS, so a short row reads ``[BOS] text [EOS] [EOS] ...``). Empty documents
  give no row.

Both yield ``int64`` numpy blocks of shape ``(n_rows, L)`` (one block per group / document) so
the caller can stream arbitrarily large corpora.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from edlm_dist.errors import ConfigError

MDLM_GROUP_SIZE = 1000  # HF datasets.map(batched=True) default batch size used by MDLM


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 3:
        raise ConfigError(
            f"seq_len={seq_len} is too short: a row holds [BOS] + at least one token + [EOS]; "
            "set data.seq_len >= 3"
        )


def _frame_chunks(tokens: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """``[BOS] + chunk + [EOS]`` for every full chunk of ``seq_len - 2`` tokens (remainder dropped)."""
    body = seq_len - 2
    n_rows = len(tokens) // body
    rows = np.empty((n_rows, seq_len), dtype=np.int64)
    rows[:, 0] = bos_id
    rows[:, -1] = eos_id
    rows[:, 1:-1] = tokens[: n_rows * body].reshape(n_rows, body)
    return rows


def wrap_group(
    docs: Sequence[Sequence[int]], *, seq_len: int, bos_id: int, eos_id: int
) -> np.ndarray:
    """Rows of one group of documents (MDLM ``group_texts`` on one map batch, spec §1.2)."""
    _check_seq_len(seq_len)
    pieces = []
    eos = np.array([eos_id], dtype=np.int64)
    for doc in docs:
        pieces.append(np.asarray(doc, dtype=np.int64))
        pieces.append(eos)  # every document ends with EOS, also inside a row
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return _frame_chunks(tokens, seq_len, bos_id, eos_id)


def wrap_documents(
    docs: Iterable[Sequence[int]],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    group_size: int = MDLM_GROUP_SIZE,
) -> Iterator[np.ndarray]:
    """MDLM wrapping (spec §1.2): one ``(n, seq_len)`` block per group of ``group_size`` documents.

    The last group may hold fewer documents; it is treated the same way (HF's last map batch).
    """
    _check_seq_len(seq_len)
    if group_size < 1:
        raise ConfigError(f"group_size={group_size} must be >= 1 (MDLM uses 1000)")
    group: list[Sequence[int]] = []
    for doc in docs:
        group.append(doc)
        if len(group) == group_size:
            yield wrap_group(group, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id)
            group = []
    if group:
        yield wrap_group(group, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id)


def frame_document(
    doc: Sequence[int], *, seq_len: int, bos_id: int, eos_id: int, pad_id: Optional[int] = None
) -> np.ndarray:
    """Rows of one document without wrapping: pieces of ``<= L-2`` tokens, framed and padded."""
    _check_seq_len(seq_len)
    pad = eos_id if pad_id is None else pad_id
    tokens = np.asarray(doc, dtype=np.int64)
    body = seq_len - 2
    n_rows = -(-len(tokens) // body)  # ceil: keep the last partial piece
    rows = np.full((n_rows, seq_len), pad, dtype=np.int64)
    rows[:, 0] = bos_id
    for i in range(n_rows):
        piece = tokens[i * body : (i + 1) * body]
        rows[i, 1 : 1 + len(piece)] = piece
        rows[i, 1 + len(piece)] = eos_id
    return rows


def frame_documents(
    docs: Iterable[Sequence[int]],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: Optional[int] = None,
) -> Iterator[np.ndarray]:
    """``wrap=False``: one block of framed rows per non-empty document (see module docstring)."""
    for doc in docs:
        if len(doc):
            yield frame_document(doc, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
