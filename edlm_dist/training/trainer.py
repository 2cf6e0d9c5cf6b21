"""The training loop: one loop for MDLM, AR and NCE on DeepSpeed ZeRO over Megatron TP layers.

``train(cfg, out_dir)`` validates the data against the config, builds the objective's model,
the DeepSpeed engine, EMA and the resumable loader, resumes automatically from
``OUT/checkpoints/latest``, and runs ``train.steps`` optimizer steps with gradient accumulation
to the global batch. Every step the loss is checked for NaN/Inf and divergence on all ranks *before*
the backward pass, so a bad step never touches the weights; the run stops naming the step and the
last good checkpoint. The state itself (weights, optimizer, EMA) is checked before every save and
after every load (:mod:`edlm_dist.training.safety`), so a checkpoint is only ever written -- and named
good -- with finite values. A resume applies and logs every changed setting or refuses it by name
(:mod:`edlm_dist.training.resume`). Pre-emption signals recorded since the command started
(:mod:`edlm_dist.preemption`) stop start-up at once and the loop after the current step's checkpoint.
At the end it writes consolidated weights (``OUT/weights``) for sampling.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from edlm_dist import preemption
from edlm_dist.artifacts import checkpoint as ckpt
from edlm_dist.artifacts.readers import guarded
from edlm_dist.artifacts.weights import export_weights, weights_meta
from edlm_dist.config.load import save_config
from edlm_dist.config.schema import RunConfig
from edlm_dist.data.loader import build_eval_loader, build_train_loader
from edlm_dist.data.locations import retry_policy
from edlm_dist.data.shards import validate_dataset
from edlm_dist.errors import REQUEUE_EXIT_CODE, CheckpointError, ConfigError, TrainingError
from edlm_dist.models.build import count_parameters, estimate_memory
from edlm_dist.parallel.collectives import all_reduce_values, max_over_ranks
from edlm_dist.parallel.deepspeed_engine import build_engine, fp32_master_params, resolve_precision
from edlm_dist.parallel.devices import device_generator, fork_rng_devices, generator_state, restore_generator
from edlm_dist.parallel.runtime import (ParallelContext, data_seed, identical_on_every_rank, init_parallel,
                                        shutdown_parallel)
from edlm_dist.preemption import PREEMPTION_SIGNALS, Preempted  # noqa: F401 (launchers import them from here)
from edlm_dist.parallel.sharded_state import gathered_parameters, grad_norm
from edlm_dist.training.ema import EMA
from edlm_dist.training.metrics_logger import MetricsLogger, console_logger, plot_loss_curve, progress_line
from edlm_dist.training.peak_flops import Peak, peak_for_device_name
from edlm_dist.training.objective_steps import Objective, build_objective
from edlm_dist.training.resume import APPLIED, UNUSED, apply_hyperparameters, review_changes
from edlm_dist.training.safety import check_loss, divergence_limit, nonfinite_state

VALIDATION_SEED = 123457  # validation noise is fixed and separate from the training streams


def load_data_description(cfg: RunConfig) -> dict:
    """Check the shards against the config (before any model is built) and return the manifest."""
    manifest = validate_dataset(cfg.data.dir, seq_len=cfg.data.seq_len, vocab_size=cfg.data.vocab_size or None,
                                check_contents=True, retry=retry_policy(cfg.data))
    return manifest


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mean_over(value: torch.Tensor, group) -> float:
    value = value.detach().float().reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value.item()


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, ctx: Optional[ParallelContext] = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.ctx = ctx or init_parallel(cfg)
        self.log = console_logger()
        self.step = 0
        self._stop_point("while starting")
        if cfg.data.dir and self.out.resolve() == Path(str(cfg.data.dir)).resolve():
            raise ConfigError(f"--out {self.out} is the data folder data.dir; give the run its own folder")
        self.manifest = load_data_description(cfg)
        self._stop_point("after validating the data")
        tokenizer = self.manifest["tokenizer"]
        self.tokenizer_info = tokenizer
        self.vocab_size = int(self.manifest["vocab_size"])
        self.mask_id = int(tokenizer["mask_id"])
        self.precision = resolve_precision(cfg.train.precision)
        with identical_on_every_rank(cfg.train.seed, self.ctx.device):  # same initial weights at any TP degree;
            self.objective: Objective = build_objective(cfg, self.vocab_size, self.mask_id, self.ctx.tp_size,
                                                        self.ctx.device)  # dropout streams stay per DP rank
        self._log_plan()
        self.engine, self.optimizer, self.scheduler = build_engine(self.objective.module, cfg, self.ctx.dp_size,
                                                                   device=self.ctx.device)
        with self._fp32_weights() as values:  # the fp32 masters in bf16, whole tensors under ZeRO-3
            self.ema = EMA(list(self.engine.module.parameters()), cfg.train.ema, values=values)
        self._stop_point("after building the model")
        self.loader = self._build_loader()
        self.noise = device_generator(self.ctx.device, data_seed(cfg.train.seed, self.ctx))
        self._grad_norm = float("nan")
        self.divergence_limit = divergence_limit(cfg.train, self.vocab_size)
        self._warned_divergence = False
        self.signature = ckpt.model_signature(cfg, self.objective.model_kind, self.vocab_size)
        self.metrics = MetricsLogger(self.out, cfg.logging, enabled=self.ctx.is_main, name=cfg.train.objective)
        self.accumulation = cfg.train.global_batch // (cfg.train.micro_batch * self.ctx.dp_size)

    # ------------------------------------------------------------------ setup
    def _build_loader(self):
        d = self.cfg.data
        return build_train_loader(d.dir, "train", micro_batch=self.cfg.train.micro_batch, dp_rank=self.ctx.dp_rank,
                                  dp_world=self.ctx.dp_size, seed=d.seed, shuffle_buffer=d.shuffle_buffer,
                                  num_workers=d.num_workers, manifest=self.manifest, retry=retry_policy(d))

    def _log_plan(self) -> None:
        if not self.ctx.is_main:
            return
        m, t = self.cfg.model, self.cfg.train
        n_params = count_parameters(m, self.vocab_size, self.objective.model_kind)
        memory = estimate_memory(m, self.vocab_size, self.cfg.data.seq_len, t.micro_batch, t.zero_stage,
                                 self.ctx.dp_size, self.ctx.tp_size, self.precision, kind=self.objective.model_kind)
        total = memory.get("total", sum(v for v in memory.values() if isinstance(v, (int, float))))
        self.log.info("objective=%s model=%s params=%s tp=%d dp=%d zero=%d precision=%s est. memory/rank=%.1f MiB",
                      t.objective, self.objective.model_kind, f"{n_params:,}", self.ctx.tp_size, self.ctx.dp_size,
                      t.zero_stage, self.precision, total / 2**20)
        if self.ctx.device.type == "cuda":
            peak = self._peak()
            self.log.info("MFU against %s", f"the {peak.label} peak, {peak.tflops:g} TFLOP/s bf16 dense" if peak
                          else f"nothing: {torch.cuda.get_device_name(self.ctx.device)} is not in the peak table "
                          "(edlm_dist/training/peak_flops.py)")

    def resume_if_possible(self) -> bool:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            return False
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.signature, path)
        changes = review_changes(meta.get("config") or {}, self.cfg, str(path))  # refuses FIXED keys by name
        extras, ema_state = ckpt.load_checkpoint(self.engine, path, signature=self.signature,
                                                 tp_rank=self.ctx.tp_rank, dp_rank=self.ctx.dp_rank)
        self.step = int(extras["step"])
        self.loader.load_state_dict(extras["loader"])
        if not restore_generator(self.noise, extras["noise"], reseed=data_seed(self.cfg.train.seed, self.ctx) + self.step):
            self.log.warning("checkpoint %s was written on another device type: the training noise stream is "
                             "reseeded from (seed, step) (weights, optimizer, EMA and data order resume exactly)", path)
        if ema_state is not None:
            guarded(lambda: self.ema.load_state_dict(ema_state), what=f"the EMA state in {path} does not fit the model",
                    fix=ckpt.EARLIER)
        apply_hyperparameters(self.optimizer, self.scheduler, self.cfg.train)
        bad = nonfinite_state(self.engine.module, self.optimizer, self.ema.shadow if self.ema.enabled else None,
                              self.ctx.device)
        if bad:
            raise CheckpointError(f"checkpoint {path} holds NaN/Inf values ({bad}); it cannot be resumed: "
                                       "delete it (and point checkpoints/latest at an earlier one) or use a fresh --out")
        ckpt.set_rng_state(extras["rng"])
        if self.ctx.is_main:
            self.log.info("resumed from %s (step %d)", path, self.step)
            if changes[APPLIED]:
                self.log.info("resume: applying the changed settings %s", "; ".join(changes[APPLIED]))
            if changes[UNUSED]:
                self.log.info("resume: changed settings that `edlm train` does not read: %s",
                              "; ".join(changes[UNUSED]))
        return True

    def save(self) -> Path:
        bad = nonfinite_state(self.engine.module, self.optimizer, self.ema.shadow if self.ema.enabled else None,
                              self.ctx.device)
        if bad:  # never write (nor name as good) a state that holds NaN/Inf
            raise TrainingError(f"the training state at step {self.step} holds NaN/Inf ({bad}); it was not saved; "
                                f"last good checkpoint: {self._last_good()}; lower train.lr or check the data")
        extras = {"step": self.step, "loader": self.loader.state_dict(), "noise": generator_state(self.noise)}
        return ckpt.save_checkpoint(self.engine, self.out, self.step, cfg=self.cfg, signature=self.signature,
                                    extras=extras, ema_state=self.ema.state_dict() if self.ema.enabled else None,
                                    tp_rank=self.ctx.tp_rank, dp_rank=self.ctx.dp_rank,
                                    keep_last=self.cfg.train.keep_last)

    # ------------------------------------------------------------------ preemption
    def install_signal_handlers(self) -> None:
        """Record SIGTERM/SIGUSR1; the loop checkpoints after the current step and stops (never mid-step).
        ``edlm train`` installs them before anything else (:mod:`edlm_dist.preemption`)."""
        preemption.install()

    def _preemption_requested(self) -> int:
        # all ranks stop at the same step even if only one got the signal
        return int(max_over_ranks(preemption.received()))

    def _last_good(self) -> str:
        """The latest checkpoint: good by construction (a state is checked finite before it is written)."""
        last = ckpt.latest_checkpoint(self.out)
        return str(last) if last else "none (no checkpoint written yet)"

    def _stop_point(self, where: str) -> None:
        """During start-up: stop at once on a pre-emption signal (nothing new to save; ranks agree)."""
        signum = self._preemption_requested()
        if signum:
            raise Preempted(signum, f"during start-up ({where}); nothing new to save", self.step)

    # ------------------------------------------------------------------ loop
    def _micro_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with _autocast(self.precision, self.ctx.device):
            loss, stats = self.objective.loss(self.engine, batch.to(self.ctx.device), self.noise)
        self._warned_divergence = check_loss(
            loss, step=self.step + 1, limit=self.divergence_limit, policy=self.cfg.train.on_divergence,
            last_good=self._last_good, log=self.log, warned=self._warned_divergence)
        self.engine.backward(loss)
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports the global norm only for ZeRO >= 1; count replicated params once.
            self._grad_norm = float(grad_norm(self.engine.module, self.ctx.tp_group))
        self.engine.step()
        return loss.detach(), stats

    def train(self, stop_after: Optional[int] = None) -> dict:
        """Run to ``train.steps`` (or ``stop_after`` more steps); return the last logged metrics.

        A collective that fails because a peer died or stalled past ``parallel.timeout_s`` (gloo
        and NCCL raise a plain RuntimeError) becomes a one-line TrainingError naming the step and
        the last good checkpoint.
        """
        try:
            return self._train(stop_after)
        except RuntimeError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            transport = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
            if not (dist.is_initialized() and dist.get_world_size() > 1 and any(w in text.lower() for w in transport)):
                raise
            detail = text.split("] ", 1)[-1].split(". ")[0]  # drop gloo's "[file.cc:537] " prefix and advice
            last = ckpt.latest_checkpoint(self.out)
            raise TrainingError(f"lost contact with another rank at step {self.step + 1} ({detail}); a process died "
                                f"or stalled longer than parallel.timeout_s={self.cfg.parallel.timeout_s}; last good "
                                f"checkpoint: {last if last else 'none'}; re-launch the job to resume from it") from None

    def _train(self, stop_after: Optional[int]) -> dict:
        cfg = self.cfg.train
        self.resume_if_possible()
        self._stop_point("after loading the checkpoint")
        self.metrics.rewind(self.step)  # rows logged after the checkpoint are logged again, identically
        if self.ctx.is_main:  # after the checkpoint check: a refused config must not replace the run's config.yaml
            save_config(self.cfg, self.out)
        started, first_step = time.perf_counter(), self.step
        self.engine.train()
        batches = iter(self.loader)
        target = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=target, initial=self.step, desc=f"train {cfg.objective}", unit="step",
                   disable=not (self.ctx.is_main and self.cfg.logging.progress), dynamic_ncols=True)
        tokens_per_step = cfg.global_batch * self.objective.tokens_per_row(self.cfg.data.seq_len)
        last: dict = {}
        tick, tick_step = time.perf_counter(), self.step
        while self.step < target:
            losses = [self._micro_step(next(batches))[0] for _ in range(self.accumulation)]
            self.step += 1
            self._update_ema()
            bar.update(1)
            logged = self.step % cfg.log_every == 0 or self.step == target
            if logged:
                elapsed = time.perf_counter() - tick
                last = self._step_metrics(torch.stack(losses).mean(), elapsed / (self.step - tick_step),
                                          tokens_per_step)
                self.metrics.log(last, self.step, console=False)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                tick, tick_step = time.perf_counter(), self.step
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                val = self.validate()
                self.metrics.log({"val_loss": val}, self.step, console=False)
                last["val_loss"] = val
                logged = True
            if logged and self.ctx.is_main:  # a console line per log/validation step, above the progress bar
                bar.write(progress_line(self.step, cfg.steps, last), file=sys.stderr)
            signum = self._preemption_requested()
            if self.step % cfg.save_every == 0 or self.step == target or signum:
                self.save()
            if signum:
                bar.close()
                raise Preempted(signum, f"at step {self.step}; checkpoint written", self.step)
        bar.close()
        if self.step >= cfg.steps:
            weights = self.export()
            if self.ctx.is_main:
                self._summary(weights, time.perf_counter() - started, self.step - first_step,
                              tokens_per_step, last)
        return last

    def _summary(self, weights: Path, seconds: float, steps: int, tokens_per_step: int, last: dict) -> None:
        """The end-of-run lines: what was trained, how fast, the final losses, and where the weights are."""
        curve = plot_loss_curve(self.out, title=f"{self.cfg.train.objective} ({self.objective.model_kind})")
        tokens = steps * tokens_per_step
        losses = "  ".join(f"{label} {last[key]:.4f}" for key, label in (("loss", "loss"), ("val_loss", "val"))
                           if isinstance(last.get(key), float))
        self.log.info("trained %s for %d steps (%d this run) in %.0f s: %s tokens, %.1fk tokens/s; final %s",
                      self.cfg.train.objective, self.step, steps, seconds, f"{tokens:,}",
                      tokens / max(seconds, 1e-9) / 1e3, losses or "-")
        self.log.info("weights: %s (EMA: %s)  metrics: %s  loss curve: %s", weights,
                      "yes" if self.ema.enabled else "no", self.metrics.path, curve)

    @contextlib.contextmanager
    def _fp32_weights(self):
        """The fp32 value of every trainable parameter (the EMA's source): DeepSpeed's fp32 masters in bf16
        (a collective), the parameters themselves in fp32, gathered whole under ZeRO-3."""
        if self.engine.bfloat16_enabled():
            yield fp32_master_params(self.engine)
        else:
            with gathered_parameters(self.engine.module):
                yield fp32_master_params(self.engine)

    def _update_ema(self) -> None:
        if not self.ema.enabled:
            return
        with self._fp32_weights() as values:
            self.ema.update(values)

    def _peak(self) -> Optional[Peak]:
        """The datasheet peak MFU is measured against (None on CPU or an unknown GPU: no MFU then)."""
        if self.ctx.device.type != "cuda":
            return None
        return peak_for_device_name(torch.cuda.get_device_name(self.ctx.device))

    def _step_metrics(self, loss: torch.Tensor, seconds: float, tokens_per_step: int) -> dict:
        tokens_per_s = tokens_per_step / seconds
        flops = self.objective.flops_per_token(self.cfg.data.seq_len)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None or not isinstance(grad_norm, (int, float)) and not torch.is_tensor(grad_norm):
            grad_norm = self._grad_norm
        metrics = {
            "loss": _mean_over(loss, self.ctx.dp_group),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "achieved_tflops": tokens_per_s * flops / 1e12,
            "step_seconds": seconds,
        }
        peak = self._peak()
        if peak is not None:  # per-GPU model FLOPs utilisation against the card's datasheet bf16 peak
            metrics["mfu"] = metrics["achieved_tflops"] / (peak.tflops * self.ctx.world_size)
        return metrics

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss with EMA weights in eval mode, on fixed noise (does not touch training RNG)."""
        cfg = self.cfg
        max_rows = cfg.train.val_batches * cfg.train.micro_batch * self.ctx.dp_size
        loader = build_eval_loader(cfg.data.dir, "valid", micro_batch=cfg.train.micro_batch, dp_rank=self.ctx.dp_rank,
                                   dp_world=self.ctx.dp_size, max_rows=max_rows, manifest=self.manifest,
                                   retry=retry_policy(cfg.data))
        generator = device_generator(self.ctx.device, VALIDATION_SEED + self.ctx.dp_rank)
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # summed on the device: no sync per batch
        self.engine.eval()
        try:  # the default generators (dropout streams) continue as if validation never ran
            with torch.random.fork_rng(devices=fork_rng_devices(self.ctx.device)), \
                    self.ema.swap_in(lambda: gathered_parameters(self.engine.module, modifier_rank=0)):
                for batch in loader:
                    with _autocast(self.precision, self.ctx.device):
                        loss, _ = self.objective.validation_loss(self.engine.module, batch.to(self.ctx.device), generator)
                    total[0] += loss.detach().double() * batch.shape[0]
                    total[1] += batch.shape[0]
        finally:
            self.engine.train()
        loss_sum, rows = all_reduce_values(total.tolist(), self.ctx.dp_group)
        return loss_sum / max(rows, 1.0)

    def export(self) -> Path:
        meta = weights_meta(self.cfg, kind=self.objective.model_kind, vocab_size=self.vocab_size, step=self.step,
                            tokenizer=self.tokenizer_info, extra={"data_dir": str(self.cfg.data.dir)})
        shadow = self.ema.shadow if self.ema.enabled else None
        write = self.ctx.tp_rank == 0 and self.ctx.dp_rank == 0
        masters = fp32_master_params(self.engine) if self.engine.bfloat16_enabled() else None  # not bf16-rounded
        path = export_weights(self.engine.module, self.out, ema_shadow=shadow, meta=meta, write=write, values=masters)
        if dist.is_initialized():
            dist.barrier()
        return path

    def close(self) -> None:
        self.metrics.close()


def train(cfg: RunConfig, out_dir: str | Path, ctx: Optional[ParallelContext] = None) -> dict:
    trainer = Trainer(cfg, out_dir, ctx)
    try:
        return trainer.train()
    finally:
        trainer.close()


def run_training(cfg: RunConfig, out_dir: str | Path) -> int:
    """``edlm train``: 0 when the run reached ``train.steps``, :data:`REQUEUE_EXIT_CODE` when pre-empted."""
    if not cfg.data.dir:
        raise ConfigError("data.dir is empty; run `edlm prepare-data --source synthetic --out DATA` and pass "
                          "data.dir=DATA")
    preemption.install()  # `edlm train` installed them already, before importing torch; a library caller here
    trainer = None
    try:
        trainer = Trainer(cfg, out_dir)
        trainer.train()
    except Preempted as exc:
        print(f"edlm train: {exc}; exiting with {REQUEUE_EXIT_CODE} so the launcher requeues the job", flush=True)
        return REQUEUE_EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_parallel()
    return 0
