"""``edlm train CONFIG [key=value ...] --out DIR``."""

from __future__ import annotations

import argparse

from edlm_dist.config.load import load_config
from edlm_dist.errors import ConfigError


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty; run `edlm prepare-data --source synthetic --out DATA` and pass data.dir=DATA")
    from edlm_dist.parallel.runtime import shutdown_parallel
    from edlm_dist.training.trainer import train

    try:
        train(cfg, args.out)
    finally:
        shutdown_parallel()
    return 0
