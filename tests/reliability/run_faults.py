"""Issue-19 faults during real runs: bad state, changed settings, shared folders, file-system faults,
loader workers, start-up signals, special-token text (docs/reliability.md, classes 4 and 5-10).

Like faults.py, each fault is injected inside a forked ``edlm`` process; a run that stopped must then
resume and equal the uninterrupted run bit for bit (every logged loss, validation loss, grad norm and
the final weights). File-system faults are raised where the kernel would raise them (``os.write`` of the
one append path, a real ``RLIMIT_FSIZE``), signals are real.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import time
from pathlib import Path

from edlm_dist.cli import main
from tests.reliability.faults import (
    Inject,
    _fault,
    _train_fault,
    at_micro_step,
    clear_error,
    os_error,
    send_self,
    tag,
)
from tests.reliability.harness import (
    ChildResult,
    Observation,
    Workspace,
    compare_to_reference,
    fork_children,
    latest_tag,
    read_logged,
    run_cli,
    weights_digest,
)

PREEMPTED = "exit 3 `preempted by signal {} during start-up ({})`, nothing written; the re-run equals the " \
            "uninterrupted run bit for bit"
RESUME = "; the resumed run equals the uninterrupted run bit for bit"


# ------------------------------------------------------------------------------------ 4. bad state
def poison_before_save(step: int, part: str) -> Inject:
    """NaN in one model weight (``part="model"``) or EMA value (``"ema"``) just before the step-N save."""

    def install() -> None:
        from edlm_dist.training.trainer import Trainer

        original = Trainer.save

        def patched(self):
            if self.step == step:
                tensor = next(self.engine.module.parameters()).data if part == "model" else self.ema.shadow[0]
                tensor.view(-1)[0] = float("nan")
            return original(self)

        Trainer.save = patched

    return install


def nonfinite_state(part: str, words: str):
    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            pattern = (rf"training state at step 6 holds NaN/Inf \({words}: 1 tensor[;)].*it was not saved; last good "
                       rf"checkpoint: .*{tag(3)}")
            ok = clear_error(results[0], pattern) and latest_tag(out) == tag(3)
            return ok, f"{results[0].describe()}, latest={latest_tag(out)}"

        return _train_fault(ws, f"nonfinite_{part}", lambda out: {0: poison_before_save(6, part)}, check)

    return run


def divergence(policy: str):
    def run(ws: Workspace) -> Observation:
        out = ws.fresh(f"diverge_{policy}")
        r = ws.train(out, "train.divergence_loss=0.5", f"train.on_divergence={policy}", "train.steps=2")[0]
        if policy == "stop":
            ok = clear_error(r, r"loss [\d.]+ at step 1 is above train.divergence_loss=0.5: the run diverged; .*"
                                r"last good checkpoint: none") and latest_tag(out) is None
            return Observation(r.describe(), ok)
        warnings = [line for line in r.stderr.splitlines() if "is diverging" in line]
        return Observation(f"{r.describe()}; {len(warnings)} divergence warning(s)", r.exit_code == 0
                           and len(warnings) == 1 and not r.has_traceback)

    return run


# ------------------------------------------------------------------------------------ 5. changed settings
def resume_changed_lr(ws: Workspace) -> Observation:
    import shutil

    out = Path(shutil.copytree(ws.reference()["out"], ws.fresh("changed_lr")))
    r = ws.train(out, "train.steps=10", "train.lr=1e-3")[0]
    said = re.search(r"applying the changed settings .*train.lr 0.003 -> 0.001", r.stderr) is not None
    lrs = {step: value for step, key, value in _rows(out, "lr")}
    recorded = "lr: 0.001" in (out / "config.yaml").read_text()
    ok = r.exit_code == 0 and said and lrs.get(9) == 1e-3 and lrs.get(10) == 1e-3 and recorded
    return Observation(f"{r.describe()}; logged the change: {said}; lr at steps 9, 10 = {lrs.get(9)}, "
                       f"{lrs.get(10)} (config: 1e-3 x constant schedule); config.yaml records it: {recorded}", ok)


def _rows(out: Path, key: str) -> list[tuple[int, str, object]]:
    from edlm_dist.training.metrics_logger import read_metrics

    return [(row["step"], key, row[key]) for row in read_metrics(out) if key in row]


# ------------------------------------------------------------------------------------ 6. one folder, one run
def _wait_for(path: Path, limit: float = 300.0) -> None:
    end = time.monotonic() + limit
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.05)


def two_runs_one_out(ws: Workspace) -> Observation:
    """Run A holds the folder (inside `edlm train`, past the lock) while run B starts on it; A goes on once B ended."""
    reference = ws.reference()
    out = ws.fresh("two_runs")
    argv = ["train", ws.config, "--out", str(out)]
    a_holds, b_done = ws.fresh("a_holds_the_lock"), ws.fresh("b_done")

    def first() -> int:
        from edlm_dist.training import cli

        original = cli.run_training

        def holding(*args, **kwargs):
            a_holds.touch()
            _wait_for(b_done)
            return original(*args, **kwargs)

        cli.run_training = holding
        return main(argv)

    def second() -> int:
        _wait_for(a_holds)
        try:
            return main(argv)
        finally:
            b_done.touch()

    single = {key: None for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    a, b = fork_children([(first, single), (second, single)], ws.logs)
    named = clear_error(b, r"is in use by `.*` \(host .*, pid \d+, started .*\); wait for it")
    same, how = compare_to_reference(out, reference)
    return Observation(f"the second run: {b.describe()}; the first: exit {a.exit_code}, {how}",
                       a.exit_code == 0 and named and same)


def stale_lock_after_sigkill(ws: Workspace) -> Observation:
    reference = ws.reference()
    out = ws.fresh("stale_lock")
    killed = ws.train(out, inject={0: at_micro_step(5, 1, send_self(signal.SIGKILL))})[0]
    left = (out / ".edlm-lock").is_file()
    resumed = ws.train(out)[0]
    warned = re.search(r"stale lock of .* \(killed\?\); taking it over", resumed.stderr) is not None
    same, how = compare_to_reference(out, reference)
    ok = killed.exit_code == -signal.SIGKILL and left and warned and resumed.exit_code == 0 and same
    return Observation(f"{killed.describe()}, lock file left: {left}; the re-run warned of a stale lock: {warned}, "
                       f"{resumed.describe()}; {how}", ok)


# ------------------------------------------------------------------------------------ 8. file-system faults
def fail_metrics_append(step: int, code: int) -> Inject:
    """The append of step N's metrics row writes half the row, then fails with ``code`` (disk full, read-only)."""

    def install() -> None:
        from edlm_dist.storage import files

        class FaultyOs:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def write(fd, data):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.endswith("metrics.jsonl") and data.startswith(f'{{"step": {step},'.encode()):
                    os.write(fd, data[: len(data) // 2])
                    raise os_error(code, target)
                return os.write(fd, data)

        files.os = FaultyOs()

    return install


def metrics_write_failure(code: int, reason: str):
    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            text = (out / "metrics.jsonl").read_text()
            whole = text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
            ok = clear_error(results[0], rf"could not append to .*metrics.jsonl \({reason}\)") and whole
            return ok, f"{results[0].describe()}; metrics.jsonl ends on a whole row: {whole}"

        return _train_fault(ws, f"metrics_{code}", lambda out: {0: fail_metrics_append(5, code)}, check)

    return run


def torn_row_then_kill(out: Path) -> Inject:
    def action() -> None:
        with open(out / "metrics.jsonl", "ab") as handle:
            handle.write(b'{"step": 5, "loss": 3.1')  # what a writer killed mid-row leaves
        os.kill(os.getpid(), signal.SIGKILL)

    return at_micro_step(5, 1, action)


def torn_metrics_line(ws: Workspace) -> Observation:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        from edlm_dist.training.metrics_logger import read_metrics

        torn = not (out / "metrics.jsonl").read_text().endswith("\n")
        rows = len(read_metrics(out))
        return results[0].exit_code == -signal.SIGKILL and torn and rows > 0, \
            f"{results[0].describe()} with a torn last row; read_metrics() reads the {rows} whole rows"

    return _train_fault(ws, "torn_metrics", lambda out: {0: torn_row_then_kill(out)}, check)


def file_size_limit(limit: int) -> Inject:
    def install() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full quota
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return install


def real_file_size_limit(ws: Workspace) -> Observation:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        pattern = r"could not write checkpoint step 3 .*File too large: the file-size limit .*\(none\) is kept"
        ok = clear_error(results[0], pattern) and latest_tag(out) is None
        return ok, results[0].describe()

    return _train_fault(ws, "fsize", lambda out: {0: file_size_limit(64 * 1024)}, check)


def fail_weights_export() -> Inject:
    """safetensors' writer fails as it does on a full disk: its own error type, not an OSError."""

    def install() -> None:
        from safetensors import SafetensorError

        from edlm_dist.artifacts import weights

        def full(*args, **kwargs):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

        weights.save_file = full

    return install


def weights_export_failure(ws: Workspace) -> Observation:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        ok = clear_error(results[0], r"could not write weights to .*weights \(.*No space left on device.*\); free "
                                     r"disk space") and latest_tag(out) == tag(8)
        return ok, f"{results[0].describe()}, latest={latest_tag(out)}"

    return _train_fault(ws, "export_full", lambda out: {0: fail_weights_export()}, check)


# ------------------------------------------------------------------------------------ 9. loader workers
def workers_resume(ws: Workspace) -> Observation:
    workers = ("data.num_workers=2",)
    reference_out = ws.fresh("workers_reference")
    first = ws.train(reference_out, *workers)[0]
    if first.exit_code != 0:
        return Observation(f"the uninterrupted num_workers=2 run failed: {first.describe()}", False)
    reference = {"logged": read_logged(reference_out), "digest": weights_digest(reference_out)}
    out = ws.fresh("workers_resume")
    killed = ws.train(out, *workers, inject={0: at_micro_step(5, 1, send_self(signal.SIGKILL))})[0]
    resumed = ws.train(out, *workers)[0]
    same, how = compare_to_reference(out, reference)
    return Observation(f"{killed.describe()}, then {resumed.describe()}; {how}",
                       killed.exit_code == -signal.SIGKILL and resumed.exit_code == 0 and same)


# ------------------------------------------------------------------------------------ 10. start-up signals
def signal_inside(module: str, name: str, signum: int) -> Inject:
    """Send ``signum`` to ourselves when ``module.name`` (a start-up step) is called, then run it."""

    def install() -> None:
        import importlib

        owner = importlib.import_module(module)
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return original(*args, **kwargs)

        setattr(owner, name, patched)

    return install


def startup_signal(module: str, name: str, signum: int, where: str):
    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            r = results[0]
            said = f"preempted by signal {signal.Signals(signum).name} during start-up ({where})" in r.stdout
            ok = r.exit_code == 3 and said and not r.has_traceback and latest_tag(out) is None
            return ok, r.describe()

        return _train_fault(ws, f"startup_{name}", lambda out: {0: signal_inside(module, name, signum)}, check)

    return run


def signal_while_loading_checkpoint(ws: Workspace) -> Observation:
    reference = ws.reference()
    out = ws.fresh("signal_at_load")
    first = ws.train(out, inject={0: at_micro_step(4, 0, send_self(signal.SIGTERM))})[0]  # checkpoint of step 4
    second = ws.train(out, inject={0: signal_inside("edlm_dist.artifacts.checkpoint", "load_checkpoint",
                                                    signal.SIGTERM)})[0]
    said = "during start-up (after loading the checkpoint)" in second.stdout
    kept = latest_tag(out) == tag(4)
    third = ws.train(out)[0]
    same, how = compare_to_reference(out, reference)
    ok = first.exit_code == 3 and second.exit_code == 3 and said and kept and third.exit_code == 0 and same
    return Observation(f"pre-empted at step 4 ({first.describe()}); SIGTERM while loading it: {second.describe()}, "
                       f"latest still {latest_tag(out)}; then {third.describe()}; {how}", ok)


# ------------------------------------------------------------------------------------ 7. special tokens
def special_strings(tokenizer: str):
    literals = "<|endoftext|> [BOS] [EOS] [MASK] [UNK] [PAD]"

    def run(ws: Workspace) -> Observation:
        import numpy as np

        from edlm_dist.data.shards import iter_shard_rows, load_manifest

        case = ws.fresh(f"specials_{tokenizer}")
        case.mkdir(parents=True)
        docs = [f"document {i} quotes {literals} as plain text." for i in range(12)]
        (case / "corpus.txt").write_text("\n\n".join(docs) + "\n")
        r = run_cli(["prepare-data", "--source", "text", "--input", str(case / "corpus.txt"), "--tokenizer",
                     tokenizer, "--seq-len", "128", "--no-wrap", "--valid-docs", "2", "--max-unk-rate", "1",
                     "--out", str(case / "data")], ws.logs)
        if r.exit_code != 0:
            return Observation(r.describe(), False)
        manifest = load_manifest(case / "data")
        info = manifest["tokenizer"]
        specials = {info["bos_id"], info["eos_id"], info["mask_id"]}
        rows = [row for split in ("train", "valid") for shard in manifest["splits"][split]["shards"]
                for row in iter_shard_rows(case / "data" / shard["file"])]
        stray = 0
        for row in rows:
            body = list(np.asarray(row))
            end = body.index(info["eos_id"], 1)
            stray += len([i for i in body[1:end] if i in specials])
        ok = len(rows) == len(docs) and stray == 0
        return Observation(f"{r.describe()}; {len(rows)} rows, {stray} special ids inside the documents", ok)

    return run


SPECIAL = "exit 0; every row holds BOS/EOS only as its framing: no special id inside a document"
RUN_FAULTS = [
    _fault("nonfinite_weights_before_save", "a model weight turns NaN just before the step-6 save",
           "exit 2 `error: the training state at step 6 holds NaN/Inf ... not saved; last good: step_00000003`"
           + RESUME, nonfinite_state("model", "model weights")),
    _fault("nonfinite_ema_before_save", "an EMA value turns NaN just before the step-6 save",
           "exit 2 `error: ... holds NaN/Inf (EMA weights: 1 tensor) ... step_00000003`" + RESUME,
           nonfinite_state("ema", "EMA weights")),
    _fault("divergence_stops", "`edlm train train.divergence_loss=0.5` (loss ~3.4 at step 1)",
           "exit 2 `error: loss ... is above train.divergence_loss=0.5: the run diverged`, no checkpoint",
           divergence("stop")),
    _fault("divergence_warns", "`edlm train train.divergence_loss=0.5 train.on_divergence=warn train.steps=2`",
           "exit 0 with exactly one divergence warning", divergence("warn")),
    _fault("resume_changed_lr_applied", "resume a finished run with train.steps=10 train.lr=1e-3 (was 3e-3)",
           "exit 0; the change is logged; steps 9-10 run at lr 1e-3; config.yaml records it", resume_changed_lr),
    _fault("two_runs_one_out", "two `edlm train --out X` started at once on one folder",
           "one exits 0 with the uninterrupted run's results bit for bit; the other exits 2 naming the holder",
           two_runs_one_out),
    _fault("stale_lock_after_sigkill", "SIGKILL in step 5 (the lock file stays), then re-run",
           "the re-run detects the stale lock, warns, takes it over" + RESUME, stale_lock_after_sigkill),
    _fault("disk_full_metrics_append", "ENOSPC half-way through the step-5 metrics row",
           "exit 2 `error: could not append to .../metrics.jsonl (No space left on device)`, no torn row" + RESUME,
           metrics_write_failure(errno.ENOSPC, "No space left on device")),
    _fault("readonly_metrics_append", "EROFS half-way through the step-5 metrics row (remounted read-only)",
           "exit 2 `error: could not append to .../metrics.jsonl (Read-only file system)`, no torn row" + RESUME,
           metrics_write_failure(errno.EROFS, "Read-only file system")),
    _fault("torn_metrics_row_then_kill", "a half-written metrics row, then SIGKILL",
           "read_metrics() skips the torn row; the next append repairs it" + RESUME, torn_metrics_line),
    _fault("file_size_limit_checkpoint", "a real RLIMIT_FSIZE of 64 KiB: the first checkpoint cannot be written",
           "exit 2 `error: could not write checkpoint step 3 (File too large) ... (none) is kept`" + RESUME,
           real_file_size_limit),
    _fault("disk_full_at_weights_export", "safetensors fails as on a full disk while the final weights are written",
           "exit 2 `error: could not write weights ... No space left on device`; checkpoint step 8 kept; the re-run "
           "exports the uninterrupted run's weights bit for bit", weights_export_failure),
    _fault("workers_dropout_resume", "data.num_workers=2 with dropout 0.1: SIGKILL in step 5, resume",
           "the resumed run equals the uninterrupted num_workers=2 run bit for bit", workers_resume),
    _fault("sigterm_while_loading_config", "SIGTERM while `edlm train` reads its config",
           PREEMPTED.format("SIGTERM", "while starting"),
           startup_signal("edlm_dist.training.cli", "load_config", signal.SIGTERM, "while starting")),
    _fault("sigterm_while_validating_data", "SIGTERM while the data is validated",
           PREEMPTED.format("SIGTERM", "after validating the data"),
           startup_signal("edlm_dist.training.trainer", "validate_dataset", signal.SIGTERM,
                          "after validating the data")),
    _fault("sigusr1_while_building_model", "SIGUSR1 while the DeepSpeed engine is built",
           PREEMPTED.format("SIGUSR1", "after building the model"),
           startup_signal("edlm_dist.training.trainer", "build_engine", signal.SIGUSR1, "after building the model")),
    _fault("sigterm_while_loading_checkpoint", "pre-empted at step 4; SIGTERM while the re-run loads that checkpoint",
           "exit 3 twice, latest stays step_00000004; the third run equals the uninterrupted run bit for bit",
           signal_while_loading_checkpoint),
    _fault("special_strings_byte", "`edlm prepare-data --tokenizer byte` on text quoting <|endoftext|>, [BOS], "
           "[MASK], [UNK]", SPECIAL, special_strings("byte")),
    _fault("special_strings_text8", "`edlm prepare-data --tokenizer text8` on text quoting <|endoftext|>, [BOS], "
           "[MASK], [UNK]", SPECIAL, special_strings("text8")),
]
