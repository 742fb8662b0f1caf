"""Knowledge distillation from a frozen teacher (train.distill): the teacher, the two losses, and the
step's combined loss.

    loss = (1 − w)·CE + w·D  (+ the MoE router losses, unweighted)

CE is the student's next-token cross-entropy, w = train.distill.weight, and D one of
- logits:     D = T² · mean over tokens of KL(p_t ‖ p_s),  p = softmax(z / T)   (Hinton et al. 2015);
- squarehead: D = (1/L) Σ_l mean((h_s^l − h_t^l)²) / mean((h_t^l)²)            (Kurtic et al. 2023),
  h^l the output of decoder block l over (batch, tokens, width), L the number of blocks. The paper sums
  the normalised block terms; the mean keeps D on CE's scale so one w suits every depth (llm-compressor
  gets the same by scaling its mean by L only when the user left the scale alone).

The teacher is the folder built as scalesparse's own GPT (model/pretrained.py), frozen: no gradients,
eval mode, outside the optimizer; in the workers' dtype; under ZeRO-3 partitioned like the student
(train/engine.teacher_engine). Block outputs come from forward hooks on both models' blocks, in the
same forward that gives the logits: the model code knows nothing of distillation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse import comm
from scalesparse.config import Config, DistillConfig, config_from_dict
from scalesparse.errors import ConfigError

KEY = "train.distill.teacher"


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over tokens; logits (..., V), in fp32."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (...,): one KL per token
    return temperature**2 * kl.mean()


def squarehead(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of mean((s − t)²) / mean(t²), each block's outputs (B, T, d) in fp32."""
    assert len(student) == len(teacher) > 0, (len(student), len(teacher))
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        # a block whose teacher output is all zeros would divide by 0: its plain MSE instead
        scale = (t * t).mean().clamp_min(torch.finfo(torch.float32).tiny)
        terms.append(((s.float() - t) ** 2).mean() / scale)
    return torch.stack(terms).mean()


class BlockOutputs:
    """Forward hooks that keep each decoder block's output, only inside `recording()` (evaluation
    forwards and everything else pass untouched). The hooks stay registered, so a compiled model is
    not re-traced each step."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.outputs: list[torch.Tensor] | None = None
        self.handles = [b.register_forward_hook(self._keep) for b in blocks]

    def _keep(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.outputs is not None:
            self.outputs.append(output)

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.outputs = []
        try:
            yield self.outputs
        finally:
            self.outputs = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def teacher_config(cfg: Config, student_vocab: int, student_layers: int, student_width: int) -> Config:
    """The teacher's resolved config (shapes from its folder, checked against its safetensors), and
    its fit with the student; a problem raises a one-line ConfigError naming train.distill.teacher.

    Cheap (headers only): the driver may call it before data is prepared or workers start."""
    from scalesparse.model.pretrained import resolve_pretrained

    d = cfg.train.distill
    raw = {"model": {"from_pretrained": d.teacher, "seq_len": cfg.model.seq_len},
           "moe": {"backend": cfg.moe.backend}}  # fmt: skip
    try:
        tcfg = resolve_pretrained(config_from_dict(raw))
    except ConfigError as e:  # its messages name the student's key: say it is the teacher
        raise ConfigError(str(e).replace("model.from_pretrained", KEY)) from None
    t = tcfg.model
    if t.vocab_size != student_vocab:
        raise ConfigError(f"{KEY}: {d.teacher} has {t.vocab_size} vocabulary rows, the student {student_vocab}: "
                          f"teacher and student must share the tokenizer and embedding size")  # fmt: skip
    if d.kind == "squarehead" and (t.n_layers, t.d_model) != (student_layers, student_width):
        raise ConfigError(f"{KEY}: squarehead compares block outputs one to one, but the teacher has "
                          f"{t.n_layers} blocks of width {t.d_model}, the student {student_layers} of width "
                          f"{student_width}; use kind: logits")  # fmt: skip
    return tcfg


def build_teacher(cfg: Config, student: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The frozen teacher on this worker: the whole model on `device` in train.dtype, or under ZeRO-3
    a DeepSpeed engine holding this rank's partition of it (forward gathers each block's weights)."""
    from contextlib import nullcontext

    from scalesparse.model.gpt import GPT
    from scalesparse.model.pretrained import load_pretrained, uninitialised
    from scalesparse.train.engine import born_partitioned, partitions, teacher_engine

    tcfg = teacher_config(cfg, student.vocab_size, len(student.layers), student.cfg.d_model)
    zero3 = cfg.parallel.zero_stage == 3  # born partitioned: no rank ever holds the whole teacher
    # fork_rng: building the teacher draws nothing from the run's streams
    with torch.random.fork_rng(devices=[]), born_partitioned(cfg, world) if zero3 else nullcontext(), uninitialised():
        teacher = GPT(tcfg.model, tcfg.model.vocab_size, tcfg.moe, init=False)
    load_pretrained(teacher, Path(tcfg.model.from_pretrained), seed=cfg.seed, partitions=partitions(teacher))
    teacher.requires_grad_(False).eval()
    if zero3:
        return teacher_engine(teacher, cfg, world)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32  # what DeepSpeed gives the student
    return teacher.to(device=device, dtype=dtype)


class Distiller:
    """The step's loss with a teacher: `loss(engine, x, y)` runs student and teacher on the micro-batch;
    `collect()` gives the task and distillation losses since the last log line (collective)."""

    def __init__(self, d: DistillConfig, student: nn.Module, teacher: nn.Module) -> None:
        self.d = d
        self.teacher = teacher
        self.squarehead = d.kind == "squarehead"
        if self.squarehead:
            self.student_blocks = BlockOutputs(student.layers)
            self.teacher_blocks = BlockOutputs(_plain(teacher).layers)
        self.sums: torch.Tensor | None = None  # (task, distill) summed over micro-batches, on the device
        self.count = 0

    @classmethod
    def build(cls, cfg: Config, engine, device: torch.device, world: int) -> Distiller:
        return cls(cfg.train.distill, engine.module, build_teacher(cfg, engine.module, device, world))

    def loss(self, engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.squarehead:
            with self.student_blocks.recording() as hs:
                logits, loss = engine(x, y)
            with torch.no_grad(), self.teacher_blocks.recording() as ht:
                self.teacher(x)
            distill = squarehead(hs, ht)
        else:
            logits, loss = engine(x, y)
            with torch.no_grad():
                t_logits, _ = self.teacher(x)
            distill = logits_kl(logits, t_logits, self.d.temperature)
        aux = _router_losses(engine.module)  # MoE balance and z-losses: kept at full weight
        task = loss - aux
        w = self.d.weight
        pair = torch.stack([task.detach().double(), distill.detach().double()])
        self.sums = pair if self.sums is None else self.sums + pair
        self.count += 1
        return (1 - w) * task + w * distill + aux

    def collect(self) -> dict[str, float]:
        """Mean task (cross-entropy) and distillation losses over micro-batches and ranks (collective)."""
        if self.sums is None:
            return {}
        mean = comm.all_reduce_mean(self.sums / self.count).cpu()
        self.sums, self.count = None, 0
        return {"task_loss": float(mean[0]), "distill_loss": float(mean[1])}


def _router_losses(model: nn.Module) -> torch.Tensor | float:
    moe = model.moe_layers() if model.training else []
    return torch.stack([m.aux_loss for m in moe]).sum() if moe else 0.0


def _plain(module: nn.Module) -> nn.Module:
    """The GPT inside a DeepSpeed engine, or the module itself."""
    return getattr(module, "module", module)
