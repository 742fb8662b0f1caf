"""SparseGPT (Frantar & Alistarh, 2023): layer-wise OBS pruning with error compensation.

H = 2·XXᵀ/n from the calibration inputs, dampened by `damp` × mean(diag H). Columns are processed in
blocks; within a block the mask is chosen from w²/[H⁻¹]²_jj (adaptively, per block), then each column is
pruned in turn and its error pushed onto the not-yet-processed columns through the upper Cholesky
factor of H⁻¹; the block's accumulated error is applied to the remaining columns in one matmul.
"""

from __future__ import annotations

import torch

from scalesparse.pruning.base import PRUNERS, Pruner, weight_matrix
from scalesparse.sparsity.masks import smallest


@PRUNERS.register("sparsegpt")
class SparseGPT(Pruner):
    needs_gram = True

    def __init__(self, layer, blocksize: int = 128, damp: float = 0.01, external_gram: bool = False, **options):
        """external_gram: the caller accumulates Σxxᵀ (shared by layers that read the same input, as the
        calibration walk does) and sets `self.xxt` before `prune`; add_batch then only counts tokens."""
        super().__init__(layer)
        self.blocksize, self.damp, self.external_gram = blocksize, damp, external_gram
        self.xxt = None if external_gram else torch.zeros(self.columns, self.columns, dtype=torch.float64,
                                                           device=layer.weight.device)  # Σ x xᵀ, where the layer is

    def add_batch(self, inp):
        x = inp.reshape(-1, inp.shape[-1])
        if not self.external_gram:
            x = x.float()
            self.xxt.add_(x.t() @ x)  # as the calibration walk's Grams: fp32 product, fp64 sum
        self.nsamples += x.shape[0]

    def stats(self):
        return [self.nsamples] + ([] if self.external_gram else [self.xxt])

    def _inverse_hessian_factor(self, w: torch.Tensor) -> torch.Tensor:
        H = (2.0 * self.xxt / max(1.0, float(self.nsamples))).float()
        dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
        H[dead, dead] = 1.0
        w[:, dead] = 0.0
        H.diagonal().add_(self.damp * torch.mean(torch.diag(H)))
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        return torch.linalg.cholesky(Hinv, upper=True)

    def prune(self, sparsity, nm=None):
        # Work on Wᵀ: a column of W is then a contiguous row, and the sequential per-column loop (the
        # cost on CPU, where it is bound by per-op overhead) is two fused ops on contiguous memory.
        Wt = weight_matrix(self.layer).detach().float().t().contiguous()  # (in, out); Conv1D views are transposed
        Hinv = self._inverse_hessian_factor(Wt.t())
        cols, rows = Wt.shape
        pruned = torch.zeros_like(Wt, dtype=torch.bool)
        pruned_before = 0
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1, U, P = Wt[i1:i2], Hinv[i1:i2, i1:i2], pruned[i1:i2]  # views: updated in place
            d = torch.diag(U).unsqueeze(1)
            if nm is None:
                # exactly round(s · rows · i2) pruned up to this block: per-layer sparsity is exact
                target = round(sparsity * rows * i2)
                scores = (W1.pow(2) / d.pow(2)).t().flatten()  # row-major over W's (out, in) block: ties as before
                P.copy_(smallest(scores, target - pruned_before).view(rows, i2 - i1).t())
                pruned_before = target
                scale = P / d  # err = w · [pruned] / [H⁻¹]_jj
            else:
                scale = torch.empty_like(W1)
            err = torch.empty_like(W1)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    n, m = nm  # the group's mask is chosen from the weights as updated so far
                    low = torch.sort(W1[i : i + m].pow(2) / d[i : i + m].pow(2), dim=0, stable=True).indices[: m - n]
                    P[i : i + m].scatter_(0, low, True)
                    torch.div(P[i : i + m], d[i : i + m], out=scale[i : i + m])
                torch.mul(W1[i], scale[i], out=err[i])
                W1[i + 1 :].addr_(U[i, i + 1 :], err[i], alpha=-1)  # push the error onto the later columns
            W1.masked_fill_(P, 0.0)
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), err, alpha=-1)  # the block's error, lazily, on the rest
        return ~pruned.t(), Wt.t().contiguous()
