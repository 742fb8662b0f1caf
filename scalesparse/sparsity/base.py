"""The Sparsifier interface: masks, when they change, and how (one subclass per algorithm).

Algorithms see `LayerView`s: the contiguous slice of a flattened weight that this rank holds (the
whole tensor in a single process, a ZeRO-1/2/3 partition, or the same whole tensor on every rank:
ZeRO-0's replicas and the model before DeepSpeed partitions it), with its gradient and
optimizer-state slices. Every global decision goes through `comm` (`global_select`, `assemble`),
which counts each weight once whichever way it is held, so the same code runs in a unit test on one
tensor and on any number of workers; masks are full-shape and identical on all ranks. Randomness is
derived from (seed, step, layer name), so ranks agree without talking.

Masks live on the device of the views they are applied to (the GPU under CUDA training): `_place`
moves them there the first time they meet views elsewhere (masks are made or loaded on the CPU).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from scalesparse import comm
from scalesparse.config import SparsityConfig
from scalesparse.errors import ConfigError
from scalesparse.registry import Registry
from scalesparse.sparsity.distribution import keep_counts
from scalesparse.sparsity.masks import block_mask, block_scores, nm_mask, topk_mask

SPARSIFIERS: Registry[type[Sparsifier]] = Registry("sparsifier")


@dataclass(frozen=True)
class Position:
    """Where a method sits in the taxonomy of ../docs/FAIR_COMPARISON.md."""

    when: Literal["before training", "during training", "after training"]
    regime: Literal["dense-to-sparse", "sparse-to-sparse"]
    mask: Literal["static", "dynamic"]

    def __str__(self) -> str:
        return f"{self.when}, {self.regime}, {self.mask} mask"


@dataclass
class LayerView:
    name: str
    shape: tuple[int, int]
    start: int
    """Offset of this slice in the flattened weight."""
    weight: torch.Tensor
    """1-D, writable: the master weights of the slice."""
    grad: torch.Tensor | None = None
    """1-D: the (reduced) gradient of the slice, when the caller has one."""
    states: list[torch.Tensor] = field(default_factory=list)
    """1-D, writable: optimizer-state slices (Adam moments) to clear where weights die or are born."""

    @property
    def stop(self) -> int:
        return self.start + self.weight.numel()


def derived_generator(seed: int, step: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, name): every rank draws the same numbers. On `device`
    (the GPU's Philox stream there: the same on every GPU rank, other numbers than the CPU's)."""
    digest = hashlib.sha256(f"{seed}/{step}/{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Sparsifier:
    position: ClassVar[Position]
    dynamic: ClassVar[bool] = False
    needs_dense_gradient: ClassVar[bool] = False
    """Whether `init_masks` reads the dense gradient of one global batch (SNIP's sensitivity): the
    trainer then computes it, reduced over ranks, before the masks exist."""
    dense_gradient_every_update: ClassVar[bool] = False
    """Whether the method reads the dense gradient of masked layers at each update (RigL's grow
    criterion): a sparse kernel would then compute it, which the training FLOPs count."""

    def __init__(self, cfg: SparsityConfig, shapes: dict[str, tuple[int, int]], total_steps: int, seed: int) -> None:
        self.cfg, self.shapes, self.total_steps, self.seed = cfg, dict(sorted(shapes.items())), total_steps, seed
        self.target = keep_counts(cfg.distribution, self.shapes, cfg.sparsity)
        self.masks: dict[str, torch.Tensor] = {}
        self.ever_active: dict[str, torch.Tensor] = {}
        self.wire = comm.WireBytes()

    # -- lifecycle ---------------------------------------------------------------------------
    def init_masks(self, views: list[LayerView]) -> None:
        """Default: random masks with the distribution's exact per-layer counts (static/SET/RigL), or
        the starting weights' nonzeros (sparsity.mask_from: weights)."""
        if self.cfg.mask_from == "weights":
            self.masks = self.masks_from_weights(views)
            self._after_masks_changed(views)
            return
        for name, shape in self.shapes.items():
            scores = torch.rand(shape, generator=derived_generator(self.seed, -1, name))
            self.masks[name] = self._mask_from_scores(name, scores)
        self._after_masks_changed(views)

    def apply(self, views: list[LayerView]) -> None:
        """Make every weight outside the mask exactly zero, with zero optimizer state."""
        self._place(views)
        for v in views:
            dead = ~self.local_mask(v)
            v.weight.masked_fill_(dead, 0.0)
            for s in v.states:
                s.masked_fill_(dead, 0.0)

    def mask_grads(self, views: list[LayerView]) -> None:
        """Zero gradients outside the mask before the optimizer step, so dead weights get no update."""
        self._place(views)
        for v in views:
            if v.grad is not None:
                v.grad.masked_fill_(~self.local_mask(v), 0.0)

    def mean_sparsity(self) -> float:
        """Sparsity of the masked weights averaged over the run's steps (what its training FLOPs
        follow). Methods that hold the target from the first step: the target (masks from weights:
        theirs, once they exist)."""
        if self.cfg.mask_from == "weights" and self.masks:
            return self.sparsity_report()["global"]
        return self.cfg.sparsity

    def should_update(self, step: int) -> bool:
        """`step`: optimizer steps completed."""
        c = self.cfg
        return (self.dynamic and step >= c.start_step and step < c.stop_fraction * self.total_steps
                and step > 0 and step % c.update_interval == 0)  # fmt: skip

    def update(self, step: int, views: list[LayerView]) -> dict[str, float]:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------
    def select(self, views: list[LayerView], scores: list[torch.Tensor], eligible: list[torch.Tensor],
               counts: list[int]) -> list[torch.Tensor]:  # fmt: skip
        """Global flat indices of the counts[l] highest scores among eligible entries of each layer,
        decided from every rank's slices; identical on all ranks."""
        keys = [comm.float_keys(s) for s in scores]
        return comm.global_select(keys, eligible, [v.start for v in views], counts, self.wire)

    def masks_from_scores(self, views: list[LayerView], scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full-shape masks keeping each layer's highest scores (scores[l]: one per entry of views[l]) at
        the configured granularity and the distribution's exact counts; identical on all ranks."""
        if self.cfg.granularity == "unstructured":  # a sparse global top-k: only the chosen indices travel
            keep = self.select(views, scores, [torch.ones_like(s, dtype=torch.bool) for s in scores],
                               [self.target[v.name] for v in views])  # fmt: skip
            masks = {}
            for v, idx in zip(views, keep):
                masks[v.name] = torch.zeros(v.shape, dtype=torch.bool, device=v.weight.device)
                masks[v.name].view(-1)[idx] = True
            return masks
        # N:M groups and blocks straddle slice boundaries: these decisions need each layer's whole scores
        whole = comm.assemble(scores, [v.start for v in views], [v.shape[0] * v.shape[1] for v in views], self.wire)
        return {v.name: self._mask_from_scores(v.name, w.view(v.shape)) for v, w in zip(views, whole)}

    def masks_from_weights(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        """Full-shape masks of exactly the nonzero weights, each entry decided by the rank that owns it
        (`comm.assemble`): identical on every rank whether it holds a slice or a replica. One byte per
        weight on the wire, once. Refuses weights without a zero, and N:M masks the zeros break."""
        views = sorted(views, key=lambda v: v.name)
        nonzero = [(v.weight != 0).to(torch.uint8) for v in views]
        whole = comm.assemble(nonzero, [v.start for v in views], [v.shape[0] * v.shape[1] for v in views], self.wire)
        masks = {v.name: w.view(v.shape).bool() for v, w in zip(views, whole)}
        if all(bool(m.all()) for m in masks.values()):
            raise ConfigError("sparsity.mask_from: weights, but the masked layers have no zero weight (a dense "
                              "model?): prune it first (scalesparse prune), or use mask_from: method")  # fmt: skip
        if self.cfg.granularity == "nm":
            n, m = self.cfg.n, self.cfg.m
            for name, mask in masks.items():
                out_f, in_f = mask.shape
                if in_f % m or int(mask.view(out_f, in_f // m, m).sum(-1).max()) > n:
                    raise ConfigError(f"sparsity.mask_from: weights with granularity nm: the zeros of {name} are "
                                      f"not {n}:{m} (a group of {m} inputs holds more than {n} nonzeros)")  # fmt: skip
        return masks

    def _place(self, views: list[LayerView]) -> None:
        """Move the masks to the views' device if they are elsewhere (once: then they stay)."""
        device = next((v.weight.device for v in views if v.weight.numel()), None)
        if device is None or not self.masks or next(iter(self.masks.values())).device == device:
            return
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        self.ever_active = {n: m.to(device) for n, m in self.ever_active.items()}

    def local_mask(self, v: LayerView) -> torch.Tensor:
        return self.masks[v.name].view(-1)[v.start : v.stop]

    def _mask_from_scores(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.granularity == "nm":
            return nm_mask(scores, c.n, c.m)
        if c.granularity == "block":
            numel = scores.numel()
            return block_mask(scores, self.target[name] / numel, c.block_size)
        return topk_mask(scores, self.target[name])

    def _after_masks_changed(self, views: list[LayerView]) -> None:
        self._place(views)
        for name, m in self.masks.items():
            self.ever_active[name] = self.ever_active.get(name, torch.zeros_like(m)) | m
        self.apply(views)

    def drop_fraction(self, step: int) -> float:
        c = self.cfg
        end = c.stop_fraction * self.total_steps
        progress = min(1.0, max(0.0, (step - c.start_step) / max(1.0, end - c.start_step)))
        if c.decay == "cosine":
            return c.drop_fraction * 0.5 * (1 + math.cos(math.pi * progress))
        if c.decay == "linear":
            return c.drop_fraction * (1 - progress)
        return c.drop_fraction

    # -- reporting -------------------------------------------------------------------------------
    def sparsity_report(self) -> dict[str, float]:
        """Figures of the masks in force: global sparsity, exact counts (weights under masks, zeros
        among them), fraction ever active, and each layer's sparsity under `layer/<name>`."""
        per_layer = {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        itop = sum(int(m.sum()) for m in self.ever_active.values()) / total
        layers = {f"layer/{n}": s for n, s in per_layer.items()}
        return {"global": 1.0 - kept / total, "weights": total, "zeros": total - kept, "in_time_overparam": itop,
                **layers}  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        from scalesparse.sparsity.masks import pack

        out = {f"mask/{n}": pack(m) for n, m in self.masks.items()}
        out.update({f"ever/{n}": pack(m) for n, m in self.ever_active.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from scalesparse.sparsity.masks import unpack

        self.masks = {n: unpack(state[f"mask/{n}"], s) for n, s in self.shapes.items()}
        self.ever_active = {n: unpack(state[f"ever/{n}"], s) for n, s in self.shapes.items()}


class DropAndGrow(Sparsifier):
    """Sparse-to-sparse DST: every ΔT steps drop the α·active smallest-magnitude weights of each layer
    and grow as many where `grow_scores` is largest; sparsity stays constant. Subclasses differ only
    in `grow_scores` (JaxPruner's observation: RigL is SET with one method changed)."""

    position = Position("during training", "sparse-to-sparse", "dynamic")
    dynamic = True

    def grow_scores(self, step: int, v: LayerView) -> torch.Tensor:
        raise NotImplementedError

    def update(self, step: int, views: list[LayerView]) -> dict[str, float]:
        views = sorted(views, key=lambda v: v.name)  # every rank walks the layers in the same order
        self._place(views)
        before = self.wire.total
        frac = self.drop_fraction(step)
        if self.cfg.granularity == "block":
            changed = self._update_blocks(step, views, frac)
        else:
            n = [round(frac * int(self.masks[v.name].sum())) for v in views]
            drop = self.select(views, [-v.weight.abs() for v in views], [self.local_mask(v) for v in views], n)
            for v, idx in zip(views, drop):
                self.masks[v.name].view(-1)[idx] = False
            grow = self.select(views, [self.grow_scores(step, v) for v in views],
                               [~self.local_mask(v) for v in views], n)
            for v, idx in zip(views, grow):
                self.masks[v.name].view(-1)[idx] = True
            changed = {v.name: torch.cat([d, g]) for v, d, g in zip(views, drop, grow)}
        # regrown weights start at zero (and with no optimizer history), so the loss does not jump
        for v in views:
            idx = changed[v.name]
            local = idx[(idx >= v.start) & (idx < v.stop)] - v.start
            v.weight[local] = 0.0
            for s in v.states:
                s[local] = 0.0
        self._after_masks_changed(views)
        total = sum(m.numel() for m in self.masks.values())
        return {"dst_drop_fraction": frac, "dst_churn": sum(i.numel() for i in changed.values()) / 2 / total,
                "dst_bytes": float(self.wire.total - before)}  # fmt: skip

    def _update_blocks(self, step: int, views: list[LayerView], frac: float) -> dict[str, torch.Tensor]:
        """Block granularity: per-block scores are summed from each rank's slice and all-reduced
        (numel / block² values per layer), then every rank makes the same block-level choice."""
        b, changed = self.cfg.block_size, {}
        # each weight's score is summed in by one rank only, also where every rank holds the whole weight
        owned = comm.owned_ranges([v.start for v in views], [v.weight.numel() for v in views])
        for v, (lo, hi) in zip(views, owned):
            mine = slice(lo - v.start, hi - v.start)
            full_drop = torch.zeros(v.shape, device=v.weight.device).view(-1)
            full_grow = torch.zeros(v.shape, device=v.weight.device).view(-1)
            full_drop[lo:hi] = v.weight.abs()[mine]
            full_grow[lo:hi] = self.grow_scores(step, v)[mine]
            pooled = comm.all_reduce_sum(torch.stack([block_scores(full_drop.view(v.shape), b),
                                                      block_scores(full_grow.view(v.shape), b)]))  # fmt: skip
            self.wire.add(pooled.numel() * 4)
            bmask = self.masks[v.name][::b, ::b].clone()
            n = round(frac * int(bmask.sum()))
            active_scores = torch.where(bmask, -pooled[0], torch.full_like(pooled[0], -math.inf))
            drop = torch.sort(active_scores.view(-1), descending=True, stable=True).indices[:n]
            bmask.view(-1)[drop] = False
            grow_scores = torch.where(bmask, torch.full_like(pooled[1], -math.inf), pooled[1])
            grow = torch.sort(grow_scores.view(-1), descending=True, stable=True).indices[:n]
            bmask.view(-1)[grow] = True
            new = bmask.repeat_interleave(b, 0).repeat_interleave(b, 1)
            changed[v.name] = torch.nonzero((new ^ self.masks[v.name]).view(-1)).flatten()
            self.masks[v.name] = new
        return changed
