"""Corpus text that holds the literal strings of special tokens stays text, in every tokenizer.

Issue 19, class 7: a corpus line such as ``a <|endoftext|> b [MASK]`` must not put stray BOS/EOS/MASK/UNK
ids into the training rows. ``encode_text`` (what ``prepare-data`` uses) spells such strings with ordinary
tokens; the truth here is independent of the tokenizers' internals: the special ids each tokenizer declares
never occur, lossless tokenizers round-trip the text exactly, and in prepared rows the special ids sit only
where the framing puts them (first and last position of each framed document row).
"""

from __future__ import annotations

import numpy as np
import pytest

from edlm_dist.data.learned_tokenizers import learn_tokenizer
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import iter_shard_rows, load_manifest
from edlm_dist.data.tokenizers import TEXT8_SPECIALS, build_tokenizer, gpt2_files_from_package
from edlm_dist.errors import DataError

LITERALS = "<|endoftext|> [BOS] [EOS] [MASK] [UNK] [PAD] [CLS]"
TEXT = f"plain words {LITERALS} and more words"


def _tokenizers(tmp_path):
    corpus = [TEXT, "other training text with [brackets] and <angles>"]
    return {
        "gpt2": build_tokenizer(str(gpt2_files_from_package(tmp_path / "gpt2"))),
        "text8": build_tokenizer("text8"),
        "char": learn_tokenizer("char", corpus),
        "byte": learn_tokenizer("byte", corpus, vocab=280),
    }


def _special_ids(tok) -> set[int]:
    ids = {tok.bos_id, tok.eos_id, tok.mask_id}
    if tok.name == "text8":
        ids |= {i for i in range(len(TEXT8_SPECIALS)) if TEXT8_SPECIALS[i] != "[UNK]"}
    return ids


@pytest.mark.parametrize("name", ["gpt2", "text8", "char", "byte"])
def test_literal_special_strings_encode_as_text(tmp_path, name):
    tok = _tokenizers(tmp_path)[name]
    ids = tok.encode_text(TEXT)
    assert not set(ids) & _special_ids(tok), (name, ids)
    if name in ("gpt2", "byte", "char"):  # lossless on this text (char saw every character of it)
        assert tok.decode(ids) == TEXT
        if tok.unk_id is not None:
            assert tok.unk_id not in ids  # a literal "[UNK]" is five characters, not the unknown id
    else:  # text8: lower-case letters and spaces survive, every bracket is unknown
        letters = [tok.decode([i]) for i in ids if i != tok.unk_id]
        expected = [ch for ch in TEXT.lower() if ch in "abcdefghijklmnopqrstuvwxyz "]
        assert letters == expected
    if name in ("gpt2", "text8"):  # the HF-compatible `encode` does map them: the data pipeline must not use it
        assert set(tok.encode(TEXT)) & _special_ids(tok)


def test_synthetic_text_refuses_special_names():
    tok = build_tokenizer("synthetic", synthetic_num_tokens=8)
    assert tok.encode_text("w1 w2 w7") == [1, 2, 7]
    with pytest.raises(DataError, match="cannot spell"):
        tok.encode_text("w1 [BOS] w2")


@pytest.mark.parametrize("spec", ["gpt2", "byte"])
def test_prepared_rows_hold_specials_only_where_framed(tmp_path, spec):
    docs = [f"document {i} says {LITERALS} then stops." for i in range(12)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    tokenizer = str(gpt2_files_from_package(tmp_path / "gpt2")) if spec == "gpt2" else spec
    out = tmp_path / "data"
    prepare_data("text", out, seq_len=256, tokenizer_spec=tokenizer, input_path=corpus, wrap=False, valid_docs=2,
                 shard_rows=64, tokenizer_vocab=300 if spec == "byte" else 0, progress=False)
    manifest = load_manifest(out)
    info = manifest["tokenizer"]
    rows = np.stack([row for split in ("train", "valid") for shard in manifest["splits"][split]["shards"]
                     for row in iter_shard_rows(out / shard["file"])])
    assert len(rows) == len(docs)  # each short document is one framed row
    tok = build_tokenizer(str(out / "tokenizer"))
    for row in rows:
        body = [int(i) for i in row]
        assert body[0] == info["bos_id"]
        end = body.index(info["eos_id"], 1)  # the first EOS closes the document (GPT-2: BOS = EOS = 50256)
        inner = body[1:end]
        assert not set(inner) & {info["bos_id"], info["eos_id"], info["mask_id"]}, inner
        assert LITERALS in tok.decode(inner)
