"""SparseGPT (Frantar & Alistarh, 2023): layer-wise OBS pruning with error compensation.

H = 2·XXᵀ/n from the calibration inputs, dampened by `damp` × mean(diag H). Columns are processed in
blocks; within a block the mask is chosen from w²/[H⁻¹]²_jj (adaptively, per block), then each column is
pruned in turn and its error pushed onto the not-yet-processed columns through the upper Cholesky
factor of H⁻¹; the block's accumulated error is applied to the remaining columns in one matmul.
"""

from __future__ import annotations

import torch

from scalesparse.pruning.base import PRUNERS, Pruner, weight_matrix


@PRUNERS.register("sparsegpt")
class SparseGPT(Pruner):
    def __init__(self, layer, blocksize: int = 128, damp: float = 0.01, external_gram: bool = False, **options):
        """external_gram: the caller accumulates Σxxᵀ (shared by layers that read the same input, as the
        calibration walk does) and sets `self.xxt` before `prune`; add_batch then only counts tokens."""
        super().__init__(layer)
        self.blocksize, self.damp, self.external_gram = blocksize, damp, external_gram
        self.xxt = None if external_gram else torch.zeros(self.columns, self.columns, dtype=torch.float64)  # Σ x xᵀ

    def add_batch(self, inp):
        x = inp.reshape(-1, inp.shape[-1])
        if not self.external_gram:
            x = x.double()
            self.xxt += x.t() @ x
        self.nsamples += x.shape[0]

    def stats(self):
        return [self.nsamples] + ([] if self.external_gram else [self.xxt])

    def _inverse_hessian_factor(self, w: torch.Tensor) -> torch.Tensor:
        H = (2.0 * self.xxt / max(1.0, float(self.nsamples))).float()
        dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
        H[dead, dead] = 1.0
        w[:, dead] = 0.0
        H += self.damp * torch.mean(torch.diag(H)) * torch.eye(self.columns)
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        return torch.linalg.cholesky(Hinv, upper=True)

    def prune(self, sparsity, nm=None):
        W = weight_matrix(self.layer).detach().float().contiguous().clone()  # Conv1D views are transposed
        Hinv = self._inverse_hessian_factor(W)
        rows, cols = W.shape
        keep = torch.ones_like(W, dtype=torch.bool)
        pruned_before = 0
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
            if nm is None:
                # exactly round(s · rows · i2) pruned up to this block: per-layer sparsity is exact
                target = round(sparsity * rows * i2)
                n_block = target - pruned_before
                pruned_before = target
                scores = (W1.pow(2) / d.pow(2).unsqueeze(0)).flatten()
                prune1.view(-1)[torch.sort(scores, stable=True).indices[:n_block]] = True
            err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    scores = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2).unsqueeze(0)
                    low = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
                    prune1[:, i : i + m].scatter_(1, low, True)
                w = W1[:, i]
                q = torch.where(prune1[:, i], torch.zeros_like(w), w)
                err = (w - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                err1[:, i] = err
            W[:, i1:i2] = W1
            keep[:, i1:i2] = ~prune1
            W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
        return keep, torch.where(keep, W, torch.zeros_like(W))
