"""Every bad input gives a one-line DataError that names the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.loader import build_train_loader
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import validate_dataset, write_shard
from edlm_dist.errors import ConfigError, DataError

CFG = SyntheticConfig(num_tokens=6, num_topics=2, train_rows=30, valid_rows=10)
FIX = "re-run `edlm prepare-data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    prepare_data("synthetic", out, seq_len=8, shard_rows=10, seed=1, synthetic_cfg=CFG, progress=False)
    return out


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    """A fresh copy that a test may damage."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def manifest_of(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def save_manifest(data: Path, manifest: dict) -> None:
    (data / "manifest.json").write_text(json.dumps(manifest))


def expect(data: Path, match: str, fix: str = FIX, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        validate_dataset(data, **{"seq_len": 8, "vocab_size": 9, **kwargs})
    message = str(info.value)
    assert "\n" not in message and fix in message, message
    return message


def test_good_dataset_passes(data):
    assert validate_dataset(data, seq_len=8, vocab_size=9, tokenizer_name="synthetic")["seq_len"] == 8


def test_missing_dir_and_missing_manifest(tmp_path, data):
    expect(tmp_path / "nope", "does not exist", fix=f"--out {tmp_path / 'nope'}")
    (data / "manifest.json").unlink()
    expect(data, "no manifest.json")
    with pytest.raises(ConfigError, match="data.dir is empty"):
        validate_dataset("", seq_len=8)


def test_empty_shard_list(data):
    manifest = manifest_of(data)
    manifest["splits"]["valid"]["shards"] = []
    save_manifest(data, manifest)
    expect(data, "valid split .* has no shards")


def test_missing_shard_file(data):
    (data / "train" / "shard-000001.tar").unlink()
    expect(data, "shard-000001.tar is missing")


def test_truncated_tar(data):
    shard = data / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    expect(data, "truncated")


@pytest.mark.parametrize("offset", [0, 1024 * 3])  # the first member's header, a later member's header
def test_corrupt_tar_header(data, offset):
    shard = data / "valid" / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[offset : offset + 512] = np.random.default_rng(0).integers(1, 255, 512, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(raw))
    expect(data, "corrupt")


def test_edited_row_fails_checksum(data):
    shard = data / "valid" / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    last = 512 + 128 + 7 * 4  # header, npy header, then the row's last int32 (EOS = 7)
    assert raw[last] == 7
    raw[last] = 6  # still a valid id and length: only the checksum can tell
    shard.write_bytes(bytes(raw))
    expect(data, "sha256 checksum")
    validate_dataset(data, seq_len=8, check_contents=False)  # the cheap check only looks at sizes


def _replace_shard(data: Path, rows: np.ndarray) -> None:
    manifest = manifest_of(data)
    manifest["splits"]["valid"]["shards"][0] = write_shard(data, "valid", 0, rows, 0)
    save_manifest(data, manifest)


def test_row_of_wrong_length(data):
    _replace_shard(data, np.full((3, 9), 1))
    expect(data, r"row 0 has shape \(9,\), expected \(8,\)")


def test_token_id_outside_vocabulary(data):
    rows = np.full((3, 8), 1)
    rows[2, 4] = 9
    _replace_shard(data, rows)
    expect(data, r"row 2 holds token id 9 outside the vocabulary \[0, 9\)")


def test_manifest_disagrees_with_config(data):
    expect(data, "seq_len=8 but the config asks for data.seq_len=16", seq_len=16)
    expect(data, "vocab_size=9 but the config says data.vocab_size=50258", vocab_size=50258)
    expect(data, "data.tokenizer='gpt2'", tokenizer_name="gpt2")


def test_loader_reports_corrupt_shard(data):
    shard = data / "train" / "shard-000000.tar"
    shard.write_bytes(b"\x01" * 700)
    loader = build_train_loader(data, micro_batch=4, seed=0, shuffle_buffer=0)
    with pytest.raises(DataError, match="corrupt"):
        for _ in zip(loader, range(20)):
            pass


def test_unreadable_input_files(tmp_path):
    common = dict(seq_len=8, tokenizer_spec="char", progress=False)
    with pytest.raises(DataError, match="cannot read input file .*missing.txt.*--input"):
        prepare_data("text", tmp_path / "o", input_path=tmp_path / "missing.txt", **common)
    with pytest.raises(DataError, match="cannot read input file"):
        prepare_data("text", tmp_path / "o", input_path=tmp_path, **common)  # a folder
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(DataError, match="cannot read input file .*binary.txt"):
        prepare_data("text", tmp_path / "o", input_path=binary, **common)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match="record 2 is not valid JSON"):
        prepare_data("jsonl", tmp_path / "o", input_path=bad_json, **common)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "fine"}\n')
    with pytest.raises(DataError, match="no string field 'text'.*--text-field"):
        prepare_data("jsonl", tmp_path / "o", input_path=no_field, **common)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_prepare_refuses_bad_settings(tmp_path, prepared):
    with pytest.raises(DataError, match="already holds a prepared dataset; pass --overwrite"):
        prepare_data("synthetic", prepared, seq_len=8, synthetic_cfg=CFG, progress=False)
    with pytest.raises(ConfigError, match="set data.wrap=false"):
        prepare_data("synthetic", tmp_path / "w", seq_len=8, wrap=True, synthetic_cfg=CFG, progress=False)
    with pytest.raises(ConfigError, match="needs a text tokenizer; set data.tokenizer"):
        prepare_data("text", tmp_path / "w", seq_len=8, input_path=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown data source"):
        prepare_data("owt", tmp_path / "w", seq_len=8, progress=False)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab\n\ncd\n")
    with pytest.raises(DataError, match="train split produced no rows of length 16"):
        prepare_data("text", tmp_path / "w", seq_len=16, tokenizer_spec="char", input_path=tiny, valid_docs=1,
                     progress=False)
