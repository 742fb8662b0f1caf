"""SNIP (Lee et al., 2019): prune at initialisation by connection sensitivity |w · ∂L/∂w| from one dense
gradient, then keep the mask fixed."""

from __future__ import annotations

from scalesparse.sparsity.base import SPARSIFIERS, LayerView, Position, Sparsifier


@SPARSIFIERS.register("snip")
class SNIP(Sparsifier):
    position = Position("before training", "sparse-to-sparse", "static")
    needs_dense_gradient = True

    def init_masks(self, views: list[LayerView]) -> None:
        views = sorted(views, key=lambda v: v.name)  # every rank walks the layers in the same order
        if any(v.grad is None for v in views):
            raise RuntimeError("snip needs one dense gradient at initialisation")
        self.masks = self.masks_from_scores(views, [(v.weight * v.grad).abs() for v in views])
        self._after_masks_changed(views)
