"""Throughput of the streaming train loader (tokens/s handed to the training loop).

    python3 -m tools.bench_loader                       # prepares a synthetic set in a temp dir
    python3 -m tools.bench_loader --data DIR --batches 2000 --num-workers 2

Prepares ``--rows`` synthetic rows of ``--seq-len`` tokens (unless ``--data`` is given), then
iterates ``build_train_loader`` for ``--batches`` micro-batches after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.loader import build_train_loader
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import load_manifest


def run(data_dir: Path, args: argparse.Namespace) -> float:
    loader = build_train_loader(data_dir, micro_batch=args.micro_batch, dp_rank=0, dp_world=args.dp_world,
                                seed=1, shuffle_buffer=args.shuffle_buffer, num_workers=args.num_workers)
    batches = iter(loader)
    for _ in range(args.warmup):  # worker start-up and the first shuffle windows
        next(batches)
    tokens = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        tokens += next(batches).numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a prepared folder (default: make a synthetic one)")
    parser.add_argument("--rows", type=int, default=20000, help="synthetic train rows to prepare")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=5000)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--dp-world", type=int, default=1, help="this process reads rank 0's share")
    parser.add_argument("--shuffle-buffer", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        data_dir = args.data
        if data_dir is None:
            data_dir = Path(temp) / "synthetic"
            start = time.perf_counter()
            cfg = SyntheticConfig(train_rows=args.rows, valid_rows=min(args.rows, 1000))
            prepare_data("synthetic", data_dir, seq_len=args.seq_len, shard_rows=args.shard_rows, seed=1,
                         synthetic_cfg=cfg, progress=False)
            print(f"prepared {args.rows} x {args.seq_len} synthetic rows in {time.perf_counter() - start:.1f} s")
        manifest = load_manifest(data_dir)
        rate = run(data_dir, args)
        print(f"data={data_dir} seq_len={manifest['seq_len']} micro_batch={args.micro_batch} "
              f"num_workers={args.num_workers} shuffle_buffer={args.shuffle_buffer} batches={args.batches}")
        print(f"train loader: {rate:,.0f} tokens/s ({rate / manifest['seq_len']:,.0f} rows/s)")


if __name__ == "__main__":
    main()
