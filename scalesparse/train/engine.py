"""DeepSpeed: the config built from ours, `deepspeed.initialize`, and the knobs the loop turns.

The only module that builds DeepSpeed configs or touches DeepSpeed internals.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from scalesparse.config import Config, TrainConfig


def use_cuda(cfg: Config) -> bool:
    return cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()


def select_accelerator(cfg: Config) -> None:
    """Pin DeepSpeed's accelerator before it is imported (its auto-detection probes other vendors)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda(cfg) else "cpu")


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
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
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
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


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


def sparse_views(engine, layers: dict[str, nn.Module], with_grads: bool) -> list:
    """This rank's slice of each masked weight, as live views of DeepSpeed's fp32 master weights,
    reduced gradient and Adam moments (ZeRO-0: the whole tensors).

    Valid between the backward of the last micro-batch of a step and `engine.step()`: edits made
    there steer the step, which then copies the master weights back into every rank's working
    weights (ZeRO-1/2 all-gather them, ZeRO-3 writes the partition that forward gathers).
    """
    from scalesparse import comm
    from scalesparse.sparsity.base import LayerView

    stage = engine.zero_optimization_stage()
    views = []
    for name, layer in sorted(layers.items()):
        p = layer.weight
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        numel = shape[0] * shape[1]
        if stage == 3:
            opt = p._z3_optimizer
            part = p.ds_tensor.ds_numel if hasattr(p.ds_tensor, "ds_numel") else p.ds_tensor.numel()
            start = min(numel, comm.rank() * part)
            length = max(0, min(part, numel - start))  # the last partition is zero-padded

            def local(t, length=length):
                return t.view(-1).narrow(0, 0, length)

            weight = local(opt.get_local_fp32_param(p))
            states = [local(opt.get_local_fp32_param(p, k)) for k in _adam_keys(engine, p)]
            grad = local(opt.get_local_fp32_grad_for_param(p)) if with_grads else None
        elif stage in (1, 2):
            m = p._hp_mapping
            if m is None:  # this rank owns no part of this weight
                empty = torch.empty(0)
                views.append(LayerView(name, shape, 0, empty, empty if with_grads else None, []))
                continue
            start = m.lp_fragment_address.start
            weight = m.get_hp_fragment().view(-1)
            states = [m.get_hp_fragment(k).view(-1) for k in (m.optim_fragment or {}) if k in ("exp_avg", "exp_avg_sq")]
            grad = _zero12_grad_fragment(p) if with_grads else None
        else:  # ZeRO-0: whole tensors, torch optimizer state
            start, weight = 0, p.data.view(-1)
            state = engine.optimizer.state.get(p, {}) if hasattr(engine.optimizer, "state") else {}
            states = [state[k].view(-1) for k in ("exp_avg", "exp_avg_sq") if k in state]
            grad = p.grad.view(-1) if with_grads and p.grad is not None else None
        # detached views share storage (edits land) without autograd refusing in-place writes to leaves
        views.append(LayerView(name, shape, start, weight.detach(), None if grad is None else grad.detach(),
                               [t.detach() for t in states]))  # fmt: skip
    return views


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
    opt = engine.optimizer
    state = getattr(opt, "optimizer", opt).state
    return [k for k in ("exp_avg", "exp_avg_sq") if any(k in s for s in state.values())]
