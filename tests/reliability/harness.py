"""Harness of the reliability scenarios: forked ``edlm`` runs, a tiny shared workspace, references.

Every scenario drives the real entry point, ``edlm_dist.cli.main(argv)``, in a *forked* child
process: the child inherits the already-imported torch/DeepSpeed/Megatron (a fresh interpreter
pays ~5 s of imports on the 2-core CI machine), gets its own stdout/stderr files, may install a
fault (a monkeypatch that only lives in that child), and exits with the CLI's exit status. A
handful of scenarios also run ``python -m edlm_dist.cli`` as a real subprocess to show the
interpreter-level behaviour (``error: ...`` line, exit status 2, no traceback).

The parent never initialises torch.distributed, so it can fork again and again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS, SAVE_EVERY = 8, 3  # checkpoints at steps 3, 6 and 8
RUN_TIMEOUT_S = 600.0  # a run still going after this long counts as hung (seconds alone; minutes on a shared box)
TRACKED_METRICS = ("loss", "val_loss", "grad_norm")
DISPLAY_ALIASES: dict[str, str] = {}  # long scratch paths -> short names in observations ($WS)

TINY_CONFIG = """\
# Tiny run of the reliability scenarios (docs/reliability.md): seconds on one CPU core.
model: {{hidden_size: 32, n_blocks: 2, n_heads: 4, cond_dim: 16, dropout: 0.1}}
data: {{dir: {data}, seq_len: 32, shard_rows: 64, shuffle_buffer: 32}}
train: {{steps: {steps}, global_batch: 16, micro_batch: 8, lr: 3.0e-3, warmup_steps: 2, log_every: 1,
        val_every: 4, val_batches: 1, save_every: {save_every}, ema: 0.9, precision: fp32}}
sample: {{sampler: edlm, energy: oracle, steps: 4, k: 2, window: 1.0, num_samples: 4, batch_size: 2}}
logging: {{progress: false}}
"""


@dataclass(frozen=True)
class Observation:
    """What a scenario saw, and whether that is the expected outcome."""

    observed: str
    passed: bool


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "fault" | "bad input"
    action: str  # what is done
    expected: str  # the promised outcome
    run: Callable[["Workspace"], Observation] = field(repr=False)
    ranks: int = 1  # processes it starts at once (2: a multi-rank scenario)


@dataclass
class ChildResult:
    """Outcome of one forked or spawned ``edlm`` process."""

    exit_code: Optional[int]  # negative: killed by that signal; None: hung (killed by the harness)
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    @property
    def has_traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    def describe(self, limit: int = 200) -> str:
        if self.exit_code is None:
            return f"still running after {self.seconds:.0f} s (hung; killed by the harness)"
        if self.exit_code < 0:
            return f"killed by {signal.Signals(-self.exit_code).name}"
        text = f"exit {self.exit_code} after {self.seconds:.1f} s"
        if self.has_traceback:
            last = [line for line in self.stderr.splitlines() if line.strip()][-1]
            return f"{text} with a traceback ending '{clip(last, limit)}'"
        if self.error_lines:
            return f"{text}: {clip(self.error_lines[-1], limit)}"
        return text


def clip(text: str, limit: int) -> str:
    for path, alias in DISPLAY_ALIASES.items():
        text = text.replace(path, alias)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warm_imports() -> None:
    """Import Megatron/DeepSpeed once so that every forked child inherits them."""
    import warnings

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # the forked children may still use CUDA
    os.environ.setdefault("WANDB_MODE", "disabled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        torch.set_num_threads(1)
        import edlm_dist.parallel.deepspeed_engine  # noqa: F401  (DeepSpeed on the right accelerator, for the children)
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401


def _child(target: Callable[[], int], env: dict[str, Optional[str]], stdout_path: Path, stderr_path: Path) -> None:
    """Body of a forked child: own output files, own env, the target's exit status; never returns."""
    code = 1
    out = err = None
    try:
        out, err = open(stdout_path, "w", buffering=1), open(stderr_path, "w", buffering=1)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err  # pytest replaces them with capture objects in the parent
        for logger in (logging.getLogger(), logging.getLogger("edlm")):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    handler.setStream(err)
        for key, value in env.items():  # None: remove the variable (a single process has no RANK)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        code = int(target() or 0)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught exception looks exactly as it would to a user
        traceback.print_exc()
        code = 1
    finally:
        for stream in (out, err):
            if stream is not None:
                stream.flush()
        os._exit(code & 0xFF)  # skip interpreter teardown (gloo's abort-at-exit flake, STACK_NOTES)


Target = tuple[Callable[[], int], dict[str, Optional[str]]]  # (function returning an exit status, env changes)


def fork_children(targets: list[Target], logs: Path, *, timeout: float = RUN_TIMEOUT_S,
                  primary: Optional[int] = None,
                  grace: float = 2.0) -> list[ChildResult]:
    """Run each ``(target, env)`` in a forked child and wait for all of them (at most ``timeout`` s).

    With ``primary``, the others get ``grace`` seconds once the primary child has exited and are
    then killed (a frozen peer never exits by itself).
    """
    logs.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    paths, pids = [], []
    for index, (target, env) in enumerate(targets):
        tag = f"{int(time.time() * 1e6)}_{index}"
        paths.append((logs / f"{tag}.out", logs / f"{tag}.err"))
        pid = os.fork()
        if pid == 0:
            _child(target, env, *paths[-1])
        pids.append(pid)
    start = time.monotonic()
    codes: dict[int, Optional[int]] = {}
    ends: dict[int, float] = {}
    primary_end = None
    while len(codes) < len(pids):
        for index, pid in enumerate(pids):
            if index in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[index], ends[index] = os.waitstatus_to_exitcode(status), time.monotonic() - start
                if index == primary:
                    primary_end = time.monotonic()
        now = time.monotonic()
        overdue = now - start > timeout or (primary_end is not None and now - primary_end > grace)
        if overdue and len(codes) < len(pids):
            for index, pid in enumerate(pids):
                if index not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[index], ends[index] = None, now - start
        time.sleep(0.02)
    return [ChildResult(codes[i], paths[i][0].read_text(errors="replace"), paths[i][1].read_text(errors="replace"),
                        ends[i]) for i in range(len(pids))]


def _cli_target(argv: list[str], inject: Optional[Callable[[], None]]) -> Callable[[], int]:
    def target() -> int:
        if inject is not None:
            inject()  # the fault lives only in this child
        from edlm_dist.cli import main

        return main(argv)

    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(argv: list[str], logs: Path, *, inject: Optional[Callable[[], None]] = None,
            env: Optional[dict[str, str]] = None, timeout: float = RUN_TIMEOUT_S) -> ChildResult:
    """``edlm ARGV`` in one forked child (a single process: no RANK/WORLD_SIZE unless ``env`` sets them)."""
    single: dict[str, Optional[str]] = {key: None for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    single.update(env or {})
    return fork_children([(_cli_target(argv, inject), single)], logs, timeout=timeout)[0]


def run_cli_ranks(argv: list[str], world: int, logs: Path, *, inject: Optional[dict[int, Callable[[], None]]] = None,
                  timeout: float = RUN_TIMEOUT_S, primary: Optional[int] = None) -> list[ChildResult]:
    """``edlm ARGV`` on ``world`` local ranks (gloo), as torchrun would start them."""
    port = str(free_port())
    targets = []
    for rank in range(world):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        targets.append((_cli_target(argv, (inject or {}).get(rank)), env))
    return fork_children(targets, logs, timeout=timeout, primary=primary)


def run_cli_subprocess(argv: list[str], timeout: float = RUN_TIMEOUT_S) -> ChildResult:
    """``python -m edlm_dist.cli ARGV`` in a fresh interpreter: exactly what a user types."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO_ROOT))
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "edlm_dist.cli", *argv], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return ChildResult(None, str(exc.stdout or ""), str(exc.stderr or ""), time.monotonic() - start)
    return ChildResult(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


# ----------------------------------------------------------------------------------- run folders
def read_logged(out: Path) -> list[tuple[int, str, object]]:
    """Every logged (step, metric, value) of a run, in file order (a resumed run repeats some steps)."""
    from edlm_dist.training.metrics_logger import read_metrics

    return [(row["step"], key, row[key]) for row in read_metrics(out) for key in TRACKED_METRICS if key in row]


def weights_digest(out: Path) -> Optional[str]:
    """sha256 of the exported raw and EMA weights (None when the run did not finish)."""
    files = [out / "weights" / name for name in ("model.safetensors", "ema.safetensors")]
    if not all(path.is_file() for path in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def latest_tag(out: Path) -> Optional[str]:
    pointer = out / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to show that a refused command changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def compare_to_reference(out: Path, reference: dict) -> tuple[bool, str]:
    """Bit-for-bit: every logged loss / val loss / grad norm and the final weights."""
    expected = {(step, key): value for step, key, value in reference["logged"]}
    got = read_logged(out)
    for step, key, value in got:
        if (step, key) not in expected or value != expected[(step, key)]:
            return False, f"step {step} {key}={value!r} but the uninterrupted run logged {expected.get((step, key))!r}"
    missing = sorted(set(expected) - {(step, key) for step, key, _ in got})
    if missing:
        return False, f"the resumed run never logged {missing[:3]}"
    if weights_digest(out) != reference["digest"]:
        return False, "the final weights differ from the uninterrupted run's"
    repeated = len(got) - len({(step, key) for step, key, _ in got})
    return True, (f"resumed: all {len(expected)} logged losses/val losses/grad norms ({repeated} logged twice) "
                  "and the final weights equal the uninterrupted run's bit for bit")


# ----------------------------------------------------------------------------------- workspace
class Workspace:
    """A scratch folder with the tiny prepared data, the tiny config and cached reference runs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        DISPLAY_ALIASES[str(self.root)] = "$WS"
        self.logs = self.root / "logs"
        self._data: Optional[Path] = None
        self._references: dict[str, dict] = {}
        self._counter = 0

    @property
    def data(self) -> Path:
        if self._data is None:
            from edlm_dist.config.schema import SyntheticConfig
            from edlm_dist.data.prepare import prepare_data

            # 112 training rows = 7 steps of 16: the resumed runs also cross an epoch boundary.
            self._data = self.root / "data"
            prepare_data("synthetic", self._data, seq_len=32, tokenizer_spec="synthetic", shard_rows=64, seed=1,
                         synthetic_cfg=SyntheticConfig(train_rows=112, valid_rows=32), progress=False)
        return self._data

    @property
    def config(self) -> str:
        path = self.root / "tiny.yaml"
        if not path.is_file():
            path.write_text(TINY_CONFIG.format(data=self.data, steps=TRAIN_STEPS, save_every=SAVE_EVERY))
        return str(path)

    def fresh(self, name: str) -> Path:
        """A new, not yet existing path under the workspace."""
        self._counter += 1
        return self.root / f"{name}_{self._counter:03d}"

    def train(self, out: Path, *overrides: str, world: int = 1, inject: Optional[dict[int, Callable[[], None]]] = None,
              timeout: float = RUN_TIMEOUT_S, primary: Optional[int] = None) -> list[ChildResult]:
        """``edlm train tiny.yaml --out OUT [overrides]`` on ``world`` ranks; faults per rank in ``inject``."""
        argv = ["train", self.config, "--out", str(out), *overrides]
        if world == 1:
            return [run_cli(argv, self.logs, inject=(inject or {}).get(0), timeout=timeout)]
        return run_cli_ranks(argv, world, self.logs, inject=inject, timeout=timeout, primary=primary)

    def reference(self, world: int = 1) -> dict:
        """The uninterrupted run every fault is compared with (trained once per workspace)."""
        key = f"train_w{world}"
        if key not in self._references:
            out = self.root / f"reference_w{world}"
            results = self.train(out, world=world)
            if any(r.exit_code != 0 for r in results):
                raise RuntimeError(f"the uninterrupted reference run failed: {results[0].describe()}")
            self._references[key] = {"out": out, "logged": read_logged(out), "digest": weights_digest(out)}
        return self._references[key]

    def sample(self, out: Path, *overrides: str, inject: Optional[Callable[[], None]] = None) -> ChildResult:
        """``edlm sample tiny.yaml --out OUT`` with the reference run as the diffusion model (EDLM, oracle)."""
        argv = ["sample", self.config, "--out", str(out), f"sample.diffusion_ckpt={self.reference()['out']}",
                *overrides]
        return run_cli(argv, self.logs, inject=inject)

    def sample_reference(self) -> list[list[int]]:
        if "sample" not in self._references:
            out = self.root / "reference_samples"
            result = self.sample(out)
            if result.exit_code != 0:
                raise RuntimeError(f"the reference sampling run failed: {result.describe()}")
            self._references["sample"] = {"tokens": sample_tokens(out)}
        return self._references["sample"]["tokens"]


def sample_tokens(out: Path) -> Optional[list[list[int]]]:
    import json

    path = out / "samples.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines() if line.strip()]
