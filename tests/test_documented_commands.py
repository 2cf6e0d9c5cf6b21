"""Every command in README.md and docs/*.md runs as written, with tiny overrides.

What is executed: every line of every fenced ```bash block (``\\`` continuations joined, trailing ``# ...``
comments dropped), document by document in the order of :data:`DOCUMENTS`, in one scratch folder that
holds links to the repository (so a document's commands may build on each other: prepare, then train,
then export). A command identical to one already run (README.md and docs/data.md share the "your own
text" steps) is run once: it would only redo the same work into the same folder. ```text / ```python /
```console blocks are illustrations and are not run; a command that cannot run here belongs in one of
those, next to a runnable twin (e.g. a SLURM submission next to its ``--dry-run``).

How a command is shrunk, and nothing else is changed:

* ``edlm ...`` runs ``edlm_dist.cli.main`` (the console script's entry point) in a forked child of the test
  process, in the scratch folder, with its own stdout/stderr and exit status (tests/reliability/harness.py):
  the child inherits the already-imported torch/DeepSpeed/Megatron instead of paying seconds of imports per
  command. ``torchrun`` runs as ``python -m torch.distributed.run`` and other ``python ...`` commands as
  real subprocesses (their ranks are fresh interpreters, as a user's are);
* ``--nproc 8`` / ``--nproc-per-node 8`` become 2 (two CPU cores);
* training, pipeline and synthetic-data commands get :data:`TINY` overrides appended (few steps, a small
  model, few rows); key=value overrides given later win, so the documented values stay in force
  except for these sizes.

The commands in :data:`NOT_RUN` (prefixes) and :data:`NOT_RUN_EXACT` are named with the reason they are not
run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability.harness import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
NOT_RUN = {  # command prefix -> why it is not executed by this test
    "make demo": "the main job itself (minutes); tests/pipeline runs the same pipeline on tiny settings",
    "make test": "the test suite, which contains this test",
    "python -m pytest": "a part of the test suite, which contains this test",
}
NOT_RUN_EXACT = {  # whole commands not run, and why
    "python -m tools.fault_report": "the full scorecard: the scenarios tests/reliability runs",
    "python -m tools.fault_report --only nan_loss,rank_dies": "two scenarios that tests/reliability runs (~5 min "
                                                              "of the 2-core machine here)",
}
TRAIN_TINY = ["train.steps=2", "train.log_every=1", "train.val_every=2", "train.val_batches=1", "train.save_every=2",
              "model.hidden_size=32", "model.n_blocks=1", "model.cond_dim=16", "logging.progress=false"]
TINY = {
    "train": TRAIN_TINY,
    "pipeline": TRAIN_TINY + ["pipeline.mdlm_steps=2", "pipeline.ar_steps=2", "pipeline.nce_steps=2",
                              "pipeline.num_samples=2", "pipeline.step_counts=[2]", "sample.batch_size=2",
                              "sample.k=2", "eval.max_batches=1", "eval.batch_size=4", "eval.n_negatives=2"],
    "prepare-synthetic": ["data.synthetic.train_rows=256", "data.synthetic.valid_rows=64", "logging.progress=false"],
}


def documented_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of one Markdown document, in order."""
    commands, block = [], None
    for line in text.splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            block = fence[3:].strip() if block is None else None
            continue
        if block == "bash":
            commands.append(line)
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(commands))
    out = []
    for line in joined.splitlines():
        code = re.split(r"\s+#\s", " " + line.strip() + " ", maxsplit=1)[0].strip()
        if code and not code.startswith("#"):
            out.append(code)
    return out


def skipped_reason(command: str) -> str | None:
    if command in NOT_RUN_EXACT:
        return NOT_RUN_EXACT[command]
    return next((why for prefix, why in NOT_RUN.items() if command == prefix or command.startswith(prefix + " ")),
                None)


def shrunk(command: str) -> list[str]:
    """The argv actually run for a documented command (see the module docstring)."""
    argv = shlex.split(command)
    if argv[0] == "edlm":
        argv = [sys.executable, "-m", "edlm_dist.cli", *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--nproc", "--nproc-per-node") and argv[i + 1] == "8":
            argv[i + 1] = "2"
    words = set(argv)
    if "train" in words or "launchers/local.py" in words:
        argv += TINY["train"]
    elif "pipeline" in words:
        argv += TINY["pipeline"]
    elif "prepare-data" in words and "synthetic" in words:
        argv += TINY["prepare-synthetic"]
    return argv


def test_the_extraction_finds_the_documented_commands():
    commands = documented_commands(
        "text\n```bash\nedlm train a.yaml --out x \\\n    b=1   # note\n# comment\n```\n```text\nnot run\n```\n")
    assert commands == ["edlm train a.yaml --out x b=1"]
    assert shrunk("torchrun --nproc-per-node 8 -m edlm_dist.cli train c.yaml --out y")[:5] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    readme = documented_commands((REPO / "README.md").read_text())
    assert "make demo" in readme and any(c.startswith("edlm pipeline configs/text_demo.yaml") for c in readme)


def _in_folder(folder: Path):
    """The forked child's set-up before ``edlm_dist.cli.main``: the scratch folder, one thread (like a fresh
    ``OMP_NUM_THREADS=1`` process)."""

    def enter() -> None:
        os.chdir(folder)
        torch.set_num_threads(1)

    return enter


def run_documented(argv: list[str], folder: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Exit status and stderr of one shrunk command run in ``folder``."""
    if argv[:3] == [sys.executable, "-m", "edlm_dist.cli"]:
        done = run_cli(argv[3:], folder / ".logs", inject=_in_folder(folder), env=env, timeout=600)
        return done.exit_code, done.stderr
    done = subprocess.run(argv, cwd=folder, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


@pytest.mark.slow  # ~60 CPU-seconds, 3/4 of them the two 2-rank launches (fresh interpreters); `make test` runs it
def test_every_documented_command_runs_as_written(tmp_path):
    for name in ("configs", "launchers", "tools", "tests", "edlm_dist"):  # the repository, as a user's checkout
        (tmp_path / name).symlink_to(REPO / name)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    ran: set[str] = set()
    for document in DOCUMENTS:
        for command in documented_commands((REPO / document).read_text()):
            if skipped_reason(command) or command in ran:
                continue
            ran.add(command)
            code, stderr = run_documented(shrunk(command), tmp_path, env)
            assert code == 0, f"{document}: `{command}` exited {code}:\n{stderr[-3000:]}"
    assert len(ran) >= 10  # the extraction found the documents' commands
