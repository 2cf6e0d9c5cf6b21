"""`slurm` tests: whatever a test submitted is cancelled when it ends, passed, failed or timed out, so that
a job left running cannot hold the nodes the next test's jobs wait for."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.fixture(autouse=True)
def _cancel_jobs_submitted_by_the_test(request):
    if request.node.get_closest_marker("slurm") is None or shutil.which("squeue") is None:
        yield
        return
    tmp = str(request.getfixturevalue("tmp_path"))
    yield
    # The test's jobs are those whose batch script lies in its tmp_path (submitit writes it there).
    listed = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, timeout=30)
    jobs = [line.split()[0] for line in listed.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].startswith(tmp)]
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
