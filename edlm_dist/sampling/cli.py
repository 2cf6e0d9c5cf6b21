"""``edlm sample CONFIG [key=value ...] --out DIR [--prompt TEXT ...] [--show N]``: MDLM, EDLM or AR samples
-> samples.jsonl + summary.json (docs/sampling.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edlm_dist.artifacts.samples import read_samples_jsonl, samples_path
from edlm_dist.config.load import load_config, validate_config
from edlm_dist.sampling.conditioning import IDS_PREFIX, format_samples
from edlm_dist.sampling.run import run_sampling
from edlm_dist.storage.outputs import claim_output


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    prompts = [*getattr(args, "prompt", []), *(IDS_PREFIX + ids for ids in getattr(args, "prompt_ids", []))]
    cfg.sample.prompts = [*cfg.sample.prompts, *prompts]
    cfg.sample.prompts_file = getattr(args, "prompts_file", None) or cfg.sample.prompts_file
    validate_config(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with claim_output(args.out):
        summary = run_sampling(cfg, args.out, proposal_parallel=cfg.sample.proposal_parallel)
    if getattr(args, "show", 0) and summary is not None:
        print(format_samples(read_samples_jsonl(samples_path(Path(args.out))), args.show))
    return 0
