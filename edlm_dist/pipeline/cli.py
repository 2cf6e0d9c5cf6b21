"""``edlm pipeline CONFIG [key=value ...] --out DIR``: the whole EDLM story on one machine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edlm_dist.config.load import load_config
from edlm_dist.evaluation.report import PIPELINE_REPORT
from edlm_dist.parallel.runtime import shutdown_parallel
from edlm_dist.pipeline.run import run_pipeline
from edlm_dist.storage.outputs import claim_output


def cli_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.overrides)
    with claim_output(args.out):
        try:
            results = run_pipeline(cfg, args.out)
        finally:
            shutdown_parallel()
    print((Path(args.out) / PIPELINE_REPORT).read_text())
    return 0 if results else 1
