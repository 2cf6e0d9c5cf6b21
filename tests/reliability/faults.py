"""The scenario registry: faults during real runs (this file) and bad inputs (bad_inputs.py).

Each :class:`~tests.reliability.harness.Scenario` has a name, what is done, the promised outcome,
and a function that does it on CPU in seconds and returns what was observed with PASS/FAIL.
``tools/fault_report.py`` prints them as a scorecard; ``tests/reliability/test_faults.py`` runs
each one as a test. A training fault passes only if the run then resumes and every logged loss,
validation loss and grad norm, and the final weights, equal an uninterrupted run's bit for bit
(CPU, fp32; docs/reliability.md).

Faults are injected inside a forked ``edlm`` process with a monkeypatch that only that process
sees: a real ``SIGKILL``/``SIGTERM``/``SIGUSR1``/``SIGSTOP`` sent at a precise point, or an
``OSError`` where the file system would raise one (root ignores ``chmod``, so a read-only folder
cannot be simulated with permissions).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from tests.reliability.harness import (
    RUN_TIMEOUT_S,
    ChildResult,
    Observation,
    Scenario,
    Workspace,
    compare_to_reference,
    latest_tag,
    sample_tokens,
)

Inject = Callable[[], None]
RANK_TIMEOUT_S = 5  # parallel.timeout_s of the two-rank scenarios
HANG_LIMIT_S = 60  # a surviving rank still running after this long counts as hung


def tag(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------ injections
def at_micro_step(step: int, micro: int, action: Callable[[], None]) -> Inject:
    """Run ``action`` as the trainer enters micro-batch ``micro`` of optimizer step ``step`` (1-based)."""

    def install() -> None:
        from edlm_dist.training.trainer import Trainer

        original, seen = Trainer._micro_step, {}

        def patched(self, batch):
            index = seen.get(self.step + 1, 0)
            seen[self.step + 1] = index + 1
            if self.step + 1 == step and index == micro:
                action()
            return original(self, batch)

        Trainer._micro_step = patched

    return install


def send_self(signum: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), signum)


def poison_loss(step: int, factor: float) -> Inject:
    """Multiply the training loss of every micro-batch of ``step`` by ``factor`` (nan or inf)."""

    def install() -> None:
        from edlm_dist.training.trainer import Trainer

        original = Trainer._micro_step

        def patched(self, batch):
            if self.step + 1 != step:
                return original(self, batch)
            clean = self.objective.loss

            def poisoned(*args, **kwargs):
                loss, stats = clean(*args, **kwargs)
                return loss * factor, stats

            self.objective.loss = poisoned
            try:
                return original(self, batch)
            finally:
                self.objective.loss = clean

        Trainer._micro_step = patched

    return install


def kill_inside_checkpoint_write(out: Path, step: int) -> Inject:
    """SIGKILL once DeepSpeed has written its files into ``.partial-step_N`` (rank state not yet)."""

    def install() -> None:
        from edlm_dist.artifacts import checkpoint

        original = checkpoint.rng_state

        def patched():
            if (out / "checkpoints" / f".partial-{tag(step)}").is_dir():
                os.kill(os.getpid(), signal.SIGKILL)
            return original()

        checkpoint.rng_state = patched

    return install


def kill_before_latest_is_replaced(out: Path, step: int) -> Inject:
    """SIGKILL after ``latest.tmp`` names step N and before it replaces ``latest``."""

    def install() -> None:
        original = os.replace

        def patched(src, dst, *args, **kwargs):
            if Path(dst) == out / "checkpoints" / "latest" and Path(src).read_text().strip() == tag(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(src, dst, *args, **kwargs)

        os.replace = patched

    return install


def os_error(code: int, path: object) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def fail_torch_save(step: int, prefix: str, code: int) -> Inject:
    """``torch.save`` of a file named ``prefix*`` inside ``.partial-step_N`` raises OSError(``code``)."""

    def install() -> None:
        import torch

        original = torch.save

        def patched(obj, path, *args, **kwargs):
            path_s = str(path)
            if f".partial-{tag(step)}" in path_s and Path(path_s).name.startswith(prefix):
                raise os_error(code, path_s)
            return original(obj, path, *args, **kwargs)

        torch.save = patched

    return install


def fail_deepspeed_save(step: int, code: int) -> Inject:
    """DeepSpeed's ``save_checkpoint`` of step N raises OSError(``code``) for its target folder."""

    def install() -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        original = DeepSpeedEngine.save_checkpoint

        def patched(self, save_dir, tag=None, *args, **kwargs):
            if tag and f"step_{step:08d}" in str(tag):
                raise os_error(code, Path(save_dir) / str(tag))
            return original(self, save_dir, tag, *args, **kwargs)

        DeepSpeedEngine.save_checkpoint = patched

    return install


def fail_meta_write(step: int, code: int) -> Inject:
    """Writing ``meta.json`` (the last file of a checkpoint) into ``.partial-step_N`` raises OSError(``code``)."""

    def install() -> None:
        import builtins

        from edlm_dist.storage import files

        def patched(path, *args, **kwargs):  # the write path opens NAME.tmp, then renames it
            if Path(path).name == "meta.json.tmp" and f".partial-{tag(step)}" in str(path):
                raise os_error(code, path)
            return builtins.open(path, *args, **kwargs)

        files.open = patched  # storage.files' own `open`: every other module is untouched

    return install


def poison_energy(value: float, call: int) -> Inject:
    """The sampler's energy function returns ``value`` for one candidate on its ``call``-th call."""

    def install() -> None:
        from edlm_dist.sampling import run as sample_run

        original = sample_run.build_energy

        def patched(*args, **kwargs):
            energy_fn, calls = original(*args, **kwargs), {"n": 0}

            def poisoned(*fn_args):
                energies = energy_fn(*fn_args).clone()
                calls["n"] += 1
                if calls["n"] == call:
                    energies.view(-1)[0] = value
                return energies

            return poisoned

        sample_run.build_energy = patched

    return install


# ------------------------------------------------------------------------------------ checks
def clear_error(result: ChildResult, pattern: str) -> bool:
    """Exit 2, exactly one ``error:`` line matching ``pattern``, no traceback."""
    lines = result.error_lines
    return (result.exit_code == 2 and len(lines) == 1 and not result.has_traceback
            and re.search(pattern, lines[0]) is not None)


def _train_fault(ws: Workspace, name: str, inject: Callable[[Path], dict[int, Inject]],
                 check: Callable[[list[ChildResult], Path], tuple[bool, str]], *, world: int = 1,
                 overrides: tuple[str, ...] = (), primary: Optional[int] = None,
                 timeout: float = RUN_TIMEOUT_S) -> Observation:
    """Fault run, its scenario-specific check, then a plain resume compared with the uninterrupted run."""
    reference = ws.reference(world)
    out = ws.fresh(name)
    faulted = ws.train(out, *overrides, world=world, inject=inject(out), primary=primary, timeout=timeout)
    ok, seen = check(faulted, out)
    resumed = ws.train(out, world=world)
    if any(r.exit_code != 0 for r in resumed):
        return Observation(f"{seen}; the resume failed: {resumed[0].describe()}", False)
    leftovers = sorted(p.name for p in (out / "checkpoints").glob(".partial-*"))
    same, how = compare_to_reference(out, reference)
    if leftovers:
        how += f"; but {leftovers} were left behind"
    return Observation(f"{seen}; {how}", ok and same and not leftovers)


def _killed_with_latest(signum: int, latest: str) -> Callable[[list[ChildResult], Path], tuple[bool, str]]:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        found = latest_tag(out)
        return results[0].exit_code == -signum and found == latest, f"{results[0].describe()}, latest={found}"

    return check


def sigkill_mid_step(ws: Workspace) -> Observation:
    inject = lambda out: {0: at_micro_step(5, 1, send_self(signal.SIGKILL))}  # noqa: E731
    return _train_fault(ws, "sigkill_mid_step", inject, _killed_with_latest(signal.SIGKILL, tag(3)))


def sigkill_during_checkpoint_write(ws: Workspace) -> Observation:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        from edlm_dist.artifacts.checkpoint import latest_checkpoint, read_meta

        partial = out / "checkpoints" / f".partial-{tag(6)}"
        written = sorted(p.name for p in partial.rglob("*") if p.is_file()) if partial.is_dir() else []
        pointer = (out / "checkpoints" / "latest").read_text()
        loads = latest_checkpoint(out)
        meta_step = read_meta(loads)["step"] if loads else None
        ok = (results[0].exit_code == -signal.SIGKILL and bool(written) and pointer == tag(3)
              and meta_step == 3 and not (out / "checkpoints" / tag(6)).exists())
        return ok, (f"{results[0].describe()} with {len(written)} files in .partial-{tag(6)}; latest is exactly "
                    f"'{pointer}' and its checkpoint loads (meta step {meta_step})")

    return _train_fault(ws, "sigkill_ckpt_write", lambda out: {0: kill_inside_checkpoint_write(out, 6)}, check)


def sigkill_before_latest_update(ws: Workspace) -> Observation:
    def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
        pointer = (out / "checkpoints" / "latest").read_text()
        pending = out / "checkpoints" / "latest.tmp"
        ok = results[0].exit_code == -signal.SIGKILL and pointer == tag(3) and pending.is_file()
        return ok, f"{results[0].describe()}; latest still reads exactly '{pointer}' (latest.tmp left aside)"

    return _train_fault(ws, "sigkill_latest", lambda out: {0: kill_before_latest_is_replaced(out, 6)}, check)


def preemption(signum: int, step: int) -> Callable[[Workspace], Observation]:
    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            from edlm_dist.errors import REQUEUE_EXIT_CODE

            r, found = results[0], latest_tag(out)
            said = f"preempted by signal {signal.Signals(signum).name} at step {step}" in r.stdout
            ok = r.exit_code == REQUEUE_EXIT_CODE and found == tag(step) and said and not r.has_traceback
            return ok, f"{r.describe()}, latest={found}"

        inject = lambda out: {0: at_micro_step(step, 0, send_self(signum))}  # noqa: E731
        return _train_fault(ws, f"preempt_{signum}", inject, check)

    return run


def rank_failure(signum: int) -> Callable[[Workspace], Observation]:
    """Rank 1 of 2 is killed (SIGKILL) or frozen (SIGSTOP) in step 5; rank 0 must stop with a clear error."""

    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            rank0, found = results[0], latest_tag(out)
            in_time = rank0.exit_code is not None  # None: still running after HANG_LIMIT_S, killed by the harness
            clear = clear_error(rank0, r"(?i)rank|peer|process")
            return in_time and clear and found == tag(3), f"rank 0: {rank0.describe(160)}; latest={found}"

        inject = lambda out: {1: at_micro_step(5, 0, send_self(signum))}  # noqa: E731
        return _train_fault(ws, f"rank_{signum}", inject, check, world=2, primary=0, timeout=HANG_LIMIT_S,
                            overrides=(f"parallel.timeout_s={RANK_TIMEOUT_S}",))

    return run


def write_failure(inject_for: Callable[[], Inject], pattern: str) -> Callable[[Workspace], Observation]:
    """A checkpoint write fails at step 6: clear error, step 3 kept, nothing half-written left."""

    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            found = latest_tag(out)
            partials = sorted(p.name for p in (out / "checkpoints").glob(".partial-*"))
            ok = clear_error(results[0], pattern) and found == tag(3) and not (out / "checkpoints" / tag(6)).exists()
            return ok, f"{results[0].describe(170)}; latest={found}, partial folders left: {partials or 'none'}"

        return _train_fault(ws, "write_fail", lambda out: {0: inject_for()}, check)

    return run


def non_finite_loss(step: int, factor: float, word: str, kept: int) -> Callable[[Workspace], Observation]:
    def run(ws: Workspace) -> Observation:
        def check(results: list[ChildResult], out: Path) -> tuple[bool, str]:
            found = latest_tag(out)
            pattern = rf"loss is {word} at step {step}; stopped before the update, last good checkpoint: .*{tag(kept)}"
            ok = clear_error(results[0], pattern) and found == tag(kept)
            return ok, f"{results[0].describe(150)}; latest={found}"

        return _train_fault(ws, f"{word}_loss", lambda out: {0: poison_loss(step, factor)}, check)

    return run


def non_finite_energy(value: float) -> Callable[[Workspace], Observation]:
    def run(ws: Workspace) -> Observation:
        expected = ws.sample_reference()
        out = ws.fresh("energy")
        bad = ws.sample(out, inject=poison_energy(value, call=2))
        refused = clear_error(bad, r"candidate energies are NaN/Inf; check the energy model") and not (
            out / "samples.jsonl").exists()
        again = ws.sample(out)
        same = again.exit_code == 0 and sample_tokens(out) == expected
        return Observation(f"{bad.describe(150)}, no samples.jsonl written; clean re-run: "
                           f"{'samples identical to an undisturbed run' if same else again.describe()}",
                           refused and same)

    return run


def _fault(name: str, action: str, expected: str, run: Callable[[Workspace], Observation], ranks: int = 1) -> Scenario:
    return Scenario(name, "fault", action, expected, run, ranks)


RESUME = "; resume reproduces the uninterrupted run bit for bit"
FAULTS = [
    _fault("sigkill_mid_step", "SIGKILL the trainer between the 2 micro-batches of step 5 (checkpoint at 3)",
           "process dies, latest=step 3" + RESUME, sigkill_mid_step),
    _fault("sigkill_during_checkpoint_write", "SIGKILL while the step-6 checkpoint is half written (.partial-*)",
           "latest still exactly 'step_00000003' and it loads" + RESUME, sigkill_during_checkpoint_write),
    _fault("sigkill_before_latest_update", "SIGKILL after step_6 is renamed, before `latest` is replaced",
           "`latest` is old or new, never half-written" + RESUME, sigkill_before_latest_update),
    _fault("sigterm_preemption", "SIGTERM (SLURM pre-emption) arrives during step 5",
           "step 5 finishes, checkpoint step 5, exit code 3 (requeue)" + RESUME, preemption(signal.SIGTERM, 5)),
    _fault("sigusr1_preemption", "SIGUSR1 (SLURM --signal) arrives during step 2, before any checkpoint",
           "checkpoint step 2, exit code 3 (requeue)" + RESUME, preemption(signal.SIGUSR1, 2)),
    _fault("rank_dies", f"2 ranks, parallel.timeout_s={RANK_TIMEOUT_S}; rank 1 is SIGKILLed in step 5",
           "rank 0 stops (no hang) with one `error:` line naming the lost rank" + RESUME, rank_failure(signal.SIGKILL),
           ranks=2),
    _fault("rank_hangs", f"2 ranks, parallel.timeout_s={RANK_TIMEOUT_S}; rank 1 is frozen (SIGSTOP) in step 5",
           "rank 0 times out after ~timeout_s with one `error:` line" + RESUME, rank_failure(signal.SIGSTOP),
           ranks=2),
    _fault("disk_full_at_save", "ENOSPC while writing the step-6 checkpoint's rank state (torch.save)",
           "exit 2 `error: could not write checkpoint ... step_00000003 is kept`" + RESUME,
           write_failure(lambda: fail_torch_save(6, "rank_", errno.ENOSPC),
                         r"could not write checkpoint step 6 .*No space left.*step_00000003\) is kept; free disk")),
    _fault("readonly_checkpoint_dir", "EROFS from DeepSpeed's save_checkpoint at step 6 (read-only output dir)",
           "exit 2 `error: could not write checkpoint ... step_00000003 is kept`" + RESUME,
           write_failure(lambda: fail_deepspeed_save(6, errno.EROFS),
                         r"could not write checkpoint step 6 .*Read-only file system.*is kept; .*fix permissions")),
    _fault("disk_full_at_meta_write", "ENOSPC while writing meta.json, the last file of the step-6 checkpoint",
           "exit 2 `error: could not write checkpoint ... step_00000003 is kept`" + RESUME,
           write_failure(lambda: fail_meta_write(6, errno.ENOSPC),
                         r"could not write checkpoint step 6 .*No space left.*step_00000003\) is kept")),
    _fault("nan_loss", "the loss of step 5 becomes NaN",
           "exit 2 `error: loss is nan at step 5 ... last good checkpoint: step_00000003`" + RESUME,
           non_finite_loss(5, float("nan"), "nan", 3)),
    _fault("inf_loss", "the loss of step 7 becomes +Inf",
           "exit 2 `error: loss is inf at step 7 ... last good checkpoint: step_00000006`" + RESUME,
           non_finite_loss(7, float("inf"), "inf", 6)),
    _fault("nan_energy_sampling", "`edlm sample` (EDLM, k=2): one candidate energy is NaN at the 2nd IS step",
           "exit 2 `error: ... energies are NaN/Inf`, no samples written; re-run = undisturbed samples",
           non_finite_energy(float("nan"))),
    _fault("inf_energy_sampling", "`edlm sample` (EDLM, k=2): one candidate energy is -Inf at the 2nd IS step",
           "exit 2 `error: ... energies are NaN/Inf`, no samples written; re-run = undisturbed samples",
           non_finite_energy(float("-inf"))),
]


def all_scenarios() -> list[Scenario]:
    from tests.reliability.bad_inputs import BAD_INPUTS
    from tests.reliability.config_and_files import REFUSALS
    from tests.reliability.run_faults import RUN_FAULTS

    return FAULTS + RUN_FAULTS + BAD_INPUTS + REFUSALS


def run_scenario(scenario: Scenario, ws: Workspace) -> tuple[Observation, float]:
    """Run one scenario; an unexpected exception in the harness is a FAIL with its message."""
    start = time.monotonic()
    try:
        observation = scenario.run(ws)
    except Exception as exc:  # noqa: BLE001 - the scorecard must show it, not crash
        observation = Observation(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                  False)
    return observation, time.monotonic() - start

