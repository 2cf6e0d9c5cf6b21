"""Reliability scorecard: run every fault and bad-input scenario on CPU and print one row each.

    python -m tools.fault_report                 # all scenarios (about a minute on 2 CPU cores)
    python -m tools.fault_report --only nan_loss --only rank_dies
    python -m tools.fault_report --list

Prints a Markdown table (scenario | what was done | expected | observed | PASS/FAIL), then the
line ``N passed, M failed``; exits with status 1 if any scenario failed. The scenarios live in
``tests/reliability`` and also run as tests (``pytest tests/reliability``); docs/reliability.md
explains the guarantees they check.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability.faults import all_scenarios, run_scenario
from tests.reliability.harness import Workspace, warm_imports

os.environ.setdefault("OMP_NUM_THREADS", "1")


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this scenario (repeatable, or comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspace (logs of every run)")
    parser.add_argument("--workdir", default=None, help="where to create the scratch workspace (default: $TMPDIR)")
    args = parser.parse_args(argv)

    warm_imports()
    scenarios = all_scenarios()
    wanted = {name for item in args.only for name in item.split(",") if name}
    unknown = wanted - {s.name for s in scenarios}
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; see --list")
    if wanted:
        scenarios = [s for s in scenarios if s.name in wanted]
    if args.list:
        for s in scenarios:
            print(f"{s.name:34s} {s.kind:9s} {s.action}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="edlm_faults_", dir=args.workdir))
    workspace = Workspace(root)
    import torch

    print(f"edlm-dist fault report, {datetime.datetime.now().isoformat(timespec='seconds')}, python "
          f"{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    print("| # | scenario | kind | what was done | expected | observed | result |")
    print("|---|---|---|---|---|---|---|")
    passed = failed = 0
    start = time.monotonic()
    try:
        for number, scenario in enumerate(scenarios, 1):
            observation, seconds = run_scenario(scenario, workspace)
            observed = observation.observed.replace(str(root), "$WS")
            verdict = "PASS" if observation.passed else "FAIL"
            passed += observation.passed
            failed += not observation.passed
            print(f"| {number} | {scenario.name} | {scenario.kind} | {cell(scenario.action)} | "
                  f"{cell(scenario.expected)} | {cell(observed)} ({seconds:.1f} s) | {verdict} |", flush=True)
    finally:
        if args.keep:
            print(f"workspace kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"({passed + failed} scenarios in {time.monotonic() - start:.0f} s; $WS = the scratch workspace)",
          file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
