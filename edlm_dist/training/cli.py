"""``edlm train CONFIG [key=value ...] --out DIR``."""

from __future__ import annotations

import argparse

from edlm_dist import preemption
from edlm_dist.config.load import load_config
from edlm_dist.storage.outputs import claim_output
from edlm_dist.training.metrics_logger import console_logger
from edlm_dist.training.trainer import run_training


def cli_main(args: argparse.Namespace) -> int:
    preemption.install()  # before the config, the data or the model: a signal in start-up is a clean exit 3
    cfg = load_config(args.config, args.overrides)
    console_logger()  # before the output lock: its stale-lock warning must reach the console
    with claim_output(args.out):
        return run_training(cfg, args.out)
