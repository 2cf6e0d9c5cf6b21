"""`prepare_data` end to end: manifest, checksums, determinism, and every source kind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data import sources
from edlm_dist.data.prepare import _split_seed, prepare_data
from edlm_dist.data.shards import iter_shard_rows, validate_dataset
from edlm_dist.data.synthetic import SyntheticLanguage
from edlm_dist.data.tokenizers import build_tokenizer

CFG = SyntheticConfig(num_tokens=6, num_topics=2, train_rows=45, valid_rows=12)
BOS, EOS = 2, 3  # char tokenizer (spec §1.1)


def split_rows(data_dir: Path, split: str) -> list[list[int]]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return [row.tolist() for rec in manifest["splits"][split]["shards"]
            for row in iter_shard_rows(data_dir / rec["file"])]


def chars(text: str) -> list[int]:
    """Independent char ids: a..z -> 8..33, space -> 34, anything else -> [UNK] 7."""
    return [8 + ord(c) - ord("a") if "a" <= c <= "z" else 34 if c == " " else 7 for c in text]


def test_synthetic_end_to_end(tmp_path):
    manifest = prepare_data("synthetic", tmp_path, seq_len=10, shard_rows=10, seed=4, synthetic_cfg=CFG,
                            progress=False)
    language = SyntheticLanguage(CFG, 10)
    assert manifest["seq_len"] == 10 and manifest["vocab_size"] == language.vocab_size == 9
    assert manifest["tokenizer"] == language.tokenizer.describe() and manifest["wrap"] is False
    train = manifest["splits"]["train"]
    assert [s["rows"] for s in train["shards"]] == [10, 10, 10, 10, 5] and train["rows"] == 45
    assert [s["file"] for s in train["shards"]][:2] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert [s["rows"] for s in manifest["splits"]["valid"]["shards"]] == [10, 2]
    for split in ("train", "valid"):
        for shard in manifest["splits"][split]["shards"]:
            data = (tmp_path / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert build_tokenizer(str(tmp_path / "tokenizer")).describe() == manifest["tokenizer"]
    validate_dataset(tmp_path, seq_len=10, vocab_size=9, tokenizer_name="synthetic")

    # Rows are the language's samples drawn with the documented per-split seeds:
    # valid in drawing order, train as a permutation of them.
    def drawn(split, n):
        return language.sample(n, torch.Generator().manual_seed(_split_seed(4, split))).tolist()

    assert split_rows(tmp_path, "valid") == drawn("valid", 12)
    train_rows = split_rows(tmp_path, "train")
    assert sorted(train_rows) == sorted(drawn("train", 45)) and train_rows != drawn("train", 45)
    assert all(r[0] == language.bos_id and r[-1] == language.eos_id for r in train_rows)


def test_shards_read_back_with_webdataset(tmp_path):
    prepare_data("synthetic", tmp_path, seq_len=8, shard_rows=7, seed=1, synthetic_cfg=CFG, progress=False)
    urls = sorted(str(p) for p in (tmp_path / "valid").glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]
    assert [s["tokens.npy"].tolist() for s in samples] == split_rows(tmp_path, "valid")
    assert all(s["tokens.npy"].dtype == np.int32 for s in samples)


def test_prepare_is_byte_deterministic_and_seeded(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        prepare_data("synthetic", tmp_path / name, seq_len=8, shard_rows=16, seed=seed, synthetic_cfg=CFG,
                     progress=False)
        runs[name] = {str(p.relative_to(tmp_path / name)): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*.tar")) + [tmp_path / name / "manifest.json"]}
    assert runs["a"] == runs["b"]
    assert runs["a"]["train/shard-000000.tar"] != runs["c"]["train/shard-000000.tar"]
    assert split_rows(tmp_path / "a", "valid")[0] != split_rows(tmp_path / "a", "train")[0]


def test_text_source_wraps_paragraphs_and_keeps_last_docs_for_validation(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("ab\n\ncde\nf\n\n\ngh\n\nijklmn\n")
    manifest = prepare_data("text", tmp_path / "out", seq_len=8, tokenizer_spec="text8", input_path=text,
                            valid_docs=1, shuffle_train=False, shard_rows=1, progress=False, max_unk_rate=0.2)
    # The newline is text8's only [UNK]: 1 of the train documents' 9 characters, none of valid's 6.
    assert manifest["unknown_tokens"] == {"train": {"tokens": 9, "unknown": 1, "rate": 1 / 9},
                                          "valid": {"tokens": 6, "unknown": 0, "rate": 0.0}}
    # Train docs "ab", "cde\nf", "gh" (newline -> UNK): a b E c d e UNK f E g h E -> 2 chunks of 6.
    stream = chars("ab") + [EOS] + chars("cde\nf") + [EOS] + chars("gh") + [EOS]
    assert split_rows(tmp_path / "out", "train") == [[BOS] + stream[:6] + [EOS], [BOS] + stream[6:12] + [EOS]]
    assert split_rows(tmp_path / "out", "valid") == [[BOS] + chars("ijklmn") + [EOS]]  # final EOS dropped
    lines = sources.TextFileDocuments(text, unit="line")
    assert list(lines.iter_range(0, len(lines))) == ["ab", "cde", "f", "gh", "ijklmn"]


def test_hf_dataset_and_jsonl_give_identical_shards(tmp_path):
    import datasets

    docs = ["the cat sat", "on a mat", "dogs bark loudly at night", "x", "quiet evening", "the end of it"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    common = dict(seq_len=6, tokenizer_spec="text8", text_field="body", valid_docs=2, shard_rows=4,
                  progress=False, wrap=False)
    prepare_data("jsonl", tmp_path / "j", input_path=jsonl, **common)
    prepare_data("hf", tmp_path / "h", input_path=tmp_path / "hf", **common)
    prepare_data("hf", tmp_path / "m", hf_dataset=datasets.Dataset.from_dict({"body": docs}), **common)
    for split in ("train", "valid"):
        expected = split_rows(tmp_path / "j", split)
        assert split_rows(tmp_path / "h", split) == expected and split_rows(tmp_path / "m", split) == expected
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs[:4]}),
                                 "validation": datasets.Dataset.from_dict({"body": docs[4:]})})
    prepare_data("hf", tmp_path / "d", hf_dataset=both, hf_valid_split="validation",
                 **{k: v for k, v in common.items() if k != "valid_docs"})
    assert split_rows(tmp_path / "d", "valid") == split_rows(tmp_path / "j", "valid")
    # wrap=False: every doc framed on its own, pieces of L-2 = 4 chars padded with EOS.
    valid = split_rows(tmp_path / "j", "valid")
    assert valid == [[BOS] + chars("quie") + [EOS], [BOS] + chars("t ev") + [EOS], [BOS] + chars("enin") + [EOS],
                     [BOS] + chars("g") + [EOS] * 4, [BOS] + chars("the ") + [EOS],
                     [BOS] + chars("end ") + [EOS], [BOS] + chars("of i") + [EOS], [BOS] + chars("t") + [EOS] * 4]


def test_text8_split_and_chunking(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghij ")) for _ in range(2000))
    (tmp_path / "text8").write_text(text)
    prepare_data("text8", tmp_path / "w", seq_len=16, tokenizer_spec="text8", input_path=tmp_path / "text8",
                 shuffle_train=False, progress=False)
    # 90/5/5 of 2000 chars; valid = the test part [1900, 2000): 6 chunks of 16 chars, each + EOS,
    # concatenated (102 tokens) and re-cut into 7 rows of 14 (spec §1.3).
    stream = [t for i in range(6) for t in chars(text[1900 + 16 * i: 1916 + 16 * i]) + [EOS]]
    assert split_rows(tmp_path / "w", "valid") == [[BOS] + stream[14 * i: 14 * i + 14] + [EOS] for i in range(7)]
    assert len(split_rows(tmp_path / "w", "train")) == 112 * 17 // 14  # 112 chunks of the first 1800 chars

    prepare_data("text8", tmp_path / "n", seq_len=16, tokenizer_spec="text8", input_path=tmp_path / "text8",
                 wrap=False, text8_eval_split="validation", progress=False)
    assert split_rows(tmp_path / "n", "valid") == [[BOS] + chars(text[1800 + 14 * i: 1814 + 14 * i]) + [EOS]
                                                   for i in range(100 // 14)]

    monkeypatch.setattr(sources, "TEXT8_D3PM_CHARS", 2000)  # full-size file: fixed D3PM boundaries
    monkeypatch.setattr(sources, "TEXT8_BOUNDS", (1000, 1500))
    spans = sources.text8_splits(tmp_path / "text8", chunk_chars=100, eval_split="test")
    assert len(spans["train"]) == 10 and list(spans["valid"])[0] == text[1500:1600]


def test_gpt2_rows_are_framed_by_endoftext(tmp_path):
    from edlm_dist.data.tokenizers import gpt2_files_from_package

    folder = gpt2_files_from_package(tmp_path / "gpt2")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "Hello world"}\n{"text": "Hello"}\n')
    manifest = prepare_data("jsonl", tmp_path / "out", seq_len=4, tokenizer_spec=str(folder), input_path=jsonl,
                            valid_docs=1, progress=False)
    assert manifest["vocab_size"] == 50258 and manifest["tokenizer"]["eos_id"] == 50256
    # spec §1.2: "Hello world" = 15496 995, + EOS, cut into L-2 = 2, framed by 50256 on both ends.
    assert split_rows(tmp_path / "out", "train") == [[50256, 15496, 995, 50256]]
    assert split_rows(tmp_path / "out", "valid") == [[50256, 15496, 50256, 50256]]  # "Hello" + EOS


def test_overwrite_and_interrupted_runs_leave_no_stale_shards(tmp_path):
    stale = tmp_path / "train" / "shard-000009.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an interrupted run")  # no manifest: the folder was never complete
    prepare_data("synthetic", tmp_path, seq_len=8, shard_rows=10, seed=2, synthetic_cfg=CFG, progress=False)
    assert not stale.exists() and len(list((tmp_path / "train").glob("*.tar"))) == 5
    rows = sorted(split_rows(tmp_path, "train"))
    manifest = prepare_data("synthetic", tmp_path, seq_len=8, shard_rows=20, seed=2, synthetic_cfg=CFG,
                            overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [20, 20, 5]
    assert sorted(split_rows(tmp_path, "train")) == rows
    validate_dataset(tmp_path, seq_len=8)
