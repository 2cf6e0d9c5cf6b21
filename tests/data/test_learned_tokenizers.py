"""Tokenizers learnt from the training text (char, byte), the [UNK] rate prepare-data reports and refuses,
and GPT-2 loaded offline first."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edlm_dist.data.learned_tokenizers import LearnedTokenizer, learn_tokenizer
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import iter_shard_rows, load_manifest
from edlm_dist.data.tokenizers import build_tokenizer, tokenizer_from_description
from edlm_dist.errors import DataError

TRAIN = ["The Quick brown fox,\njumps over the lazy dog.", "It's 2024: naïve café — 3.14!\n\tTabs too."]
UNSEEN = "Zürich 東京 🙂 [MASK] [BOS]"


def test_char_vocabulary_is_the_training_characters_and_round_trips():
    tok = learn_tokenizer("char", iter(TRAIN))
    seen = set("".join(TRAIN))
    assert isinstance(tok, LearnedTokenizer) and tok.name == "char" and tok.unk_id == 0
    assert {tok.token(i) for i in range(1, tok.backend_size)} == seen  # exactly the characters seen, case kept
    assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (len(seen) + 1, len(seen) + 2, len(seen) + 3,
                                                                     len(seen) + 4)
    for text in TRAIN:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text and tok.unk_id not in ids
    ids = tok.encode(UNSEEN)  # one id per character; unseen ones are [UNK], "[MASK]" is just characters
    assert len(ids) == len(UNSEEN) and tok.mask_id not in ids and tok.bos_id not in ids
    assert [i == tok.unk_id for i in ids] == [c not in seen for c in UNSEEN]
    assert tok.decode([tok.bos_id] + tok.encode("fox") + [tok.mask_id, tok.eos_id]) == "[BOS]fox[MASK][EOS]"
    with pytest.raises(DataError, match="outside the char vocabulary"):
        tok.decode([tok.vocab_size])


def test_char_vocabulary_capped_to_the_most_frequent_characters():
    counts = Counter("".join(TRAIN))
    tok = learn_tokenizer("char", iter(TRAIN), vocab=5)
    kept = {tok.token(i) for i in range(1, tok.backend_size)}
    assert tok.backend_size == 6 and len(kept) == 5
    assert min(counts[c] for c in kept) >= max(counts[c] for c in counts if c not in kept)
    assert sum(i == tok.unk_id for i in tok.encode(TRAIN[0])) == sum(c not in kept for c in TRAIN[0])


@pytest.mark.parametrize("vocab", [0, 300])
def test_byte_tokenizer_spells_every_text(vocab):
    tok = learn_tokenizer("byte", iter(TRAIN * 20), vocab=vocab)
    assert tok.unk_id is None and tok.backend_size == (256 if vocab == 0 else tok.backend_size)
    assert 256 < tok.backend_size <= 300 or vocab == 0
    for text in TRAIN + [UNSEEN]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < tok.backend_size
        if vocab == 0:
            assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    if vocab:  # merges learnt from the training text shorten it
        assert len(tok.encode(TRAIN[0])) < len(TRAIN[0].encode("utf-8"))


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_learnt_tokenizers_save_and_rebuild_from_folder_and_description(kind, tmp_path):
    tok = learn_tokenizer(kind, iter(TRAIN), vocab=0)
    tok.save(tmp_path)
    described = json.loads(json.dumps(tok.describe()))  # as a manifest or checkpoint meta stores it
    for again in (build_tokenizer(str(tmp_path)), tokenizer_from_description(described)):
        assert isinstance(again, LearnedTokenizer) and again.describe() == tok.describe()
        assert again.encode(UNSEEN + TRAIN[1]) == tok.encode(UNSEEN + TRAIN[1])


def corpus(tmp_path: Path, paragraphs: list[str]) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


PARAGRAPHS = [f"Paragraph {i}: Some Text, with punctuation; and CAPITALS!" for i in range(30)]


def test_prepare_learns_char_from_train_only_and_reports_unknown_rates(tmp_path):
    text = corpus(tmp_path, PARAGRAPHS + ["Validation brings new letters: Q X é."])
    manifest = prepare_data("text", tmp_path / "out", seq_len=16, tokenizer_spec="char", input_path=text,
                            valid_docs=1, progress=False, max_unk_rate=1.0)
    tok = build_tokenizer(str(tmp_path / "out" / "tokenizer"))
    train_chars = set("".join(PARAGRAPHS))  # paragraphs are documents: no newline between them
    valid = "Validation brings new letters: Q X é."
    assert {tok.token(i) for i in range(1, tok.backend_size)} == train_chars  # nothing from validation
    unknown = sum(c not in train_chars for c in valid)
    assert manifest["unknown_tokens"]["valid"] == {"tokens": len(valid), "unknown": unknown,
                                                   "rate": unknown / len(valid)}
    assert manifest["unknown_tokens"]["train"]["unknown"] == 0
    assert tokenizer_from_description(load_manifest(tmp_path / "out")["tokenizer"]).describe() == tok.describe()
    rows = [r for s in manifest["splits"]["train"]["shards"] for r in iter_shard_rows(tmp_path / "out" / s["file"])]
    assert all(r.max() < tok.vocab_size for r in rows)


def test_text8_alphabet_on_ordinary_text_is_refused_with_the_rate(tmp_path):
    text = corpus(tmp_path, PARAGRAPHS)

    def lost(paragraph: str) -> int:  # characters outside text8's a-z and space, after lower-casing
        return sum(c.lower() not in "abcdefghijklmnopqrstuvwxyz " for c in paragraph)

    with pytest.raises(DataError, match=r"% of the train tokens .* are \[UNK\] under tokenizer 'text8'.*"
                                        r"--tokenizer char or byte.*--max-unk-rate") as info:
        prepare_data("text", tmp_path / "refused", seq_len=16, tokenizer_spec="text8", input_path=text,
                     valid_docs=2, progress=False)
    assert not (tmp_path / "refused" / "manifest.json").exists() and not list((tmp_path / "refused").rglob("*.tar"))
    assert "\n" not in str(info.value)
    manifest = prepare_data("text", tmp_path / "accepted", seq_len=16, tokenizer_spec="text8", input_path=text,
                            valid_docs=2, progress=False, max_unk_rate=1.0)
    assert manifest["unknown_tokens"]["valid"]["unknown"] == lost(PARAGRAPHS[-2]) + lost(PARAGRAPHS[-1]) > 0


def test_prepare_data_cli_prints_the_rates_and_refuses_in_one_line(tmp_path, capsys):
    from edlm_dist.cli import main

    text = corpus(tmp_path, PARAGRAPHS)
    run = ["prepare-data", "--source", "text", "--input", str(text), "--seq-len", "16", "--valid-docs", "2",
           "logging.progress=false"]
    assert main(run + ["--tokenizer", "byte", "--tokenizer-vocab", "300", "--out", str(tmp_path / "b")]) == 0
    assert "unknown tokens ([UNK]) in train: 0.000% (0 of" in capsys.readouterr().out
    assert main(run + ["--tokenizer", "text8", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "under tokenizer 'text8'" in err


def test_gpt2_is_loaded_offline_first(monkeypatch, tmp_path):
    """The bundled files come before any hub lookup; a hub name tries the local cache before the network."""
    from transformers import GPT2TokenizerFast

    from edlm_dist.data import tokenizers

    calls = []
    real = GPT2TokenizerFast.from_pretrained.__func__

    def recording(cls, source, **kwargs):
        calls.append((str(source), kwargs.get("local_files_only")))
        if not Path(source).is_dir() and not kwargs.get("local_files_only"):
            raise AssertionError("the network was tried")
        return real(cls, source, **kwargs)

    monkeypatch.setattr(GPT2TokenizerFast, "from_pretrained", classmethod(recording))
    monkeypatch.setattr(tokenizers, "_default_gpt2_cache", lambda: tmp_path / "gpt2")
    assert build_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert calls == [(str(tmp_path / "gpt2"), True)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        build_tokenizer("hf:someone/not-cached-anywhere")
    assert calls[-1] == ("someone/not-cached-anywhere", True)
