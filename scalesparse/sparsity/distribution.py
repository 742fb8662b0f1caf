"""How a global sparsity is spread over layers: uniform, or Erdős–Rényi-Kernel (Evci et al., 2020).

Both return integer keep counts per layer whose sum is exactly round((1 − s) · total), so the
requested global sparsity is hit to the weight, not to a rounding error per layer.
"""

from __future__ import annotations

from math import floor

from scalesparse.registry import Registry

Shapes = dict[str, tuple[int, int]]
DISTRIBUTIONS: Registry = Registry("sparsity distribution")


def _exact_counts(densities: dict[str, float], shapes: Shapes, sparsity: float) -> dict[str, int]:
    """Round per-layer keep counts so that they sum exactly to the global target (largest remainder)."""
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    target = round((1 - sparsity) * sum(numel.values()))
    raw = {n: densities[n] * numel[n] for n in shapes}
    counts = {n: min(numel[n], floor(raw[n])) for n in shapes}
    short = target - sum(counts.values())
    for n in sorted(shapes, key=lambda n: (raw[n] - floor(raw[n]), n), reverse=True):
        if short <= 0:
            break
        if counts[n] < numel[n]:
            counts[n] += 1
            short -= 1
    return counts


@DISTRIBUTIONS.register("uniform")
def uniform(shapes: Shapes, sparsity: float) -> dict[str, int]:
    return _exact_counts({n: 1 - sparsity for n in shapes}, shapes, sparsity)


@DISTRIBUTIONS.register("erk")
def erk(shapes: Shapes, sparsity: float) -> dict[str, int]:
    """Density of layer l ∝ (fan_in + fan_out) / (fan_in · fan_out), scaled to the global budget;
    layers that would exceed density 1 are made dense and the rest rescaled (RigL's procedure)."""
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    budget = (1 - sparsity) * sum(numel.values())
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        left = budget - sum(numel[n] for n in dense)
        eps = left / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1]
        if not over:
            break
        dense.update(over)
    densities = {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
    return _exact_counts(densities, shapes, sparsity)


def keep_counts(kind: str, shapes: Shapes, sparsity: float) -> dict[str, int]:
    return DISTRIBUTIONS.get(kind)(shapes, sparsity)
