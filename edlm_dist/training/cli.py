"""``edlm train CONFIG [key=value ...] --out DIR``."""

from __future__ import annotations

import argparse

from edlm_dist.config.load import load_config
from edlm_dist.errors import REQUEUE_EXIT_CODE, ConfigError
from edlm_dist.parallel.runtime import shutdown_parallel
from edlm_dist.training.trainer import Preempted, Trainer


def cli_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty; run `edlm prepare-data --source synthetic --out DATA` and pass data.dir=DATA")
    trainer = None
    try:
        trainer = Trainer(cfg, args.out)
        trainer.install_signal_handlers()
        trainer.train()
    except Preempted as exc:
        print(f"edlm train: {exc}; exiting with {REQUEUE_EXIT_CODE} so the launcher requeues the job")
        return REQUEUE_EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_parallel()
    return 0
