"""What produced a result: the code version recorded next to samples, metrics and reports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional


def git_commit() -> Optional[str]:
    """The commit of the edlm-dist checkout this code runs from, or None (not a git checkout, no git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
