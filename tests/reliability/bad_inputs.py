"""Bad-input scenarios: each is refused before any work starts with one line naming the fix.

Most go through the real ``edlm`` command (forked, see harness.py; three in a fresh interpreter
with ``python -m edlm_dist.cli``) and must give exit status 2, exactly one ``error: ...`` line,
no traceback, and leave the files they were pointed at unchanged. A few library-level guards
are called in-process and must raise the right :class:`~edlm_dist.errors.EdlmError` subclass.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edlm_dist.errors import ConfigError, DataError, SamplingError
from tests.reliability.harness import (
    TRAIN_STEPS,
    Observation,
    Scenario,
    Workspace,
    clip,
    free_port,
    run_cli,
    run_cli_subprocess,
    snapshot,
)

Build = Callable[[Workspace, Path], list[str]]


def cli_refusal(name: str, action: str, problem: str, fix: str, build: Build, *, subprocess: bool = False,
                env: Optional[Callable[[], dict[str, str]]] = None, may_rewrite: tuple[str, ...] = ()) -> Scenario:
    """``edlm ARGV`` on a prepared bad input must exit 2 with one ``error:`` line matching ``problem``
    and containing ``fix``; no file under the case folder may change (except ``may_rewrite``)."""
    expected = f"exit 2, one line `error: ...` matching /{problem}/ that names the fix '{fix}'; nothing written"
    if may_rewrite:
        expected += f" (except {', '.join(may_rewrite)}, rewritten with the refused config)"

    def run(ws: Workspace) -> Observation:
        case = ws.fresh(name)
        case.mkdir(parents=True)
        argv = build(ws, case)
        before = snapshot(case)
        result = run_cli_subprocess(argv) if subprocess else run_cli(argv, ws.logs, env=env() if env else None)
        after = snapshot(case)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        rewritten = [k for k in changed if Path(k).name in may_rewrite]
        changed = [k for k in changed if k not in rewritten]
        line = result.error_lines[0] if len(result.error_lines) == 1 else ""
        ok = (result.exit_code == 2 and bool(line) and not result.has_traceback and re.search(problem, line) is not None
              and fix in line and not changed)
        seen = ("`python -m edlm_dist.cli` " if subprocess else "") + result.describe(240)
        if changed:
            seen += f"; but it wrote {changed[:3]}"
        if rewritten:
            seen += f" (note: it rewrote {rewritten})"
        return Observation(seen, ok)

    return Scenario(name, "bad input", action, expected, run)


def call_refusal(name: str, action: str, error: type, problem: str, fix: str,
                 call: Callable[[Workspace, Path], object]) -> Scenario:
    """A library entry point must raise ``error`` with a one-line message matching ``problem`` and naming ``fix``."""
    expected = f"raises {error.__name__}, one line matching /{problem}/ that names the fix '{fix}'"

    def run(ws: Workspace) -> Observation:
        case = ws.fresh(name)
        case.mkdir(parents=True)
        try:
            call(ws, case)
        except error as exc:
            text = str(exc)
            ok = "\n" not in text and re.search(problem, text) is not None and fix in text
            return Observation(f"{type(exc).__name__}: {clip(text, 240)}", ok)
        except Exception as exc:  # noqa: BLE001 - the wrong kind of error is an observation too
            return Observation(f"{type(exc).__name__} instead: {str(exc).splitlines()[0] if str(exc) else ''}", False)
        return Observation("accepted without an error", False)

    return Scenario(name, "bad input", action, expected, run)


# ------------------------------------------------------------------------------------ inputs
def train_argv(ws: Workspace, case: Path, *overrides: str, out: Optional[Path] = None) -> list[str]:
    return ["train", ws.config, "--out", str(out or case / "run"), *overrides]


def damaged(damage: Callable[[Path], None], *overrides: str) -> Build:
    """``edlm train`` on a copy of the prepared data that ``damage`` has broken."""

    def build(ws: Workspace, case: Path) -> list[str]:
        data = Path(shutil.copytree(ws.data, case / "data"))
        damage(data)
        return train_argv(ws, case, f"data.dir={data}", *overrides)

    return build


def garble_tar_header(data: Path) -> None:
    shard = data / "train" / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[:512] = bytes((i * 37 + 11) % 251 + 1 for i in range(512))
    shard.write_bytes(bytes(raw))


def truncate_shard(data: Path) -> None:
    shard = data / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        manifest = json.loads((data / "manifest.json").read_text())
        edit(manifest)
        (data / "manifest.json").write_text(json.dumps(manifest))

    return damage


def replace_valid_shard(make_rows: Callable[[dict], np.ndarray]) -> Callable[[Path], None]:
    """A well-formed shard (correct manifest size and checksum) holding ``make_rows(manifest)``."""

    def damage(data: Path) -> None:
        from edlm_dist.data.shards import write_shard

        manifest = json.loads((data / "manifest.json").read_text())
        manifest["splits"]["valid"]["shards"][0] = write_shard(data, "valid", 0, make_rows(manifest), 0)
        (data / "manifest.json").write_text(json.dumps(manifest))

    return damage


def rows_with_id(value_of: Callable[[dict], int]) -> Callable[[dict], np.ndarray]:
    def make(manifest: dict) -> np.ndarray:
        rows = np.ones((4, manifest["seq_len"]), dtype=np.int32)
        rows[2, 5] = value_of(manifest)
        return rows

    return make


def flip_one_token(data: Path) -> None:
    """Same size, valid ids: only the sha256 recorded in the manifest can tell."""
    from edlm_dist.data.shards import iter_shard_rows

    shard = data / "valid" / "shard-000000.tar"
    first = next(iter_shard_rows(shard))
    raw = bytearray(shard.read_bytes())
    offset = 512 + 128 + 4 * 3  # tar header, .npy header, then the row's 4th int32
    assert raw[offset] == first[3]
    raw[offset] = (first[3] + 1) % 8
    shard.write_bytes(bytes(raw))


def reference_copy(edit: Callable[[Path], None], *overrides: str) -> Build:
    """``edlm train`` pointed at a copy of the finished reference run, possibly edited."""

    def build(ws: Workspace, case: Path) -> list[str]:
        run = Path(shutil.copytree(ws.reference()["out"], case / "run"))
        edit(run)
        return train_argv(ws, case, *overrides, out=run)

    return build


def bump_format(run: Path) -> None:
    from edlm_dist.artifacts.checkpoint import FORMAT_VERSION

    meta_path = run / "checkpoints" / f"step_{TRAIN_STEPS:08d}" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))


def yaml_file(text: str) -> Callable[[Workspace, Path], object]:
    def call(ws: Workspace, case: Path) -> object:
        from edlm_dist.config.load import load_config

        (case / "bad.yaml").write_text(text)
        return load_config(case / "bad.yaml")

    return call


def eval_argv(*overrides: str, samples: str) -> Build:
    def build(ws: Workspace, case: Path) -> list[str]:
        (case / "good.jsonl").write_text("".join(json.dumps({"index": i, "tokens": [1, 2, 3, 4, i]}) + "\n"
                                                 for i in range(3)))
        (case / "bad.jsonl").write_text('{"index": 0, "tokens": [1, 2, 3]}\n{"index": 1, "tokens": [4, 5\n')
        return ["eval", ws.config, "--out", str(case / "eval"), *overrides, f"eval.samples=[{case / samples}]"]

    return build


def sample_argv(*overrides: str) -> Build:
    return lambda ws, case: ["sample", ws.config, "--out", str(case / "samples"), *overrides]


def tokenizer_without_merges(ws: Workspace, case: Path) -> list[str]:
    (case / "tok").mkdir()
    (case / "tok" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (case / "corpus.txt").write_text("a b a b\n\n" * 50)  # 50 paragraph documents
    return ["prepare-data", "--source", "text", "--input", str(case / "corpus.txt"), "--tokenizer",
            str(case / "tok"), "--seq-len", "16", "--out", str(case / "prepared")]


# In-process calls import what they exercise themselves: a module that fails to import breaks
# its own scenario only, not the registry.
def missing_tokenizer_folder(ws: Workspace, case: Path) -> object:
    from edlm_dist.data.tokenizers import build_tokenizer

    return build_tokenizer(str(case / "no_tokenizer"))


def negative_window(ws: Workspace, case: Path) -> object:
    from edlm_dist.sampling.engine import SamplerSettings

    return SamplerSettings(sampler="edlm", window=-0.1)


def read_rows_without_tokens(ws: Workspace, case: Path) -> object:
    from edlm_dist.artifacts.samples import read_samples_jsonl

    (case / "t.jsonl").write_text('{"text": "hi"}\n')
    return read_samples_jsonl(case / "t.jsonl")


def oracle_without_config(ws: Workspace, case: Path) -> object:
    from edlm_dist.evaluation.genppl import HFCausalLMOracle

    return HFCausalLMOracle(str(case))


def three_ranks() -> dict[str, str]:
    """Rank 0 of a 3-process launch (torchrun's variables); the check must fire before any rendezvous."""
    return {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


PREPARE = "re-run `edlm prepare-data"
SHARD0, SHARD1 = "train/shard-000000.tar", "train/shard-000001.tar"
BAD_INPUTS = [
    # ---- data: checked by `edlm train` before any model is built
    cli_refusal("corrupt_tar_shard", f"`edlm train` on data whose {SHARD0} header is garbage",
                r"shard-000000\.tar is corrupt", PREPARE, damaged(garble_tar_header)),
    cli_refusal("truncated_tar_shard", f"`edlm train` on data whose {SHARD1} is cut to 3000 bytes",
                r"shard-000001\.tar is truncated \(3000 of \d+ bytes\)", PREPARE, damaged(truncate_shard)),
    cli_refusal("missing_shard_file", f"`edlm train` on data with {SHARD1} deleted",
                r"shard file .*shard-000001\.tar is missing", PREPARE,
                damaged(lambda data: (data / SHARD1).unlink())),
    cli_refusal("empty_shard_list", "`edlm train` on a manifest whose valid split lists no shards",
                r"valid split .* has no shards \(empty shard list\)", PREPARE,
                damaged(edit_manifest(lambda m: m["splits"]["valid"].update(shards=[])))),
    cli_refusal("wrong_row_length", "`edlm train` on a well-formed shard holding rows of length 33 (seq_len 32)",
                r"row 0 has shape \(33,\), expected \(32,\)", PREPARE,
                damaged(replace_valid_shard(lambda m: np.ones((4, 33), dtype=np.int32)))),
    cli_refusal("token_id_outside_vocab", "`edlm train` on a shard whose row 2 holds id = vocab_size",
                r"row 2 holds token id (\d+) outside the vocabulary \[0, \1\)", "with the right tokenizer",
                damaged(replace_valid_shard(rows_with_id(lambda m: m["vocab_size"])))),
    cli_refusal("shard_edited_after_prepare", "`edlm train` on a shard with one token changed (same size, valid id)",
                r"fails its sha256 checksum", PREPARE, damaged(flip_one_token)),
    cli_refusal("manifest_seq_len_mismatch", "`edlm train data.seq_len=64` on data prepared with seq_len 32",
                r"seq_len=32 but the config asks for data.seq_len=64", "set data.seq_len=32",
                damaged(lambda data: None, "data.seq_len=64")),
    cli_refusal("manifest_vocab_mismatch", "`edlm train data.vocab_size=100` on data with a smaller vocabulary",
                r"tokenized with vocab_size=\d+ but the config says data.vocab_size=100", "set data.vocab_size=0",
                damaged(lambda data: None, "data.vocab_size=100")),
    cli_refusal("missing_data_dir", "`edlm train data.dir=<a folder that does not exist>`",
                r"data dir .*no_such_data does not exist", "run `edlm prepare-data",
                lambda ws, case: train_argv(ws, case, f"data.dir={case / 'no_such_data'}")),
    # ---- config
    cli_refusal("unknown_config_key", "`python -m edlm_dist.cli train tiny.yaml model.hiden_size=32` (typo)",
                r"unknown config key 'model.hiden_size'", "valid keys under model: preset, hidden_size",
                lambda ws, case: train_argv(ws, case, "model.hiden_size=32"), subprocess=True),
    call_refusal("unknown_key_in_yaml", "load_config() of a YAML file with a misspelled section `trian:`",
                 ConfigError, r"unknown config key 'trian'",
                 "valid keys: model, data", yaml_file("trian:\n  steps: 3\n")),
    cli_refusal("wrong_type", "`python -m edlm_dist.cli train tiny.yaml train.steps=ten`",
                r"wrong type for config key 'train.steps'", "could not be converted to Integer",
                lambda ws, case: train_argv(ws, case, "train.steps=ten"), subprocess=True),
    call_refusal("invalid_yaml", "load_config() of a file with broken YAML (`model: [32,`)",
                 ConfigError, r"bad.yaml' is not valid YAML", "fix its syntax",
                 yaml_file("model: [32,\n")),
    cli_refusal("tp_not_dividing_heads", "`python -m edlm_dist.cli train tiny.yaml parallel.tp=3` (4 heads)",
                r"parallel.tp=3 does not divide model.n_heads=4", "choose tp among the divisors of the head count",
                lambda ws, case: train_argv(ws, case, "parallel.tp=3"), subprocess=True),
    cli_refusal("dp_not_matching_world", "`edlm train parallel.dp=2` launched as a single process",
                r"tp=1 x dp=2 x pp=1 = 2 != world size 1", "set parallel.dp=1 or 0 (auto)",
                lambda ws, case: train_argv(ws, case, "parallel.dp=2")),
    cli_refusal("world_not_multiple_of_tp", "`edlm train parallel.tp=2` as rank 0 of WORLD_SIZE=3",
                r"world size 3 is not divisible by parallel.tp\*pp=2", "launch a multiple of tp processes",
                lambda ws, case: train_argv(ws, case, "parallel.tp=2"), env=three_ranks),
    cli_refusal("train_steps_zero", "`edlm train train.steps=0`", r"train.steps must be >= 1 \(got 0\)", ">= 1",
                lambda ws, case: train_argv(ws, case, "train.steps=0")),
    # ---- checkpoints: `edlm train --out` an existing run
    cli_refusal("checkpoint_other_model_shape", "`edlm train model.hidden_size=64 --out` a finished hidden-32 run",
                r"is for a different model \(hidden_size 32 vs 64 in the config\)",
                "use a matching config or a fresh --out",
                reference_copy(lambda run: None, "model.hidden_size=64"), may_rewrite=("config.yaml",)),
    cli_refusal("checkpoint_newer_format", "`edlm train --out` a run whose latest meta.json has format_version 2",
                r"has format version 2, newer than this edlm-dist supports \(1\)", "upgrade edlm-dist",
                reference_copy(bump_format), may_rewrite=("config.yaml",)),
    cli_refusal("latest_names_missing_checkpoint", "`edlm train --out` a run whose `latest` names step_00000099",
                r"names 'step_00000099' but .*meta.json is missing", "restore the folder or delete",
                reference_copy(lambda run: (run / "checkpoints" / "latest").write_text("step_00000099")),
                may_rewrite=("config.yaml",)),
    # ---- tokenizer files
    cli_refusal("tokenizer_missing_merges", "`edlm prepare-data --tokenizer DIR` where DIR has vocab.json only",
                r"tokenizer folder .*tok lacks merges.txt", "put GPT-2 style vocab.json + merges.txt there",
                tokenizer_without_merges),
    call_refusal("tokenizer_folder_missing", "build_tokenizer('<a folder that does not exist>')", DataError,
                 r"tokenizer folder .*no_tokenizer does not exist", "use gpt2|char|synthetic or a folder",
                 missing_tokenizer_folder),
    # ---- sampling settings and inputs
    cli_refusal("sample_k_zero", "`edlm sample sample.k=0`", r"sample.k must be >= 1 \(got 0\)",
                "number of importance-sampling proposals", sample_argv("sample.k=0")),
    cli_refusal("sample_window_above_one", "`edlm sample sample.window=1.5`",
                r"sample.window must be in \[0, 1\] \(got 1.5\)", "IS runs for t in [1-window, 1]",
                sample_argv("sample.window=1.5")),
    call_refusal("sampler_window_negative", "SamplerSettings(sampler='edlm', window=-0.1) (library API)",
                 SamplingError, r"window must be in \[0, 1\] \(got -0.1\)", "IS runs for t in [1-window, 1]",
                 negative_window),
    cli_refusal("sample_window_interval_reversed", "`edlm sample sample.window=[0.7,0.3]`",
                r"sample.window=\[0.7, 0.3\] must satisfy 0 <= t_lo <= t_hi <= 1", "IS runs for grid times t",
                sample_argv("sample.window=[0.7,0.3]")),
    cli_refusal("sample_block_size_negative", "`edlm sample sample.block_size=-2`",
                r"sample.block_size must be >= 0 \(got -2\)", "0 means one block of the whole row",
                sample_argv("sample.block_size=-2")),
    cli_refusal("sample_steps_zero", "`edlm sample sample.steps=0`", r"sample.steps must be >= 1 \(got 0\)", ">= 1",
                sample_argv("sample.steps=0")),
    cli_refusal("sample_missing_checkpoint", "`edlm sample sample.diffusion_ckpt=<a folder that does not exist>`",
                r"no trained weights at '.*no_run'", "pass the --out folder of a finished `edlm train` run",
                lambda ws, case: sample_argv(f"sample.diffusion_ckpt={case / 'no_run'}")(ws, case)),
    # ---- evaluation inputs
    cli_refusal("sample_file_not_jsonl", "`edlm eval eval.metrics=[entropy] eval.samples=[bad.jsonl]` (line 2 cut)",
                r"bad.jsonl line 2 is not valid JSON", "pass a JSONL file written by `edlm sample`",
                eval_argv("eval.metrics=[entropy]", samples="bad.jsonl")),
    call_refusal("sample_file_without_tokens", "read_samples_jsonl() of a JSONL file whose rows have no 'tokens'",
                 DataError, r"line 1 has no 'tokens' list of integer ids", "pass a JSONL file written by `edlm sample`",
                 read_rows_without_tokens),
    cli_refusal("hf_oracle_missing", "`edlm eval eval.metrics=[genppl] eval.oracle=<a path that does not exist>`",
                r"Gen PPL oracle .*no_such_oracle does not exist", "pass a local model folder",
                eval_argv("eval.metrics=[genppl]", "eval.oracle=/nonexistent/no_such_oracle", samples="good.jsonl")),
    call_refusal("hf_oracle_folder_without_config", "HFCausalLMOracle('<an empty folder>')", DataError,
                 r"oracle folder .* has no config.json", "pass a folder written by save_pretrained()",
                 oracle_without_config),
]
