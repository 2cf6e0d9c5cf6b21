"""How well does a learned energy rank EDLM's proposals, measured against the exact synthetic language?

    OMP_NUM_THREADS=1 python3 -m tools.diagnose_energy --runs runs/demo          # after `make demo`

For sequences of the true language, masked at rate t (position 0, the BOS, stays), the trained
denoiser proposes k candidates x0^(j) ~ mu_theta(. | x_t) (what one EDLM step draws). Every energy in
``--energies`` is ``-log p(x0) + log mu_theta(x0 | x_t)`` with p = the AR model, the coAR variant, or the
exact language (the oracle); the diffusion term is the same for all, so they differ only in how they
score the candidates. Per masking rate, averaged over the groups of k:

* ``corr``: Pearson correlation of log p with the oracle's log p_true over the k candidates of a group;
* ``gap``: mean (log p - log p_true) per candidate, nats (0 for a calibrated model);
* ``TV``: total variation between this energy's and the oracle's importance-resampling distributions
  over the k candidates (weights ∝ exp(-E / tau), paper Eq. 8; ``--temperature`` sets the AR's tau);
* ``gain``: E[log p_true(chosen)] - mean_j log p_true(x0^(j)), nats per sequence: how much the resampled
  candidate improves on a plain MDLM draw under the exact likelihood; ``recovered`` = gain / oracle's gain.

Prints a Markdown table (tests never time things; this script measures nothing about speed).

``--coverage``: instead, for block-wise sampling with one position per block (b = 1), how often can k proposals
from the denoiser's marginal mu_theta(x^i | clean prefix, masked future) contain a token the language allows at
all? Per position i of true rows: the mass m_i of mu_theta on the language's support there (the tokens with
p(x^i | prefix) > 1e-3), and P(all k proposals miss it) = E[(1 - m_i)^k]: the rate at which even the exact
energy must commit an off-support token (about 12.7 nats each on the default language).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edlm_dist.errors import EdlmError
from edlm_dist.pipeline.run import load_pipeline_models
from edlm_dist.sampling.importance import log_importance_weights


def _candidates(denoiser, x0: torch.Tensor, rate: float, k: int, mask_id: int, generator: torch.Generator):
    """(x_t (n, L), candidates (n, k, L), log_mu at the candidates (n, k)) for one masking rate."""
    n, length = x0.shape
    masked = torch.rand((n, length), generator=generator) < rate
    masked[:, 0] = False
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    log_mu = denoiser(x_t, torch.full((n,), rate)).to(torch.float64)  # (n, L, V); carried-over rows are one-hot
    draws = torch.multinomial(log_mu.exp().reshape(n * length, -1), k, replacement=True, generator=generator)
    candidates = draws.reshape(n, length, k).permute(0, 2, 1)
    candidates = torch.where(masked[:, None, :], candidates, x0[:, None, :])
    picked = log_mu[:, None].expand(n, k, length, -1).gather(-1, candidates[..., None]).squeeze(-1)
    return x_t, candidates, (picked * masked[:, None, :]).sum(-1)


def _resampling(log_p: torch.Tensor, log_mu: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(n, k) importance-resampling probabilities of the energies E = -log p + log mu (Eq. 9)."""
    return log_importance_weights(log_mu - log_p, temperature).exp()


def _row_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a finished `edlm pipeline` --out folder (mdlm/, ar/, nce/ inside)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="tau of the AR energy's weights (oracle: 1)")
    parser.add_argument("--coverage", action="store_true", help="the proposals' coverage of the language's support")
    args = parser.parse_args()

    torch.set_num_threads(1)
    try:
        denoiser, energies, language, meta = load_pipeline_models(Path(args.runs))
    except EdlmError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.coverage:
        coverage(denoiser, language, meta, args)
        return
    ar = energies["ar"]
    generator = torch.Generator().manual_seed(args.seed)
    x0 = language.sample(args.sequences, generator)

    print(f"## Learned energy vs the exact language on EDLM proposals ({args.runs}, k={args.k}, "
          f"{args.sequences} sequences per rate, seed {args.seed}, AR tau {args.temperature:g})\n")
    print("| mask rate t | corr(log p_AR, log p_true) | gap AR − true (nats/seq) | TV(AR, oracle) | "
          "gain oracle (nats/seq) | gain AR | AR recovered |")
    print("|---|---|---|---|---|---|---|")
    for rate in args.rates:
        x_t, candidates, log_mu = _candidates(denoiser, x0, rate, args.k, meta["mask_id"], generator)
        flat = candidates.reshape(-1, candidates.shape[-1])
        log_true = language.log_prob(flat).to(torch.float64).view(log_mu.shape)
        with torch.no_grad():
            log_ar = ar.token_log_probs(flat).sum(-1).to(torch.float64).view(log_mu.shape)
        oracle_w, ar_w = _resampling(log_true, log_mu), _resampling(log_ar, log_mu, args.temperature)
        baseline = log_true.mean(-1)
        gain_oracle = ((oracle_w * log_true).sum(-1) - baseline).mean().item()
        gain_ar = ((ar_w * log_true).sum(-1) - baseline).mean().item()
        tv = 0.5 * (oracle_w - ar_w).abs().sum(-1).mean().item()
        corr = _row_corr(log_ar, log_true).mean().item()
        gap = (log_ar - log_true).mean().item()
        recovered = gain_ar / gain_oracle if gain_oracle > 0 else float("nan")
        print(f"| {rate:g} | {corr:.3f} | {gap:+.2f} | {tv:.3f} | {gain_oracle:.2f} | {gain_ar:.2f} | {recovered:.2f} |")


def coverage(denoiser, language, meta, args) -> None:
    """``--coverage`` (module docstring): mu_theta's mass on the language's support, position by position."""
    x = language.sample(args.sequences, torch.Generator().manual_seed(args.seed))
    n, length = x.shape
    ks = (1, 4, 16, 64)
    print(f"## Block proposals (b = 1) against the language's support ({args.runs}, {n} true rows, seed {args.seed})\n")
    print("| positions | mean mass on the support | 5th percentile | " + " | ".join(f"P(all {k} miss)" for k in ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    masses = []
    for i in range(1, length - 1):
        x_t = x.clone()
        x_t[:, i:] = meta["mask_id"]
        with torch.no_grad():
            mu = denoiser(x_t, torch.ones(n))[:, i, : language.num_tokens].exp().double()
        log_p = torch.stack([language.prefix_log_prob(torch.cat([x[:, :i], torch.full((n, 1), v)], 1))
                             for v in range(language.num_tokens)], 1)
        support = torch.softmax(log_p, dim=1) > 1e-3
        masses.append((mu * support).sum(1))
    masses = torch.stack(masses, 1)  # (n, L - 2)
    for name, part in (("1 .. 8", masses[:, :8]), ("9 .. L-2", masses[:, 8:]), ("all", masses)):
        miss = " | ".join(f"{float(((1 - part) ** k).mean()):.4f}" for k in ks)
        print(f"| {name} | {float(part.mean()):.3f} | {float(part.flatten().quantile(0.05)):.3f} | {miss} |")


if __name__ == "__main__":
    main()
