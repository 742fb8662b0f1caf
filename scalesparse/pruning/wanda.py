"""Wanda (Sun et al., 2024): score |w_ij| · ‖x_j‖₂ over calibration tokens, compared within each output
row; no weight update."""

from __future__ import annotations

import torch

from scalesparse.pruning.base import PRUNERS, Pruner, weight_matrix


@PRUNERS.register("wanda")
class Wanda(Pruner):
    def __init__(self, layer, **options):
        super().__init__(layer)
        # Σ over tokens of x_j², where the layer is
        self.sq_sum = torch.zeros(self.columns, dtype=torch.float64, device=layer.weight.device)

    def add_batch(self, inp):
        # a copy (never the layer's own input, even in fp64) squared in place: one temporary fewer;
        # an fp32 or bf16 value's square is exact in fp64
        x = inp.reshape(-1, inp.shape[-1]).to(torch.float64, copy=True)
        self.sq_sum += x.square_().sum(0)
        self.nsamples += x.shape[0]

    def stats(self):
        return [self.nsamples, self.sq_sum]

    def prune(self, sparsity, nm=None):
        w = weight_matrix(self.layer).detach().float()
        scores = w.abs() * self.sq_sum.sqrt().float().unsqueeze(0)
        keep = self.keep_from_scores(scores, sparsity, nm, per_row=True)
        return keep, torch.where(keep, w, torch.zeros_like(w))
