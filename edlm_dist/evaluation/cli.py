"""``edlm eval CONFIG [key=value ...] --out DIR``: likelihood, Gen PPL and entropy in one command."""

from __future__ import annotations

import argparse
import logging

from edlm_dist.config.load import load_config
from edlm_dist.evaluation.run import run_evaluation
from edlm_dist.storage.outputs import claim_output


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with claim_output(args.out):
        run_evaluation(cfg, args.out)
    return 0
