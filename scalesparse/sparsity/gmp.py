"""Gradual magnitude pruning (Zhu & Gupta, 2017): dense-to-sparse, sparsity raised on a cubic schedule."""

from __future__ import annotations

import torch

from scalesparse.sparsity.base import SPARSIFIERS, LayerView, Position, Sparsifier
from scalesparse.sparsity.distribution import keep_counts


@SPARSIFIERS.register("gmp")
class GMP(Sparsifier):
    position = Position("during training", "dense-to-sparse", "dynamic")
    dynamic = True

    def init_masks(self, views: list[LayerView]) -> None:
        self.masks = {n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()}
        self._after_masks_changed(views)

    def sparsity_at(self, step: int) -> float:
        """s_t = s_f · (1 − (1 − progress)³), progress from start_step to stop_fraction·steps."""
        end = self.cfg.stop_fraction * self.total_steps
        progress = min(1.0, max(0.0, (step - self.cfg.start_step) / max(1.0, end - self.cfg.start_step)))
        return self.cfg.sparsity * (1 - (1 - progress) ** 3)

    def should_update(self, step: int) -> bool:
        c = self.cfg
        end = c.stop_fraction * self.total_steps
        last = int(end // c.update_interval) * c.update_interval  # the final pruning step hits s_f
        return step >= c.start_step and step <= max(last, c.update_interval) and step > 0 and (
            step % c.update_interval == 0)

    def scheduled(self, step: int) -> float:
        """The sparsity an update at `step` prunes to (the last one reaches the target exactly)."""
        return self.sparsity_at(step) if step < self.cfg.stop_fraction * self.total_steps else self.cfg.sparsity

    def mean_sparsity(self) -> float:
        """GMP trains dense at first: average the sparsity in effect over the steps (an update after
        `step` optimizer steps holds from that step on)."""
        s, total = 0.0, 0.0
        for step in range(self.total_steps):
            if self.should_update(step):
                s = self.scheduled(step)
            total += s
        return total / max(1, self.total_steps)

    def update(self, step: int, views: list[LayerView]) -> dict[str, float]:
        views = sorted(views, key=lambda v: v.name)
        self._place(views)
        before = self.wire.total
        s = self.scheduled(step)
        target = keep_counts(self.cfg.distribution, self.shapes, s)
        n = [max(0, int(self.masks[v.name].sum()) - target[v.name]) for v in views]
        drop = self.select(views, [-v.weight.abs() for v in views], [self.local_mask(v) for v in views], n)
        for v, idx in zip(views, drop):
            self.masks[v.name].view(-1)[idx] = False
        self._after_masks_changed(views)
        return {"gmp_sparsity": s, "dst_bytes": float(self.wire.total - before)}
