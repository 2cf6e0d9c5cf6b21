"""Sharing a block's prefix-cache increment across the ranks of a proposal group: compute or broadcast?

    OMP_NUM_THREADS=1 python -m tools.bench_prefix_share

After block j is committed, every rank of a proposal group needs the same keys/values of its b new tokens
(and log p_AR of the next token) in its AR prefix cache. Either every rank computes them (one AR forward of
B x b tokens against the cached prefix: what block-wise EDLM does when it cannot adopt a scored proposal),
or the rank that scored the committed proposal broadcasts them (layers x 2 x B x heads x b x d floats plus
B x V log-probabilities). Two gloo processes on this machine time both, median [min, max] of repeats, for a
few model sizes; prints a Markdown table (docs/frontier.md, "Sharing the prefix cache").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [  # (hidden, blocks, heads, vocab): the demo model, a mid size, GPT-2-small-like width and depth
    (64, 2, 4, 35), (256, 4, 4, 1024), (768, 12, 12, 50258)]


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _rank(rank: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from edlm_dist.config.schema import ModelConfig
    from edlm_dist.models.build import build_model

    rows = []
    for hidden, blocks, heads, vocab in SIZES:
        torch.manual_seed(0)
        model = build_model("ar", ModelConfig(hidden_size=hidden, n_blocks=blocks, n_heads=heads, cond_dim=16),
                            vocab, args.length).eval()
        tokens = torch.randint(0, vocab - 1, (args.batch, args.length))
        cache = model.new_cache(args.length)
        with torch.no_grad():
            model(tokens[:, : args.prefix], cache=cache)

            def compute():
                model.log_probs(tokens[:, args.prefix : args.prefix + args.block], vocab - 1, cache=cache,
                                append=False, last_only=True)

            increment = [torch.zeros(args.batch, heads, args.block, hidden // heads) for _ in range(2 * blocks)]
            increment.append(torch.zeros(args.batch, vocab))

            def broadcast():
                for tensor in increment:
                    dist.broadcast(tensor, src=0)

            compute_s, broadcast_s = _timed(compute, args.repeats), _timed(broadcast, args.repeats)
        mib = sum(t.numel() for t in increment) * 4 / 2**20
        rows.append((hidden, blocks, vocab, mib, compute_s, broadcast_s))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(args, queue), nprocs=2, join=True)
    rows = queue.get()
    fmt = lambda v: f"{1e3 * statistics.median(v):.2f} [{1e3 * min(v):.2f}, {1e3 * max(v):.2f}]"  # noqa: E731
    print(f"B = {args.batch} rows, prefix {args.prefix}, block b = {args.block}, {args.repeats} repeats, 2 gloo ranks, "
          f"torch {torch.__version__}\n")
    print("| hidden | blocks | vocab | increment MiB | compute per rank, ms | broadcast from one rank, ms |")
    print("|---|---|---|---|---|---|")
    for hidden, blocks, vocab, mib, compute_s, broadcast_s in rows:
        print(f"| {hidden} | {blocks} | {vocab} | {mib:.2f} | {fmt(compute_s)} | {fmt(broadcast_s)} |")


if __name__ == "__main__":
    main()
