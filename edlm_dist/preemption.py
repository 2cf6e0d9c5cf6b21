"""Pre-emption signals (SIGTERM, SIGUSR1): recorded from the first line of a command, acted on at safe points.

SLURM sends SIGTERM (or the ``--signal`` of the job, SIGUSR1) before it pre-empts a job or its time runs
out. ``edlm train`` and ``edlm pipeline`` call :func:`install` before anything else (before the config is
read, the data validated or a model built), so such a signal never kills the process: it is recorded,
and the run stops at the next safe point -- after the current optimizer step and its checkpoint during
training, or right away during start-up (nothing new to save) -- with :data:`REQUEUE_EXIT_CODE` (3).
This module imports nothing, so the ``edlm`` command can install the handlers before importing torch.
"""

from __future__ import annotations

import signal

from edlm_dist.errors import REQUEUE_EXIT_CODE

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before preemption / time limit
_received = {"signum": 0}


class Preempted(Exception):
    """A pre-emption signal arrived; the run stopped at a safe point (``where`` says which)."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, signum: int, where: str, step: int = 0):
        super().__init__(f"preempted by signal {signal.Signals(signum).name} {where}")
        self.signum, self.step, self.where = signum, step, where


def _record(signum, _frame) -> None:
    _received["signum"] = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on instead of dying (idempotent)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _record)


def received() -> int:
    """The pre-emption signal received by this process so far (0: none)."""
    return _received["signum"]


def record(signum: int) -> None:
    """Record ``signum`` as if it had been received (a launcher forwarding it, or a test)."""
    _received["signum"] = signum


def stop_if_received(where: str, step: int = 0) -> None:
    """Raise :class:`Preempted` if a signal was received (single process; ranks agree in the trainer)."""
    if _received["signum"]:
        raise Preempted(_received["signum"], where, step)
