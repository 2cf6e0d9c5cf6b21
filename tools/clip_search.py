"""BD3-LM's data-driven clipped schedule: which training interval t ~ U[β, ω) gives the least noisy loss?

    OMP_NUM_THREADS=2 python tools/clip_search.py --model runs/b4 --data runs/data32
    python tools/clip_search.py --model runs/b4 --data runs/data32 --widths 0.5 0.7 0.9 1.0 --delta 0.05

For a trained (block-causal) diffusion model and validation rows, every candidate interval [β, β + w) (w in
``--widths``, β on a ``--delta`` grid inside [ε_s, 1]) gets ``--draws`` independent micro-batch losses of the
training objective with that clip (MDLMObjective.loss: per-block times, masks, 1/t weights); the interval with
the smallest variance of that loss is BD3-LM's choice (Arriola et al. 2025, §5: the variance of the gradient
estimator is what hurts small blocks; they use the loss variance on validation batches as its proxy). The
full interval [1e-3, 1) is the NELBO's own estimator and is always listed. Prints a table; tests never time.
"""

from __future__ import annotations

import argparse

import torch

from edlm_dist.data.loader import build_eval_loader
from edlm_dist.objectives.schedule import NELBO_SAMPLING_EPS
from edlm_dist.training.objective_steps import MDLMObjective
from edlm_dist.artifacts.weights import load_trained_model


def intervals(widths: list[float], delta: float) -> list[tuple[float, float]]:
    out = [(NELBO_SAMPLING_EPS, 1.0)]
    for width in widths:
        low = 1.0 - width
        while low >= -1e-9:
            out.append((max(round(low, 6), NELBO_SAMPLING_EPS), round(low + width, 6)))
            low -= delta
    return [out[0]] + sorted(set(out[1:]) - {out[0]})  # the NELBO's own interval first: the reference


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the --out folder of an `edlm train` MDLM/block run")
    parser.add_argument("--data", required=True, help="the prepared data folder (its valid split is read)")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32, help="rows per micro-batch loss (the training micro-batch)")
    parser.add_argument("--draws", type=int, default=64, help="micro-batch losses per interval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, meta, cfg = load_trained_model(args.model, expect_kind="dit")
    objective = MDLMObjective(cfg, meta["vocab_size"], meta["mask_id"], 1)
    rows = torch.cat(list(build_eval_loader(args.data, "valid", micro_batch=256, max_rows=args.batch * args.draws)))
    batches = rows[: args.batch * (len(rows) // args.batch)].view(-1, args.batch, rows.shape[1])
    print(f"model {args.model} (block_size {getattr(model, 'block_size', None)}), {len(batches)} batches of "
          f"{args.batch} validation rows")
    print("| β | ω | mean loss | std of a micro-batch loss | variance ratio to [1e-3, 1) |")
    print("|---|---|---|---|---|")
    reference = None
    for low, high in intervals(args.widths, args.delta):
        generator = torch.Generator().manual_seed(args.seed)
        losses = torch.tensor([objective.loss(model, batch, generator, time_range=(low, high))[0].item()
                               for batch in batches])
        var = losses.var().item()
        reference = var if reference is None else reference
        print(f"| {low:g} | {high:g} | {losses.mean():.4f} | {var ** 0.5:.4f} | {var / reference:.3f} |")


if __name__ == "__main__":
    main()
