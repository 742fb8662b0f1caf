"""OWL (Yin et al., 2024, arXiv 2310.05175): non-uniform layer sparsity by outlier ratio.

A decoder block whose Wanda scores |W_ij|·‖x_j‖₂ hold more outliers (scores above `m` times the
block's mean score) matters more and is pruned less. Each block's outlier ratio D_b is mapped
linearly onto densities spanning 2λ, shifted so that their mean is exactly the target density:
    density_b = (D_b − min D) / (max D − min D) · 2λ  − mean(·) + (1 − target)
so the blocks' sparsities average to the target (blocks of one model have equal size, so the
overall sparsity is the target too). The paper's defaults for LLaMA: m = 5, λ = 0.08. The scores
are those of the dense model on the calibration inputs (one dense pass before pruning).
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all the block's scores above m × their mean (the layers' scores pooled, as OWL does)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from per-block outlier ratios; the mean is `target` (to rounding)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    density = scaled - scaled.mean() + (1 - target)
    sparsity = (1 - density).clamp(0.0, 1.0)
    return [float(s) for s in sparsity]
