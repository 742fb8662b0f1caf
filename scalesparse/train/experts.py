"""Expert parallelism in the ZeRO trainer: each rank trains its E/P experts of every MoE layer.

DeepSpeed averages every gradient it manages over all ranks, right for replicated weights and wrong
for experts that live on one rank. So the experts are taken out of the module DeepSpeed wraps
(model/moe/expert_parallel.shard_experts) and get their own AdamW here, with the same
hyper-parameters, decay and LR schedule as DeepSpeed's optimizer. Their gradients already sum the
contributions of every rank's tokens (the all-to-all backward), so they are scaled by 1/P to match
DeepSpeed's averaged gradients; clipping uses the joint norm of both sets (DeepSpeed's own clipping
is off), exactly what one process training the whole model would compute.

Checkpoints: experts_rank{r}.safetensors holds rank r's expert weights (full-model names, slices
along the expert dimension) and their AdamW moments; export concatenates the ranks' slices.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalesparse import comm
from scalesparse.config import Config
from scalesparse.errors import CheckpointError
from scalesparse.model.moe.expert_parallel import shard_experts
from scalesparse.train.engine import ADAM_KEYS, adam_step_device, local_grads


def shard_file(rank: int) -> str:
    return f"experts_rank{rank}.safetensors"


class ExpertParallel:
    def __init__(self, model: nn.Module, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.rank, self.world = comm.rank(), comm.world_size()
        self.device = torch.device(device)
        # fp32 on the worker's device (DeepSpeed never sees them, so never casts them to bf16; the
        # expert MLPs compute in the tokens' dtype)
        self.params = shard_experts(model, self.rank, self.world, self.device)
        t = cfg.train
        self.clip = t.grad_clip
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                           weight_decay=t.weight_decay, fused=self.device.type == "cuda")  # fmt: skip
        self.grad_norm: float | None = None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, engine) -> None:
        """At the accumulation boundary, before `engine.step()`: average the expert gradients, clip
        everything by the joint norm, and step the experts."""
        experts = [p.grad for p in self.params.values() if p.grad is not None]
        for g in experts:
            g.div_(self.world)
        dense, replicated = local_grads(engine)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sq = torch.stack([sum((g.double().pow(2).sum() for g in experts), zero),
                          sum((g.double().pow(2).sum() for g in dense), zero)])  # fmt: skip
        if replicated:  # ZeRO-0: every rank holds the whole dense gradient; count it once
            sq[1] /= self.world
        comm.all_reduce_sum(sq)  # experts and ZeRO slices are disjoint across ranks
        norm = float(sq.sum().sqrt())
        self.grad_norm = norm
        if self.clip > 0:
            coef = self.clip / (norm + 1e-6)  # DeepSpeed's rule
            if coef < 1:
                for g in experts + dense:
                    g.mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            out[name] = p.detach().clone()
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"optim/{key}/{name}"] = torch.as_tensor(value).detach().clone()
        return out

    def save(self, folder: Path) -> None:
        save_file(self.state_tensors(), str(folder / shard_file(self.rank)),
                  metadata={"ep_rank": str(self.rank), "ep_size": str(self.world)})  # fmt: skip

    def load(self, folder: Path) -> None:
        path = folder / shard_file(self.rank)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint was not written with expert parallelism)")
        tensors = load_file(str(path))
        with torch.no_grad():
            for name, p in self.params.items():
                if name not in tensors or tensors[name].shape != p.shape:
                    raise CheckpointError(f"{path}: no {name} of shape {tuple(p.shape)}")
                p.copy_(tensors[name])
                state = {key: tensors[f"optim/{key}/{name}"].to(self._state_device(key, p), copy=True)
                         for key in ("step", *ADAM_KEYS) if f"optim/{key}/{name}" in tensors}  # fmt: skip
                if state:
                    self.optimizer.state[p] = state

    def load_slices(self, read, adam_step: int) -> None:
        """Load this rank's experts from a checkpoint of any layout (elastic resume): `read(name, what,
        start, length)` gives elements of the flattened full tensor; this rank's experts are a
        contiguous run of it."""
        with torch.no_grad():
            for name, p in self.params.items():
                n = p.numel()
                start = self.rank * n
                p.copy_(read(name, "weight", start, n).view_as(p))
                state = {key: read(name, key, start, n).view_as(p).to(p.device, copy=True) for key in ADAM_KEYS}
                step = torch.tensor(float(adam_step), device=self._state_device("step", p))
                self.optimizer.state[p] = {"step": step, **state}

    def _state_device(self, key: str, p: torch.Tensor) -> torch.device:
        """Adam keeps its moments beside the weights; its step count where adam_step_device says."""
        return adam_step_device(self.optimizer, p) if key == "step" else p.device


def consolidate_experts(folder: Path) -> dict[str, torch.Tensor]:
    """The full expert tensors from every rank's experts_rank{r} file ({} without expert parallelism)."""
    files = sorted(folder.glob("experts_rank*.safetensors"))
    if not files:
        return {}
    parts = [load_file(str(folder / shard_file(r))) for r in range(len(files))]
    names = [n for n in parts[0] if not n.startswith("optim/")]
    return {n: torch.cat([p[n] for p in parts], dim=0) for n in names}
