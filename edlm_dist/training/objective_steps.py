"""One training loss per objective, wiring models to the plain math in ``edlm_dist.objectives``.

Each objective owns the trainable module (handed to DeepSpeed) and computes the micro-batch loss
from a batch of clean rows and a noise generator. The generator is the run's dedicated
noise stream (t, masks, negatives): identical across TP ranks, distinct across DP ranks, saved
in checkpoints, so a resumed run draws exactly the same noise.
"""

from __future__ import annotations

import torch

from edlm_dist.artifacts.weights import load_trained_model
from edlm_dist.config.schema import RunConfig
from edlm_dist.errors import CheckpointError
from edlm_dist.models.build import build_model, flops_per_token, nce_flops_per_token
from edlm_dist.objectives.losses import ar_loss, mdlm_loss, nce_loss
from edlm_dist.objectives.schedule import NELBO_SAMPLING_EPS, LogLinearSchedule, mask_tokens, sample_times
from edlm_dist.objectives.subs import subs_log_probs
from edlm_dist.parallel.cross_entropy import cross_entropy_for
from edlm_dist.parallel.sharded_state import full_tensors
from edlm_dist.sampling.categorical import sample_nce_negatives


DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class Objective:
    model_kind: str
    module: torch.nn.Module

    def __init__(self, cfg: RunConfig, vocab_size: int, mask_id: int, tp_size: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.schedule = LogLinearSchedule()
        self.cross_entropy = cross_entropy_for(tp_size)

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator,
                sampling_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ antithetic U[eps, 1) and x_t ~ q(x_t | x0) (spec §3)."""
        eps = self.cfg.train.sampling_eps if sampling_eps is None else sampling_eps
        t = sample_times(x0.shape[0], antithetic=self.cfg.train.antithetic, sampling_eps=eps,
                         generator=generator, device=x0.device)
        x_t = mask_tokens(x0, self.schedule.move_chance(t), self.mask_id, generator=generator)
        return t, x_t

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError

    def validation_loss(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator):
        """What validation reports; the training loss unless a training-only choice must be undone."""
        return self.loss(model, x0, generator)

    def tokens_per_row(self, seq_len: int) -> int:
        return seq_len

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of :meth:`tokens_per_row` (MFU's numerator)."""
        return flops_per_token(self.cfg.model, self.vocab_size, seq_len, self.model_kind)


class MDLMObjective(Objective):
    """Continuous-time MDLM NELBO with SUBS (spec §4.1-4.2), or its block-diffusion form.

    A block-causal denoiser (``model.block_size`` b < L) gets BD3-LM's objective: one time per
    (row, block), antithetic over all of them; each block masked at its own rate; one forward on
    [x_t ; x0] under the two-stream mask denoises every block against its clean prefix; the loss is
    the sum of the per-block NELBOs over B*L tokens (docs/likelihood_bounds.md §5). Training times
    come from [train.sampling_eps, train.sampling_eps_max) (BD3-LM's clipped schedule when < 1);
    validation always reports the NELBO, t ~ U[NELBO_SAMPLING_EPS, 1).
    """

    model_kind = "dit"

    def loss(self, model, x0, generator, *, time_range: tuple[float, float] | None = None):
        block = getattr(model, "block_size", x0.shape[1])
        low, high = time_range or (self.cfg.train.sampling_eps, self.cfg.train.sampling_eps_max)
        start, _ = model.vocab_range() if hasattr(model, "vocab_range") else (0, None)
        if block >= x0.shape[1] and high == 1.0:  # MDLM, bit for bit the original path
            t, x_t = self.corrupt(x0, generator, sampling_eps=low)
            logits = model(x_t, self.schedule.total_noise(t))
        else:
            t, x_t = self.corrupt_blocks(x0, block, generator, low, high)
            logits = model(x_t, None, x0=x0) if block < x0.shape[1] else model(x_t, self.schedule.total_noise(t[:, 0]))
        return mdlm_loss(logits, x0, x_t, t, self.mask_id, schedule=self.schedule,
                         cross_entropy=self.cross_entropy, vocab_start=start)

    def corrupt_blocks(self, x0: torch.Tensor, block: int, generator: torch.Generator, low: float,
                       high: float) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, L): one time per (row, block) repeated over the block; x_t masks each block at its rate."""
        batch, length = x0.shape
        blocks = -(-length // block)
        t = sample_times(batch * blocks, antithetic=self.cfg.train.antithetic, sampling_eps=low,
                         sampling_eps_max=high, generator=generator, device=x0.device)
        t = t.view(batch, blocks).repeat_interleave(block, dim=1)[:, :length]
        return t, mask_tokens(x0, self.schedule.move_chance(t), self.mask_id, generator=generator)

    def validation_loss(self, model, x0, generator):
        return self.loss(model, x0, generator, time_range=(NELBO_SAMPLING_EPS, 1.0))


class ARObjective(Objective):
    """Next-token loss (spec §4.3); the mask id is never predicted."""

    model_kind = "ar"

    def loss(self, model, x0, generator):
        logits = model(x0)
        start, _ = model.vocab_range()
        return ar_loss(logits, x0, cross_entropy=self.cross_entropy, vocab_start=start, mask_id=self.mask_id)

    def tokens_per_row(self, seq_len: int) -> int:
        return seq_len - 1


class NCEObjective(Objective):
    """Eq. 10: data pushed to low energy, n negatives from the frozen p_theta(x0|x_t) to high energy.

    The diffusion model stays in eval mode (no dropout in the negatives; the reference code leaves
    it in train mode, spec §6.1) and its negatives are drawn in ``train.negatives_dtype``.
    """

    model_kind = "energy"

    def __init__(self, cfg, vocab_size, mask_id, tp_size, diffusion: torch.nn.Module):
        super().__init__(cfg, vocab_size, mask_id, tp_size)
        self.diffusion = diffusion.eval()
        for param in self.diffusion.parameters():
            param.requires_grad_(False)
        self.negatives_dtype = DTYPES[cfg.train.negatives_dtype]

    def loss(self, model, x0, generator):
        t, x_t = self.corrupt(x0, generator)
        sigma = self.schedule.total_noise(t)
        with torch.no_grad():
            logits = self.diffusion(x_t, sigma, gather_logits=True)
            log_mu = subs_log_probs(logits[..., : self.vocab_size], x_t, self.mask_id)
            negatives = sample_nce_negatives(log_mu, self.cfg.train.n_negatives, generator=generator,
                                             dtype=self.negatives_dtype)
        n = negatives.shape[1]
        e_pos = model(x_t, x0, sigma)
        e_neg = model(x_t.repeat_interleave(n, dim=0), negatives.reshape(-1, x0.shape[1]),
                      sigma.repeat_interleave(n, dim=0)).view(-1, n)
        loss = nce_loss(e_pos, e_neg)
        stats = {"energy_pos": e_pos.detach().mean(), "energy_neg": e_neg.detach().mean()}
        return loss, stats

    def flops_per_token(self, seq_len: int) -> float:
        return nce_flops_per_token(self.cfg.model, self.vocab_size, seq_len, self.cfg.train.n_negatives)


def build_objective(cfg: RunConfig, vocab_size: int, mask_id: int, tp_size: int, device: torch.device):
    """The objective with its freshly initialised (or, for NCE, diffusion-initialised) module."""
    kind = cfg.train.objective
    seq_len = cfg.data.seq_len
    if kind == "mdlm":
        objective: Objective = MDLMObjective(cfg, vocab_size, mask_id, tp_size)
    elif kind == "ar":
        objective = ARObjective(cfg, vocab_size, mask_id, tp_size)
    else:
        objective = _build_nce(cfg, vocab_size, mask_id, tp_size, device)
        return objective
    objective.module = build_model(objective.model_kind, cfg.model, vocab_size, seq_len, device=device)
    return objective


def _build_nce(cfg: RunConfig, vocab_size: int, mask_id: int, tp_size: int, device) -> NCEObjective:
    if not cfg.train.diffusion_ckpt:
        raise CheckpointError("train.objective=nce needs train.diffusion_ckpt=<the --out folder of an MDLM run>")
    diffusion, meta, dcfg = load_trained_model(cfg.train.diffusion_ckpt, use_ema=True, expect_kind="dit", device=device)
    _check_same_backbone(cfg, dcfg, meta, vocab_size)
    objective = NCEObjective(cfg, vocab_size, mask_id, tp_size, diffusion)
    energy = build_model("energy", cfg.model, vocab_size, cfg.data.seq_len, device=device)
    energy.init_from_diffusion(full_tensors(diffusion))
    objective.module = energy
    return objective


def _check_same_backbone(cfg: RunConfig, dcfg: RunConfig, meta: dict, vocab_size: int) -> None:
    fields = ("hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio")
    diffs = [f"model.{f} {getattr(dcfg.model, f)} vs {getattr(cfg.model, f)}" for f in fields
             if getattr(dcfg.model, f) != getattr(cfg.model, f)]
    if meta["vocab_size"] != vocab_size or meta["seq_len"] != cfg.data.seq_len:
        diffs.append(f"vocab/seq_len {meta['vocab_size']}/{meta['seq_len']} vs {vocab_size}/{cfg.data.seq_len}")
    if diffs:
        raise CheckpointError("the NCE energy model is initialised from the diffusion model, but they differ ("
                              + "; ".join(diffs) + "); use the diffusion run's model settings")

