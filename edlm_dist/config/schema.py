"""Typed run configuration.

Every run is described by one :class:`RunConfig`, loaded from YAML with dotted
``key=value`` overrides (see :mod:`edlm_dist.config.load`) and validated before any
work starts. Defaults are tiny so that a bare config runs on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Paper presets (spec §2.3): hidden size, blocks, heads. cond_dim is 128 for all.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 512, "n_blocks": 8, "n_heads": 8, "cond_dim": 128},
    "small": {"hidden_size": 768, "n_blocks": 12, "n_heads": 12, "cond_dim": 128},
    "medium": {"hidden_size": 1024, "n_blocks": 24, "n_heads": 16, "cond_dim": 128},
}


@dataclass
class ModelConfig:
    """Backbone shape. ``vocab_size`` and ``length`` come from the data section."""

    preset: Optional[str] = None  # tiny | small | medium; overrides the sizes below
    hidden_size: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    cond_dim: int = 32
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_conditioning: bool = False  # MDLM default: off (spec §2.1)
    activation_checkpointing: bool = False
    use_apex: bool = True  # fused LayerNorm/Adam when NVIDIA apex imports; else torch


@dataclass
class SyntheticConfig:
    """The exact-oracle synthetic language (docs/synthetic_language.md)."""

    num_tokens: int = 32  # real (non-special) tokens
    num_topics: int = 4  # latent mixture components, fixed per document
    branching: int = 3  # allowed next tokens per (order)-gram context
    order: int = 1  # Markov order of each component (1 learns far faster than 2 on CPU; see the doc)
    concentration: float = 0.5  # Dirichlet concentration of allowed transitions
    smoothing: float = 1e-4  # mass spread over disallowed tokens (keeps log p finite)
    seed: int = 1234  # seed of the language itself (not of the samples)
    train_rows: int = 20000
    valid_rows: int = 2000


@dataclass
class DataConfig:
    dir: str = ""  # prepared dataset: a folder, an http(s):// URL or a pipe: command with {} (docs/data.md)
    source: str = "synthetic"  # synthetic | text | jsonl | hf | text8 | pydoc (CPython's help topics)
    input: str = ""  # text/jsonl/text8: the input file; hf: a save_to_disk folder (edlm pipeline prepares it)
    tokenizer: str = "synthetic"  # synthetic | char | byte | gpt2 | text8 | hf:NAME | a tokenizer folder
    tokenizer_vocab: int = 0  # char/byte learnt from the training text: 0 = every char / the 256 bytes; else the size
    max_unk_rate: float = 0.01  # prepare-data refuses a split with a larger share of [UNK] tokens (1.0: accept any)
    seq_len: int = 32
    vocab_size: int = 0  # 0: take it from the manifest / tokenizer
    wrap: bool = False  # MDLM [BOS]+chunk+[EOS] wrapping (spec §1.2); synthetic rows are whole documents
    shard_rows: int = 5000
    shuffle_buffer: int = 512
    num_workers: int = 0
    read_retries: int = 2  # remote shards: retries after a failed read (then an error, never a skipped shard)
    retry_delay_s: float = 1.0  # wait before the first retry; doubles with each further one
    seed: int = 1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (Megatron-core)
    dp: int = 0  # data-parallel degree; 0 = world_size / (tp * pp)
    pp: int = 1  # pipeline parallel: only 1 is supported
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    timeout_s: int = 600  # collective timeout: a dead peer fails the run instead of hanging


@dataclass
class TrainConfig:
    objective: str = "mdlm"  # mdlm | ar | nce
    steps: int = 200
    global_batch: int = 32
    micro_batch: int = 16
    lr: float = 3e-4
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # constant (MDLM-OWT) | cosine (text8, paper C.1)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema: float = 0.9999  # 0 disables EMA
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    antithetic: bool = True
    sampling_eps: float = 1e-3
    n_negatives: int = 1  # NCE negatives per positive (Eq. 10)
    negatives_dtype: str = "float64"  # categorical sampling precision for NCE negatives
    diffusion_ckpt: str = ""  # nce: the trained diffusion model (frozen p_theta)
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 4
    save_every: int = 100
    keep_last: int = 2
    seed: int = 1


@dataclass
class SampleConfig:
    sampler: str = "mdlm"  # mdlm | edlm | ar (the AR baseline, spec §5.7)
    update: str = "ddpm_cache"  # ddpm | ddpm_cache
    energy: str = "ar"  # ar | coar | nce | oracle (edlm only)
    steps: int = 32
    k: int = 2  # importance-sampling proposals per step
    window: Any = 0.2  # IS for grid times t in [t_lo, t_hi] = window (a pair), or [1 - window, 1] (a number)
    temperature: float = 1.0  # edlm: IS weights exp(-E / tau); ar: logits / tau
    block_size: int = 0  # commit the row block by block, left to right (docs/sampling.md); 0 = one block of L
    block_proposal: str = "denoiser"  # block-wise EDLM-AR/coAR: ar_first = each block's first token from p_AR
    top_k: int = 0  # ar only, not the paper's protocol: keep the k likeliest next tokens (0 = all)
    top_p: float = 1.0  # ar only, not the paper's protocol: nucleus mass (1.0 = all)
    kv_cache: bool = True  # ar: incremental decoding; false recomputes the prefix per token (spec §5.7)
    redraw_every_step: bool = True  # Alg. 1; False reuses x0* while nothing changes (ref. code)
    skip_idle_is: bool = True  # redraw mode: no IS for a row whose step reveals nothing (same tokens, docs/sampling.md)
    noise_removal: bool = True
    precision: str = "float64"  # categorical sampling precision: float64 | float32 | bfloat16
    num_samples: int = 16
    batch_size: int = 8
    seed: int = 1
    use_ema: bool = True
    proposal_parallel: int = 0  # ranks sharing one sequence's k proposals; 0 = auto (docs/sampling.md)
    diffusion_ckpt: str = ""
    ar_ckpt: str = ""
    energy_ckpt: str = ""


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
    metrics: list[str] = field(default_factory=lambda: ["ppl", "genppl", "entropy"])
    samples: list[str] = field(default_factory=list)  # sample JSONL files; empty: sample on the fly
    oracle: str = "exact"  # exact (synthetic language) | ngram (fitted on the validation text) | an HF causal LM
    judge_order: int = 5  # eval.oracle=ngram: n-gram order of the Kneser-Ney judge
    oracle_batch_size: int = 8
    n_negatives: int = 16  # Theorem-1 partition estimates
    batch_size: int = 16
    max_batches: int = 0  # 0: the whole validation split
    seed: int = 1
    diffusion_ckpt: str = ""
    ar_ckpt: str = ""
    energy_ckpt: str = ""


@dataclass
class PipelineConfig:
    methods: list[str] = field(default_factory=lambda: ["mdlm", "edlm-ar", "edlm-coar", "edlm-nce", "edlm-oracle"])
    step_counts: list[int] = field(default_factory=lambda: [4, 8, 16])
    mdlm_steps: int = 300
    ar_steps: int = 300
    nce_steps: int = 150
    num_samples: int = 64


@dataclass
class LoggingConfig:
    wandb_mode: str = "disabled"  # disabled | offline | online
    wandb_project: str = "edlm-dist"
    run_name: str = ""
    progress: bool = True


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 240
    mem_gb: int = 0
    max_requeues: int = 20


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
