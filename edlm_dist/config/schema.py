"""Typed run configuration.

Every run is described by one :class:`RunConfig`, loaded from YAML with dotted
``key=value`` overrides (see :mod:`edlm_dist.config.load`) and validated before any
work starts. Defaults are tiny so that a bare config runs on a laptop CPU.

Every field declares what it accepts (:mod:`edlm_dist.config.fields`): a range for numbers, a choice set
or a named check for strings. The trailing comment of a field is its help text in ``edlm CMD --help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from edlm_dist.config.fields import (
    LOCATION, NAME, ORACLE, PATH, SLURM_CONSTRAINT, SLURM_WORD, TOKENIZER, Check, choice, choices, custom, flag,
    number, numbers, text, texts,
)

# Paper presets (spec §2.3): hidden size, blocks, heads. cond_dim is 128 for all.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 512, "n_blocks": 8, "n_heads": 8, "cond_dim": 128},
    "small": {"hidden_size": 768, "n_blocks": 12, "n_heads": 12, "cond_dim": 128},
    "medium": {"hidden_size": 1024, "n_blocks": 24, "n_heads": 16, "cond_dim": 128},
}


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
BIG = 10**12  # a ceiling for counts: far beyond any real run, far below int64 overflow


@dataclass
class ModelConfig:
    """Backbone shape. ``vocab_size`` and ``length`` come from the data section."""

    preset: Optional[str] = choice(None, None, "tiny", "small", "medium")  # overrides the sizes below
    hidden_size: int = number(64, 1, 65536)
    n_blocks: int = number(2, 1, 1024)
    n_heads: int = number(4, 1, 1024)
    cond_dim: int = number(32, 1, 65536)
    mlp_ratio: int = number(4, 1, 64)
    dropout: float = number(0.0, 0.0, 1.0, hi_open=True)
    time_conditioning: bool = flag(False)  # MDLM default: off (spec §2.1)
    block_size: int = number(0, 0, 2**20, why="0 means seq_len: MDLM")  # diffusion denoiser: b < seq_len = block-causal (BD3-LM; docs/block_diffusion.md)
    activation_checkpointing: bool = flag(False)
    use_apex: bool = flag(True)  # fused LayerNorm/Adam when NVIDIA apex imports; else torch


@dataclass
class SyntheticConfig:
    """The exact-oracle synthetic language (docs/synthetic_language.md)."""

    num_tokens: int = number(32, 2, 10**6)  # real (non-special) tokens
    num_topics: int = number(4, 1, 10**4)  # latent mixture components, fixed per document
    branching: int = number(3, 1, 10**6)  # allowed next tokens per (order)-gram context
    order: int = number(1, 1, 8)  # Markov order of each component (1 learns far faster than 2 on CPU; see the doc)
    concentration: float = number(0.5, 0.0, 1e6, lo_open=True)  # Dirichlet concentration of allowed transitions
    smoothing: float = number(1e-4, 0.0, 1.0, lo_open=True, hi_open=True)  # mass spread over disallowed tokens
    seed: int = number(1234, 0, SEED_MAX)  # seed of the language itself (not of the samples)
    train_rows: int = number(20000, 1, BIG)
    valid_rows: int = number(2000, 1, BIG)


@dataclass
class DataConfig:
    dir: str = text("", LOCATION)  # prepared dataset: a folder, an http(s):// URL or a pipe: command with {} (docs/data.md)
    source: str = choice("synthetic", "synthetic", "text", "jsonl", "hf", "text8", "pydoc")  # pydoc: CPython's help topics
    input: str = text("", PATH)  # text/jsonl/text8: the input file; hf: a save_to_disk folder (edlm pipeline prepares it)
    tokenizer: str = text("synthetic", TOKENIZER)  # char | byte | gpt2 | text8 | hf:NAME | a tokenizer folder
    tokenizer_vocab: int = number(0, 0, 10**7)  # char/byte learnt from the training text: 0 = every char / the 256 bytes; else the size
    max_unk_rate: float = number(0.01, 0.0, 1.0)  # prepare-data refuses a split with a larger share of [UNK] tokens (1.0: accept any)
    seq_len: int = number(32, 4, 2**20)
    vocab_size: int = number(0, 0, 10**8)  # 0: take it from the manifest / tokenizer
    wrap: bool = flag(False)  # MDLM [BOS]+chunk+[EOS] wrapping (spec §1.2); synthetic rows are whole documents
    shard_rows: int = number(5000, 1, 10**8)
    shuffle_buffer: int = number(512, 0, 10**8)  # rows permuted together (0 or 1: file order)
    num_workers: int = number(0, 0, 256)
    read_retries: int = number(2, 0, 1000)  # remote shards: retries after a failed read (then an error, never a skipped shard)
    retry_delay_s: float = number(1.0, 0.0, 3600.0)  # wait before the first retry; doubles with each further one
    seed: int = number(1, 0, SEED_MAX)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ParallelConfig:
    tp: int = number(1, 1, 1024)  # tensor-parallel degree (Megatron-core)
    dp: int = number(0, 0, 10**6)  # data-parallel degree; 0 = world_size / (tp * pp)
    pp: int = number(1, 1, 1, why="pipeline parallelism is not supported; use tensor and data parallelism")
    backend: str = choice("auto", "auto", "gloo", "nccl")  # auto: nccl with CUDA, else gloo
    timeout_s: int = number(600, 1, 10**6)  # collective timeout: a dead peer fails the run instead of hanging


@dataclass
class TrainConfig:
    objective: str = choice("mdlm", "mdlm", "ar", "nce")
    steps: int = number(200, 1, BIG)
    global_batch: int = number(32, 1, 10**8)
    micro_batch: int = number(16, 1, 10**7)
    lr: float = number(3e-4, 0.0, 1.0, lo_open=True, why="AdamW moves each weight by about lr per step")
    warmup_steps: int = number(20, 0, BIG)
    lr_schedule: str = choice("constant", "constant", "cosine")  # constant (MDLM-OWT) | cosine (text8, paper C.1)
    min_lr_ratio: float = number(0.0, 0.0, 1.0)  # cosine floor as a fraction of lr
    weight_decay: float = number(0.0, 0.0, 100.0)
    beta1: float = number(0.9, 0.0, 1.0, hi_open=True)
    beta2: float = number(0.999, 0.0, 1.0, hi_open=True)
    adam_eps: float = number(1e-8, 0.0, 1.0, lo_open=True)
    grad_clip: float = number(1.0, 0.0, 1e6)  # global grad-norm clip; 0 disables
    ema: float = number(0.9999, 0.0, 1.0, hi_open=True, why="0 disables EMA")
    zero_stage: int = number(0, 0, 3)
    precision: str = choice("auto", "auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU
    antithetic: bool = flag(True)
    sampling_eps: float = number(1e-3, 0.0, 1.0, lo_open=True, hi_open=True)  # training t ~ U[sampling_eps, sampling_eps_max)
    sampling_eps_max: float = number(1.0, 0.0, 1.0, lo_open=True)  # < 1: BD3-LM's clipped schedule (training only; validation is the NELBO)
    n_negatives: int = number(1, 1, 4096)  # NCE negatives per positive (Eq. 10)
    negatives_dtype: str = choice("float64", "float64", "float32", "bfloat16")  # categorical sampling precision for NCE negatives
    diffusion_ckpt: str = text("", PATH)  # nce: the trained diffusion model (frozen p_theta)
    on_divergence: str = choice("stop", "stop", "warn")  # a finite loss above divergence_loss: stop (exit 2) or warn
    divergence_loss: float = number(0.0, 0.0, 1e30)  # 0 = 100 x ln(vocabulary size), far above any healthy loss
    log_every: int = number(10, 1, BIG)
    val_every: int = number(100, 1, BIG)
    val_batches: int = number(4, 1, 10**7)
    save_every: int = number(100, 1, BIG)
    keep_last: int = number(2, 1, 10**6)
    seed: int = number(1, 0, SEED_MAX)


def _window_problem(window: Any) -> Optional[str]:
    try:
        window_interval(window, "sample.window")
    except ValueError as exc:
        return str(exc)
    return None


PROMPT = Check("a non-empty prompt or template", lambda v: None if v.strip() else "is empty")
WINDOW = Check("a number w in [0, 1] (IS for t in [1 - w, 1]) or a pair [t_lo, t_hi]", _window_problem,
               whole_message=True)


@dataclass
class SampleConfig:
    sampler: str = choice("mdlm", "mdlm", "edlm", "ar")  # ar: the AR baseline, spec §5.7
    update: str = choice("ddpm_cache", "ddpm", "ddpm_cache")
    energy: str = choice("ar", "ar", "coar", "nce", "oracle")  # edlm only
    steps: int = number(32, 1, 10**6)
    k: int = number(2, 1, 4096, why="it is the number of importance-sampling proposals")  # proposals per step
    window: Any = custom(0.2, WINDOW)  # IS for grid times t in [t_lo, t_hi] = window (a pair), or [1 - window, 1] (a number)
    temperature: float = number(1.0, 0.0, 1e6, lo_open=True)  # edlm: IS weights exp(-E / tau); ar: logits / tau
    block_size: int = number(0, 0, 2**20, why="0 means one block of the whole row")  # commit the row block by block (docs/sampling.md)
    block_proposal: str = choice("denoiser", "denoiser", "ar_first")  # block-wise EDLM-AR/coAR: ar_first = each block's first token from p_AR
    block_lookahead: bool = flag(False)  # block-causal EDLM: next block's first denoiser call beside the scoring call (docs/block_diffusion.md)
    top_k: int = number(0, 0, 10**8, why="0 keeps every token")  # ar only, not the paper's protocol: keep the k likeliest next tokens
    top_p: float = number(1.0, 0.0, 1.0, lo_open=True, why="1 keeps every token")  # ar only, not the paper's protocol: nucleus mass
    kv_cache: bool = flag(True)  # ar: incremental decoding; false recomputes the prefix per token (spec §5.7)
    prompts: list[str] = texts([], PROMPT)  # templates ("w3 [MASK:4] w9"; "ids:5 _ 7"); docs/sampling.md
    prompts_file: str = text("", PATH)  # JSONL ({"prompt"|"infill"|"ids": ...}) or one template per line
    length: int = number(0, 0, 2**24, why="0 means the model's L")  # tokens per row; > L: semi-autoregressive windows (spec §5.6)
    stride: int = number(0, 0, 2**24, why="0 means half the context")  # new tokens per window when length > L
    redraw_every_step: bool = flag(True)  # Alg. 1; False reuses x0* while nothing changes (ref. code)
    skip_idle_is: bool = flag(True)  # redraw mode: no IS for a row whose step reveals nothing (same tokens, docs/sampling.md)
    noise_removal: bool = flag(True)
    precision: str = choice("float64", "float64", "float32", "bfloat16")  # categorical sampling precision
    model_precision: str = choice("auto", "auto", "fp32", "bf16")  # model forwards: auto = bf16 autocast + TF32 on CUDA, fp32 on CPU (parallel/precision.py)
    num_samples: int = number(16, 1, BIG)
    batch_size: int = number(8, 1, 10**7)
    seed: int = number(1, 0, SEED_MAX)
    use_ema: bool = flag(True)
    proposal_parallel: int = number(0, 0, 4096)  # ranks sharing one sequence's k proposals; 0 = auto (docs/sampling.md)
    diffusion_ckpt: str = text("", PATH)
    ar_ckpt: str = text("", PATH)
    energy_ckpt: str = text("", PATH)


def window_interval(window: Any, name: str = "window") -> tuple[float, float]:
    """The IS window as ``(t_lo, t_hi)``: a number w means [1 - w, 1] (the paper's window, spec §6.5), a pair
    [t_lo, t_hi] means itself. Raises ValueError with a one-line message naming ``name`` and the fix."""
    if isinstance(window, (bool, str)):
        raise ValueError(f"{name} must be a number in [0, 1] or a pair [t_lo, t_hi], got {window!r}")
    if isinstance(window, (int, float)):
        if not 0.0 <= window <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (got {window}): IS runs for t in [1-{name.split('.')[-1]}, 1]"
                             " (or give an interval [t_lo, t_hi])")
        return 1.0 - float(window), 1.0
    try:
        lo, hi = (float(v) for v in window if not isinstance(v, bool))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1] or a pair [t_lo, t_hi] of numbers, got {window!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}=[{lo:g}, {hi:g}] must satisfy 0 <= t_lo <= t_hi <= 1: IS runs for grid times t "
                         "with t_lo <= t <= t_hi")
    return lo, hi


@dataclass
class EvalConfig:
    metrics: list[str] = choices(["ppl", "genppl", "entropy"], "ppl", "genppl", "entropy")
    samples: list[str] = texts([], PATH)  # sample JSONL files; empty: sample on the fly
    oracle: str = text("exact", ORACLE)  # exact (synthetic language) | ngram (fitted on the validation text) | an HF causal LM
    judge_order: int = number(5, 1, 10)  # eval.oracle=ngram: n-gram order of the Kneser-Ney judge
    oracle_batch_size: int = number(8, 1, 10**6)
    model_precision: str = choice("auto", "auto", "fp32", "bf16")  # model forwards: auto = bf16 autocast + TF32 on CUDA, fp32 on CPU
    n_negatives: int = number(16, 1, 10**6)  # Theorem-1 partition estimates
    batch_size: int = number(16, 1, 10**7)
    max_batches: int = number(0, 0, BIG)  # 0: the whole validation split
    seed: int = number(1, 0, SEED_MAX)
    diffusion_ckpt: str = text("", PATH)
    ar_ckpt: str = text("", PATH)
    energy_ckpt: str = text("", PATH)


METHODS = ("mdlm", "edlm-ar", "edlm-coar", "edlm-nce", "edlm-oracle")
METHOD_MODELS = {"mdlm": (), "edlm-ar": ("ar",), "edlm-coar": ("ar",), "edlm-nce": ("nce",), "edlm-oracle": ()}


@dataclass
class PipelineConfig:
    methods: list[str] = choices(list(METHODS), *METHODS)
    step_counts: list[int] = numbers([4, 8, 16], 1, 10**6)
    mdlm_steps: int = number(300, 1, BIG)
    ar_steps: int = number(300, 0, BIG)  # 0 only when no method needs the AR model
    nce_steps: int = number(150, 0, BIG)  # 0 only when no method needs the NCE energy model
    num_samples: int = number(64, 1, BIG)
    block_size: int = number(0, 0, 2**20)  # > 0: also train a block-causal MDLM (model.block_size) into OUT/block; docs/block_diffusion.md
    block_steps: int = number(0, 0, BIG)  # its training steps; 0 = mdlm_steps
    block_step_counts: list[int] = numbers([1, 2, 4], 1, 10**6)  # its sampler's steps PER BLOCK
    ar_baseline: bool = flag(True)  # sample the AR model with the AR baseline sampler (spec §5.7): one row per run
    prompts: int = number(8, 0, 10**6, why="0 means no prompted cell")  # prompted-generation cell (exact judge only): prompts from validation rows
    prompt_tokens: int = number(0, 0, 2**24, why="0 means L // 4")  # tokens per prompt, BOS included


@dataclass
class LoggingConfig:
    wandb_mode: str = choice("disabled", "disabled", "offline", "online")
    wandb_project: str = text("edlm-dist", NAME)
    run_name: str = text("", NAME)
    progress: bool = flag(True)


@dataclass
class SlurmConfig:
    nodes: int = number(1, 1, 10**5)
    gpus_per_node: int = number(8, 0, 1024)  # 0: CPU nodes (no GPU request)
    # processes per node; 0 = one per GPU (gpus_per_node), which is what GPU runs need
    tasks_per_node: int = number(0, 0, 4096)
    cpus_per_task: int = number(8, 1, 4096)
    partition: str = text("", SLURM_WORD)
    account: str = text("", SLURM_WORD)
    qos: str = text("", SLURM_WORD)
    constraint: str = text("", SLURM_CONSTRAINT)
    time_min: int = number(240, 1, 525600)  # wall-clock limit in minutes (at most a year)
    mem_gb: int = number(0, 0, 10**6)  # 0: the partition's default
    # most restarts (SLURM_RESTART_COUNT) a run accepts: preemptions, time limits, requeues
    max_requeues: int = number(20, 0, 10**4)

    @property
    def tasks(self) -> int:
        """Processes per node: ``tasks_per_node``, or one per GPU."""
        return self.tasks_per_node or self.gpus_per_node


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
