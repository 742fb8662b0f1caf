"""Magnitude pruning: drop the smallest |w| of each layer (no calibration data needed)."""

from __future__ import annotations

import torch

from scalesparse.pruning.base import PRUNERS, Pruner, weight_matrix


@PRUNERS.register("magnitude")
class Magnitude(Pruner):
    needs_inputs = False

    def prune(self, sparsity, nm=None):
        w = weight_matrix(self.layer).detach().float()
        keep = self.keep_from_scores(w.abs(), sparsity, nm, per_row=False)
        return keep, torch.where(keep, w, torch.zeros_like(w))
