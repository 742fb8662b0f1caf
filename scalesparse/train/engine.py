"""DeepSpeed: the config built from ours, `deepspeed.initialize`, and the knobs the loop turns.

The only module that builds DeepSpeed configs or touches DeepSpeed internals.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scalesparse.config import Config, TrainConfig


def use_cuda(cfg: Config) -> bool:
    return cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()


def worker_device(cfg: Config) -> torch.device:
    """This worker's device, the one owner of that decision: its local GPU (LOCAL_RANK among the
    visible ones, as Ray Train and torchrun set it, the same rule DeepSpeed follows), else the CPU.
    Made current, so tensors created with device="cuda" land there too."""
    if not use_cuda(cfg):
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def select_accelerator(cfg: Config) -> None:
    """Pin DeepSpeed's accelerator before it is imported (its auto-detection probes other vendors).
    Set from the config, not defaulted: a value inherited from the launching process (a CPU test
    session starting GPU workers, say) must not put a GPU run on DeepSpeed's CPU accelerator."""
    os.environ["DS_ACCELERATOR"] = "cuda" if use_cuda(cfg) else "cpu"


def use_deterministic_kernels(on: bool) -> None:
    """Bit-identical reruns and resumes on a GPU (train.deterministic), or the fastest kernels.

    Three sources of run-to-run noise on CUDA: cuBLAS's split-K workspaces (fixed by its workspace
    setting, read when its first handle is made: call this before the model reaches the GPU), ops
    that accumulate with atomics (torch's deterministic mode; warn-only, so an op without a
    deterministic kernel warns instead of stopping a run), and attention: the flash, memory-efficient
    and cuDNN backends of scaled_dot_product_attention accumulate their backward with atomics, and in
    warn-only mode stay non-deterministic. So the deterministic mode trains with the math backend,
    which materialises the (T, T) scores: slower and more memory at long sequences. CPU training is
    deterministic either way."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # shown once per op whatever else filters torch's warnings: it names what stays non-deterministic
        warnings.filterwarnings("default", message=".*does not have a deterministic implementation.*")
    torch.use_deterministic_algorithms(on, warn_only=True)
    # set both ways: one process may run several configs (train/single.py)
    torch.backends.cuda.enable_flash_sdp(not on)
    torch.backends.cuda.enable_mem_efficient_sdp(not on)
    torch.backends.cuda.enable_cudnn_sdp(not on)
    torch.backends.cuda.enable_math_sdp(True)


def expert_parallel(cfg: Config) -> bool:
    return cfg.model.mlp == "moe" and cfg.moe.expert_parallel > 1


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world),
        # expert parallelism clips by the joint norm of DeepSpeed's and the experts' gradients itself
        "gradient_clipping": 0.0 if expert_parallel(cfg) else t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": False},
        # the optimizer is our torch AdamW (DeepSpeed's fused Adam needs CUDA ops)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (Linear weights, embeddings); never norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # yields a tied weight once
        if p.requires_grad:  # (a parameter born partitioned is empty here: its ds_shape is the real one)
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, t: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def build_engine(model: nn.Module, cfg: Config, world: int):
    import deepspeed

    t = cfg.train
    # fused: one kernel for all of AdamW's elementwise math on CUDA; on CPU the arithmetic stays as it was
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=use_cuda(cfg)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    if t.compile:
        engine.compile()
    return engine


def teacher_engine(teacher: nn.Module, cfg: Config, world: int):
    """A frozen distillation teacher partitioned like a ZeRO-3 student: DeepSpeed's ZeRO-3 engine with
    no optimizer (its ZeRO-Inference path) keeps 1/world of each weight on this rank, in the student's
    dtype, and gathers a module's weights only for its forward. Every rank must run the teacher's
    forward the same number of times (the gathers are collective)."""
    import deepspeed

    config = {**deepspeed_config(cfg, world), "zero_optimization": {"stage": 3}, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def born_partitioned(cfg: Config, world: int):
    """A context in which modules are ZeRO-3 partitioned as they are built (DeepSpeed's zero.Init): each
    parameter is made whole, cut to this rank's 1/world and the rest freed before the next module, so
    no worker ever holds the whole model; the engine built from them later adopts the partitions.
    `partitions(model)` then gives the slices to load into, and every parameter must be written
    there: the values a module draws at build time are not made equal across ranks.

    zero.Init broadcasts each whole parameter from rank 0 before cutting it, so that ranks that drew
    different values agree. Every value is read from the checkpoint next, so that broadcast is skipped:
    measured on SmolLM2-135M (2 CPU workers), it made loading 7x slower than ZeRO-2's and wrote every
    page of each whole tensor, which left the process holding 1.3x the model's size."""
    import deepspeed

    from scalesparse import comm

    class FromCheckpoint(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    deepspeed.init_distributed(dist_backend=comm.backend(), auto_mpi_discovery=False)
    config = {**deepspeed_config(cfg, world), "zero_optimization": {"stage": 3}, "gradient_clipping": 0.0}
    init = FromCheckpoint if hasattr(deepspeed.zero.Init, "_zero_init_param") else deepspeed.zero.Init
    with init(config_dict_or_path=config):
        yield
    # A parameter replaced after it was made (a tied LM head's own weight) is held by reference cycles
    # through zero.Init's closures, its partition with it, until the collector runs (SmolLM2: 54 MB)
    gc.collect()


@dataclass(frozen=True)
class Partition:
    shape: tuple[int, ...]  # the whole parameter's
    start: int  # the first element this rank holds, in the flattened parameter
    local: torch.Tensor  # the elements held: a live view of the partition, its zero padding left out


def partitions(model: nn.Module) -> dict[str, Partition]:
    """This rank's partition of every parameter of a model built under `born_partitioned` (before or
    after the engine wraps it); empty for a model held whole."""
    from scalesparse import comm

    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):
            shape = tuple(p.ds_shape)
            start, length = _z3_local_range(p, math.prod(shape), comm.rank())
            out[name] = Partition(shape, start, p.ds_tensor.view(-1).narrow(0, 0, length))
    return out


def set_lr(engine, lr: float) -> None:
    # The schedule is a pure function of the step, so resume needs no scheduler state.
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _safe_checkpoint_engine(inner):
    """Wrap DeepSpeed's checkpoint engine so its files load with torch.load(weights_only=True).

    DeepSpeed's own engine unpickles them without restriction; its checkpoints hold only tensors,
    containers, numbers and strings plus a few DeepSpeed enums, which we allow by name.
    """

    class SafeLoad:
        def __getattr__(self, name):
            return getattr(inner, name)

        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeLoad()


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # plain records (enum, scaler settings, a namedtuple of offsets): rebuilt without running code
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def local_model_shard(engine) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The model weights this rank owns, for export without DeepSpeed or pickles.

    ZeRO-3: each rank's flat partition of every parameter (ds_tensor; rank r holds elements
    [r·p, (r+1)·p) of the flattened tensor, the last partition zero-padded). Below ZeRO-3 every rank
    holds the full fp32 weights, so rank 0 writes them all and the others write nothing.
    """
    import json

    from scalesparse import comm

    params = dict(engine.module.named_parameters())  # a tied weight appears once
    if engine.zero_optimization_partition_weights():
        tensors = {n: p.ds_tensor.detach().clone() for n, p in params.items()}
        shapes = {n: list(p.ds_shape) for n, p in params.items()}
        meta = {"format": "zero3", "world": str(comm.world_size()), "shapes": json.dumps(shapes)}
        return tensors, meta
    if comm.rank() != 0:
        return None
    tensors = {n: p.detach().clone() for n, p in params.items()}
    return tensors, {"format": "full", "world": str(comm.world_size())}


ADAM_KEYS = ("exp_avg", "exp_avg_sq")  # the AdamW state that lives beside each weight element


def sparse_views(engine, layers: dict[str, nn.Module], with_grads: bool) -> list:
    """This rank's slice of each masked weight, as live views of DeepSpeed's fp32 master weights,
    reduced gradient and Adam moments (ZeRO-0: the whole tensors).

    Valid between the backward of the last micro-batch of a step and `engine.step()`: edits made
    there steer the step, which then copies the master weights back into every rank's working
    weights (ZeRO-1/2 all-gather them, ZeRO-3 writes the partition that forward gathers).
    """
    return param_views(engine, {name: layer.weight for name, layer in layers.items()}, with_grads)


def param_views(engine, params: dict[str, nn.Parameter], with_grads: bool = False) -> list:
    """For each parameter, the slice this rank owns of its flattened fp32 master copy, with its Adam
    moments (exp_avg, exp_avg_sq, in that order, once they exist) and optionally its reduced gradient,
    all live views: a LayerView (name, full shape, start offset, slices). ZeRO-0: whole tensors."""
    from scalesparse import comm
    from scalesparse.sparsity.base import LayerView

    stage = engine.zero_optimization_stage()
    views = []
    for name, p in sorted(params.items()):
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        numel = math.prod(shape)
        if stage == 3:
            opt = p._z3_optimizer
            start, length = _z3_local_range(p, numel, comm.rank())

            def local(t, length=length):
                return t.view(-1).narrow(0, 0, length)

            weight = local(opt.get_local_fp32_param(p))
            states = [local(opt.get_local_fp32_param(p, k)) for k in _adam_keys(engine, p)]
            grad = local(opt.get_local_fp32_grad_for_param(p)) if with_grads else None
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer): fp32 fragments
            m = p._hp_mapping
            if m is None:  # this rank owns no part of this weight
                empty = torch.empty(0, device=p.device)
                views.append(LayerView(name, shape, 0, empty, empty if with_grads else None, []))
                continue
            start = m.lp_fragment_address.start
            weight = m.get_hp_fragment().view(-1)
            states = _fragment_states(engine, m)
            grad = _zero12_grad_fragment(p) if with_grads else None
        else:  # ZeRO-0: whole tensors, torch optimizer state
            start, weight = 0, p.data.view(-1)
            state = engine.optimizer.state.get(p, {}) if hasattr(engine.optimizer, "state") else {}
            states = [state[k].view(-1) for k in ADAM_KEYS if k in state]
            grad = p.grad.view(-1) if with_grads and p.grad is not None else None
        # detached views share storage (edits land) without autograd refusing in-place writes to leaves
        views.append(LayerView(name, shape, start, weight.detach(), None if grad is None else grad.detach(),
                               [t.detach() for t in states]))  # fmt: skip
    return views


def _fragment_states(engine, m) -> list[torch.Tensor]:
    """ZeRO-1/2: this fragment's Adam moments, sliced from the flat partition's optimizer state.

    Not `m.optim_fragment`: DeepSpeed 0.19.8 links those after the first parameter group's first
    step, before the second group has any state, so they stay empty for the no-decay group."""
    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
    state = _inner_optimizer(engine).state.get(flats[m.param_group_index], {})
    a = m.hp_fragment_address
    return [state[k].narrow(0, a.start, a.numel) for k in ADAM_KEYS if k in state]


def _z3_local_range(p: nn.Parameter, numel: int, rank: int) -> tuple[int, int]:
    """ZeRO-3: rank r holds elements [r·part, (r+1)·part) of the flattened parameter; the last
    partition is zero-padded, so its real length can be shorter (or 0)."""
    part = p.ds_tensor.ds_numel if hasattr(p.ds_tensor, "ds_numel") else p.ds_tensor.numel()
    start = min(numel, rank * part)
    return start, max(0, min(part, numel - start))


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW doing the arithmetic (DeepSpeed's ZeRO optimizers wrap it as `.optimizer`)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def adam_step(engine) -> int | None:
    """Optimizer steps Adam has taken (its bias correction depends on it); None before the first."""
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return None


def adam_step_device(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.device:
    """Where torch's AdamW keeps a parameter's step count: beside it when fused or capturable (their
    kernels read it on the device), else on the CPU."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return p.device if on_device else torch.device("cpu")


def prepare_optimizer_state(engine, step: int) -> None:
    """Create Adam's state before the first step, as torch would at that step (zero moments), with
    its step count set to `step`, and link DeepSpeed's per-parameter views onto it; a resume then
    writes the saved moments through `param_views`. (torch creates the state lazily in `step()`.)"""
    inner = _inner_optimizer(engine)
    for p in _optimized_tensors(engine):
        state = inner.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=adam_step_device(inner, p))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: per-parameter fragments of the flat state, made on first step
        link()


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors Adam keeps state for: DeepSpeed's flat fp32 partitions (ZeRO-3 hands them to the
    optimizer one sub-group at a time, so its param_groups are empty between steps), else the params."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats:
            return list(flats)
    return [p for group in _inner_optimizer(engine).param_groups for p in group["params"]]


def write_working_weights(engine, params: dict[str, nn.Parameter], read) -> None:
    """After the fp32 master copies were loaded: put the same values into the weights forward uses.
    `read(name, start, length)` returns elements [start, start + length) of the flattened weight.

    ZeRO-0 trains on the master weights themselves. ZeRO-1/2 keep the full working weights on every
    rank (bf16 or fp32). ZeRO-3 keeps this rank's partition in `ds_tensor`, and small "persistent"
    parameters also stay gathered in full (DeepSpeed refreshes them only after a step)."""
    from scalesparse import comm

    stage = engine.zero_optimization_stage()
    with torch.no_grad():
        for name, p in params.items():
            if stage == 3:
                numel = p.ds_numel
                start, length = _z3_local_range(p, numel, comm.rank())
                if length:
                    p.ds_tensor.view(-1).narrow(0, 0, length).copy_(read(name, start, length))
                if p.data.numel() == numel:
                    p.data.copy_(read(name, 0, numel).view_as(p.data))
            elif hasattr(p, "_hp_mapping"):
                p.data.copy_(read(name, 0, p.numel()).view_as(p.data))


def set_progress_counters(engine, step: int, samples: int) -> None:
    """DeepSpeed's own step and sample counters, as its load_checkpoint would restore them."""
    engine.global_steps = step
    engine.global_samples = samples


def _zero12_grad_fragment(p: nn.Parameter) -> torch.Tensor:
    """ZeRO-1/2: this rank's slice of p's reduced gradient (a live view), flattened."""
    m = p._hp_mapping
    start, length = m.lp_fragment_address.start, m.lp_fragment_address.numel
    grad = m.get_lp_grad_fragment(p._index_in_param_group).view(-1)
    if grad.numel() == p.numel() and length != p.numel():
        grad = grad.narrow(0, start, length)
    return grad


def local_grads(engine) -> tuple[list[torch.Tensor], bool]:
    """Live views of the reduced gradients this rank holds at the accumulation boundary (before
    `engine.step()`), and whether every rank holds all of them (ZeRO-0) rather than a disjoint slice."""
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    if stage == 0:
        return [p.grad.detach() for p in params if p.grad is not None], True
    if stage in (1, 2):
        return [_zero12_grad_fragment(p).detach() for p in params if p._hp_mapping is not None], False
    raise NotImplementedError("local_grads: ZeRO-3 is not supported")


def _adam_keys(engine, p) -> list[str]:
    state = _inner_optimizer(engine).state
    return [k for k in ADAM_KEYS if any(k in s for s in state.values())]
