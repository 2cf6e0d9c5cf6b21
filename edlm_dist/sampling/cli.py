"""``edlm sample CONFIG [key=value ...] --out DIR``: MDLM or EDLM samples -> samples.jsonl + summary.json."""

from __future__ import annotations

import argparse
import logging

from edlm_dist.config.load import load_config
from edlm_dist.sampling.run import run_sampling
from edlm_dist.storage.outputs import claim_output


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with claim_output(args.out):
        run_sampling(cfg, args.out, proposal_parallel=cfg.sample.proposal_parallel)
    return 0
