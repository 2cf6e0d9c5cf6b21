"""Issue-19 refusals: out-of-range values, unusable outputs, damaged secondary files, replaced data, resume.

Each case is an :func:`~tests.reliability.bad_inputs.cli_refusal`: the real ``edlm`` command must exit 2
with one ``error:`` line naming the problem and the fix, no traceback, and leave every file of the case
folder as it was (for ``prepare-data --overwrite``: the previous dataset, byte for byte). The failure
classes are those of issue 19 (docs/reliability.md):

1. a value outside its schema range reaches a library (a traceback) -- refused when the config loads;
2. an output path that is a file, a truncated or corrupt secondary file, a manifest or metadata file
   missing a key -- one line from the one read path (artifacts/readers.py, storage/files.py);
3. ``prepare-data --overwrite`` with an input refused half-way -- the old dataset stays;
5. a resume that changes a setting that defines the run -- refused naming the keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.reliability.bad_inputs import (
    PREPARE,
    cli_refusal,
    damaged,
    edit_manifest,
    reference_copy,
    sample_argv,
    train_argv,
)
from tests.reliability.harness import TRAIN_STEPS, Workspace

LAST = f"step_{TRAIN_STEPS:08d}"
EARLIER = "use an earlier checkpoint"


def _train(*overrides: str):
    return lambda ws, case: train_argv(ws, case, *overrides)


def _range(name: str, override: str, problem: str, fix: str, command=_train):
    return cli_refusal(name, f"`edlm {'sample' if command is sample_argv else 'train'} {override}`", problem, fix,
                       command(override))


# ------------------------------------------------------------------------------------ outputs
def _out_is_a_file(command: str):
    def build(ws: Workspace, case: Path) -> list[str]:
        (case / "taken").write_text("a file the user keeps\n")
        if command == "prepare-data":
            return ["prepare-data", "--source", "synthetic", "--seq-len", "32", "--out", str(case / "taken")]
        return [command, ws.config, "--out", str(case / "taken"),
                *([f"sample.diffusion_ckpt={ws.reference()['out']}"] if command == "sample" else [])]

    return build


def _truncate(relative: str, keep: int = 100):
    def edit(run: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[:keep])

    return edit


def _drop_meta_key(key: str):
    def edit(run: Path) -> None:
        path = run / "checkpoints" / LAST / "meta.json"
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))

    return edit


def _poison_model_state(run: Path) -> None:
    """NaN in one weight of the last checkpoint's model state (written as DeepSpeed writes it)."""
    import torch

    path = next((run / "checkpoints" / LAST).glob("*model_states.pt"))
    state = torch.load(path, map_location="cpu", weights_only=False)
    name = next(k for k, v in state["module"].items() if v.is_floating_point())
    state["module"][name].view(-1)[0] = float("nan")
    torch.save(state, path)


def _weights_copy(damage_file: str):
    """``edlm sample`` from a copy of the reference run's weights folder with ``damage_file`` cut short."""

    def build(ws: Workspace, case: Path) -> list[str]:
        run = case / "run"
        shutil.copytree(ws.reference()["out"] / "weights", run / "weights")
        _truncate(f"weights/{damage_file}", 64)(run)
        return sample_argv(f"sample.diffusion_ckpt={run}")(ws, case)

    return build


def _export_copy(ws: Workspace, case: Path) -> list[str]:
    from edlm_dist.artifacts.hf_export import export_hf

    export = export_hf(ws.reference()["out"], case / "export")
    _truncate("model.safetensors", 64)(export)
    return sample_argv(f"sample.diffusion_ckpt={export}")(ws, case)


def _metrics_middle_line(run: Path) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"step": 2, "loss": 3.1\n'
    path.write_text("".join(lines))


# ------------------------------------------------------------------------------------ data replaced
def _overwrite_with_refused_input(ws: Workspace, case: Path) -> list[str]:
    """An existing dataset, then ``--overwrite`` with text whose validation split is too short for one row."""
    shutil.copytree(ws.data, case / "data")
    paragraphs = [f"Paragraph {i} has enough words to fill several rows of sixty-four bytes each, "
                  "and then some more words to be sure." for i in range(30)]
    (case / "corpus.txt").write_text("\n\n".join(paragraphs + ["Short."]) + "\n")
    return ["prepare-data", "--source", "text", "--input", str(case / "corpus.txt"), "--tokenizer", "byte",
            "--seq-len", "64", "--valid-docs", "1", "--overwrite", "--out", str(case / "data")]


def _overwrite_foreign_folder(ws: Workspace, case: Path) -> list[str]:
    (case / "mine").mkdir()
    (case / "mine" / "thesis.tex").write_text("months of work\n")
    return ["prepare-data", "--source", "synthetic", "--seq-len", "32", "--overwrite", "--out", str(case / "mine")]


SHARD_RECORD = lambda m: m["splits"]["train"]["shards"][0].pop("sha256")  # noqa: E731
REFUSALS = [
    # ---- 1. every config field has a range, checked when the config loads (before any library sees it)
    _range("beta1_above_one", "train.beta1=1.5", r"train.beta1 must be < 1 \(got 1.5\)", "< 1"),
    _range("lr_overflows", "train.lr=1e400", r"train.lr must be a finite number in \(0, 1\] \(got inf\)",
           "AdamW moves each weight"),
    _range("lr_nan", "train.lr=nan", r"train.lr must be a finite number .*\(got nan\)", "(0, 1]"),
    _range("lr_above_range", "train.lr=1e30", r"train.lr must be <= 1 \(got 1e\+?30\)", "AdamW moves each weight"),
    _range("dropout_one", "model.dropout=1.0", r"model.dropout must be < 1 \(got 1\)", "< 1"),
    _range("seed_negative", "train.seed=-1", r"train.seed must be >= 0 \(got -1\)", ">= 0"),
    _range("grad_clip_negative", "train.grad_clip=-1", r"train.grad_clip must be >= 0 \(got -1\)", ">= 0"),
    _range("num_workers_negative", "data.num_workers=-2", r"data.num_workers must be >= 0 \(got -2\)", ">= 0"),
    _range("slurm_nodes_zero", "slurm.nodes=0", r"slurm.nodes must be >= 1 \(got 0\)", ">= 1"),
    _range("slurm_cpu_nodes_without_tasks", "slurm.gpus_per_node=0",
           r"slurm.gpus_per_node=0 \(CPU nodes\) needs slurm.tasks_per_node >= 1", "processes per node"),
    _range("slurm_time_negative", "slurm.time_min=-30", r"slurm.time_min must be >= 1 \(got -30\)", ">= 1"),
    _range("slurm_partition_injection", "slurm.partition='gpu;rm'", r"slurm.partition=.*holds ';'", "use only"),
    _range("pipeline_step_count_zero", "pipeline.step_counts=[4,0]", r"pipeline.step_counts\[1\] must be >= 1",
           ">= 1"),
    _range("sample_temperature_zero", "sample.temperature=0", r"sample.temperature must be > 0 \(got 0\)", "> 0",
           command=sample_argv),
    # ---- 2. outputs that are not folders; damaged secondary files; files missing a key
    cli_refusal("train_out_is_a_file", "`edlm train --out FILE` (an existing file)",
                r"--out .*taken is a file, not a folder", "choose a folder path", _out_is_a_file("train")),
    cli_refusal("sample_out_is_a_file", "`edlm sample --out FILE` (an existing file)",
                r"--out .*taken is a file, not a folder", "choose a folder path", _out_is_a_file("sample")),
    cli_refusal("prepare_out_is_a_file", "`edlm prepare-data --out FILE` (an existing file)",
                r"--out .*taken is a file", "choose a folder path", _out_is_a_file("prepare-data")),
    cli_refusal("truncated_ema_shard", f"`edlm train train.steps=10 --out` a run whose {LAST}/ema_tp00.pt is cut "
                "to 100 bytes", r"ema_tp00.pt is corrupt or truncated", EARLIER,
                reference_copy(_truncate(f"checkpoints/{LAST}/ema_tp00.pt"), "train.steps=10")),
    cli_refusal("truncated_rank_state", f"`edlm train train.steps=10 --out` a run whose {LAST}/rank_00000.pt is "
                "cut to 100 bytes", r"rank_00000.pt is corrupt or truncated", EARLIER,
                reference_copy(_truncate(f"checkpoints/{LAST}/rank_00000.pt"), "train.steps=10")),
    cli_refusal("checkpoint_meta_missing_key", f"`edlm train --out` a run whose {LAST}/meta.json lacks 'step'",
                r"meta.json lacks the key 'step'", EARLIER, reference_copy(_drop_meta_key("step"))),
    cli_refusal("nonfinite_checkpoint_resume", f"`edlm train train.steps=10 --out` a run whose {LAST} model "
                "state holds a NaN weight", r"holds NaN/Inf values \(model weights: 1 tensor", "use a fresh --out",
                reference_copy(_poison_model_state, "train.steps=10")),
    cli_refusal("metrics_line_corrupt", "`edlm train train.steps=10 --out` a run whose metrics.jsonl line 3 is cut",
                r"metrics.jsonl line 3 is not valid JSON", "edit or delete that line",
                reference_copy(_metrics_middle_line, "train.steps=10")),
    cli_refusal("truncated_ema_weights", "`edlm sample` from weights whose ema.safetensors is cut to 64 bytes",
                r"ema.safetensors is corrupt or truncated", "re-export them", _weights_copy("ema.safetensors")),
    cli_refusal("truncated_export", "`edlm sample` from an `edlm export-hf` folder whose model.safetensors is cut",
                r"the export .*export cannot be loaded \(SafetensorError", "export the run again", _export_copy),
    cli_refusal("manifest_missing_mask_id", "`edlm train` on a manifest without tokenizer.mask_id",
                r"manifest.json lacks the key 'tokenizer.mask_id'", PREPARE,
                damaged(edit_manifest(lambda m: m["tokenizer"].pop("mask_id")))),
    cli_refusal("manifest_shard_without_sha", "`edlm train` on a manifest whose first shard record has no sha256",
                r"lacks 'sha256' in shard record 0 of split 'train'", PREPARE, damaged(edit_manifest(SHARD_RECORD))),
    # ---- 3. replacing data: the new dataset is built aside, the old one stays until it is complete
    cli_refusal("prepare_overwrite_refused_input", "`edlm prepare-data --overwrite` over a dataset, with text whose "
                "validation split is too short for a row", r"the valid split produced no rows of length 64",
                "use more input data", _overwrite_with_refused_input),
    cli_refusal("prepare_overwrite_foreign_folder", "`edlm prepare-data --overwrite --out` a folder of other files",
                r"holds other files \(thesis.tex\), not a prepared dataset", "choose an empty or new folder",
                _overwrite_foreign_folder),
    # ---- 5. resume with a changed setting that defines the run
    cli_refusal("resume_changed_seed", "`edlm train train.seed=7 train.steps=10 --out` a finished seed-1 run",
                r"cannot resume .* with a changed train.seed 1 -> 7", "start a fresh run with a new --out",
                reference_copy(lambda run: None, "train.seed=7", "train.steps=10")),
    cli_refusal("resume_changed_batch", "`edlm train train.global_batch=32 --out` a finished global-batch-16 run",
                r"with a changed train.global_batch 16 -> 32", "restore the checkpoint's values",
                reference_copy(lambda run: None, "train.global_batch=32")),
]
