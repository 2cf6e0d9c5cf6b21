"""The ``edlm`` command: prepare-data, train, sample, eval, pipeline, export-hf.

Each subcommand parses its arguments and calls its package's ``cli_main``, which loads and validates
the config up front and hands over to the module that does the work. Any :class:`EdlmError` is
printed as one line (``error: ...``) with exit status 2 — users never see a traceback for bad input.
A subcommand's package is imported only when that subcommand runs, so ``edlm --help`` and a bad
argument answer at once instead of after seconds of torch/DeepSpeed/Megatron imports.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Sequence

from edlm_dist import preemption
from edlm_dist.errors import ERROR_EXIT_CODE, REQUEUE_EXIT_CODE, EdlmError
from edlm_dist.preemption import Preempted


def _prepare_data(args: argparse.Namespace) -> int:
    from edlm_dist.data.cli import cli_main

    return cli_main(args)


def _train(args: argparse.Namespace) -> int:
    preemption.install()  # before torch is imported: SIGTERM from here on means exit 3, never a kill
    from edlm_dist.training.cli import cli_main

    return cli_main(args)


def _sample(args: argparse.Namespace) -> int:
    from edlm_dist.sampling.cli import cli_main

    return cli_main(args)


def _eval(args: argparse.Namespace) -> int:
    from edlm_dist.evaluation.cli import cli_main

    return cli_main(args)


def _pipeline(args: argparse.Namespace) -> int:
    preemption.install()
    from edlm_dist.pipeline.cli import cli_main

    return cli_main(args)


def _export_hf(args: argparse.Namespace) -> int:
    from edlm_dist.artifacts.cli import cli_main

    return cli_main(args)


class Subcommand(NamedTuple):
    help: str
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "prepare-data": Subcommand("tokenize a corpus (or generate the synthetic language) into WebDataset shards + "
                               "manifest.json", _prepare_data),
    "train": Subcommand("train an MDLM diffusion model, an AR model or an NCE energy model (DeepSpeed ZeRO + "
                        "Megatron TP)", _train),
    "sample": Subcommand("sample with MDLM (ddpm / ddpm_cache) or EDLM importance sampling (AR, coAR, NCE, oracle "
                         "energies)", _sample),
    "eval": Subcommand("likelihood bounds, generative perplexity and entropy; writes metrics.json and a Markdown "
                       "table", _eval),
    "pipeline": Subcommand("the whole EDLM story end to end: data, MDLM/AR/NCE training, sampling, evaluation, "
                           "report", _pipeline),
    "export-hf": Subcommand("export a checkpoint to a Hugging Face folder (safetensors + config + tokenizer)",
                            _export_hf),
}


# The config sections each subcommand reads: `edlm <command> --help` lists their keys (config/describe.py).
CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare-data": ("data", "logging"),
    "train": ("model", "data", "parallel", "train", "logging"),
    "sample": ("data", "parallel", "sample", "logging"),
    "eval": ("data", "parallel", "sample", "eval", "logging"),
    "pipeline": ("model", "data", "parallel", "train", "sample", "eval", "pipeline", "logging"),
}
OUT_HELP = {
    "train": "run folder (created; the run resumes from it when it holds a checkpoint)",
    "pipeline": "output folder (created; finished stages are reused and an interrupted one resumes)",
    "sample": "output folder for samples.jsonl and summary.json (created; existing samples are replaced)",
    "eval": "output folder for metrics.json and metrics.md (created; existing results are replaced)",
}


def _add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("config", help="YAML config file (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100 parallel.tp=2")
    parser.add_argument("--out", required=True, help=OUT_HELP[name])


def _config_epilog(name: str) -> str | None:
    """The keys (type, default, range, meaning) of the config sections ``name`` reads, from the schema."""
    sections = CONFIG_SECTIONS.get(name)
    if not sections:
        return None
    from edlm_dist.config.describe import describe_keys  # the schema only: no torch import for --help

    return ("config keys (set in the YAML file or as key=value overrides; generated from "
            "edlm_dist/config/schema.py):\n" + describe_keys(sections))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edlm",
        description="edlm-dist: Energy-Based Diffusion Language Models at cluster scale.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, epilog=_config_epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "prepare-data":
            p.add_argument("--source", required=True, choices=["synthetic", "text", "jsonl", "hf", "text8", "pydoc"],
                           help="pydoc: CPython's own help topics (465 KB of English, ships with Python)")
            p.add_argument("--input", help="input file or folder (text, jsonl, text8, or a saved HF dataset)")
            p.add_argument("--config", dest="config", default=None, help="optional YAML config (data section is used)")
            p.add_argument("--seq-len", type=int, default=None, help="row length L (default: data.seq_len)")
            p.add_argument("--tokenizer", default=None, help="char | byte (learnt from the training text) | gpt2 | "
                           "text8 | synthetic | hf:NAME | a tokenizer folder (default: data.tokenizer)")
            p.add_argument("--tokenizer-vocab", type=int, default=None, help="size of a learnt char/byte "
                           "tokenizer; 0 = every character / the 256 bytes (default: data.tokenizer_vocab)")
            p.add_argument("--max-unk-rate", type=float, default=None, help="refuse a split with a larger share of "
                           "[UNK] tokens (default: data.max_unk_rate = 0.01; 1 accepts any)")
            p.add_argument("--no-wrap", action="store_true", help="one document per row instead of MDLM wrapping")
            p.add_argument("--shard-rows", type=int, default=None, help="rows per .tar shard")
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--text-field", default="text", help="jsonl/hf field holding the text")
            p.add_argument("--hf-name", default=None, help="HF dataset name (online) for --source hf")
            p.add_argument("--valid-docs", type=int, default=None, help="last N documents form validation (OWT: 100000)")
            p.add_argument("--hf-split", default="train", help="hf: the split to read documents from")
            p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
            p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
            p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
        elif name == "export-hf":
            p.add_argument("checkpoint", help="a run directory or checkpoint directory written by `edlm train`")
            p.add_argument("--out", required=True, help="output folder for the Hugging Face export")
            p.add_argument("--use-ema", action="store_true", default=True, help="export EMA weights (default)")
            p.add_argument("--no-ema", dest="use_ema", action="store_false", help="export the raw weights")
        else:
            _add_run_arguments(p, name)
        if name == "sample":
            p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                           help="a prompt to continue, or an infilling template like \"The [MASK:12] of the "
                           "[MASK:5]\" (repeatable; sample.num_samples samples per prompt)")
            p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                           help="a token-id template, '_' or [MASK:n] for generated positions, e.g. \"5 12 _ _ 7\" "
                           "(repeatable)")
            p.add_argument("--prompts-file", default=None, metavar="FILE",
                           help="JSONL ({\"prompt\"|\"infill\"|\"ids\": ...} per line) or one template per line")
            p.add_argument("--show", type=_count, default=0, metavar="N",
                           help="print the first N samples, generated spans in [[ ]]")
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after --out too (`edlm train cfg.yaml --out runs/x train.steps=5`).
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    if not args.command:
        parser.print_help()
        return ERROR_EXIT_CODE
    try:
        result = SUBCOMMANDS[args.command].run(args)
    except EdlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Preempted as exc:  # `edlm pipeline` (train handles its own): stopped at a safe point, requeue
        print(f"edlm {args.command}: {exc}; exiting with {REQUEUE_EXIT_CODE} so the launcher requeues the job")
        return REQUEUE_EXIT_CODE
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
