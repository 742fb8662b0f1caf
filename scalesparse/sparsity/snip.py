"""SNIP (Lee et al., 2019): prune at initialisation by connection sensitivity |w · ∂L/∂w| from one dense
gradient, then keep the mask fixed."""

from __future__ import annotations

import torch

from scalesparse.sparsity.base import SPARSIFIERS, LayerView, Position, Sparsifier


@SPARSIFIERS.register("snip")
class SNIP(Sparsifier):
    position = Position("before training", "sparse-to-sparse", "static")
    needs_dense_gradient = True

    def init_masks(self, views: list[LayerView]) -> None:
        views = sorted(views, key=lambda v: v.name)
        if any(v.grad is None for v in views):
            raise RuntimeError("snip needs one dense gradient at initialisation")
        whole = all(v.weight.numel() == v.shape[0] * v.shape[1] for v in views)
        if self.cfg.granularity != "unstructured" and not whole:
            raise NotImplementedError("snip with N:M or block granularity needs whole (unsharded) layers")
        if self.cfg.granularity == "unstructured":
            keep = self.select(views, [(v.weight * v.grad).abs() for v in views],
                               [torch.ones_like(v.weight, dtype=torch.bool) for v in views],
                               [self.target[v.name] for v in views])
            for v, idx in zip(views, keep):
                m = torch.zeros(v.shape, dtype=torch.bool, device=v.weight.device)
                m.view(-1)[idx] = True
                self.masks[v.name] = m
        else:
            for v in views:
                self.masks[v.name] = self._mask_from_scores(v.name, (v.weight * v.grad).abs().view(v.shape))
        self._after_masks_changed(views)
