"""Masks: which Linear weights are sparse, masks from scores at each granularity, compact storage.

Masks are full-shape bool tensors, identical on every rank (1 byte per weight, against 16 bytes of
fp32 weight + Adam state): algorithms decide from the slices a rank owns, and every rank applies
the same agreed changes. On disk they are bit-packed (1 bit per weight).
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
from torch import nn

from scalesparse.errors import ConfigError
from scalesparse.model.layers import MaskedLinear


def select_layers(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, MaskedLinear]:
    """Maskable layers whose module name matches an include glob and no exclude glob.

    Only MaskedLinear layers (attention and MLP projections) can carry masks; embeddings, norms and
    the LM head never do.
    """
    chosen = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, MaskedLinear)
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        raise ConfigError(f"sparsity.include: {list(include)} matches no maskable layer (e.g. layers.0.mlp.up_proj)")
    return chosen


def smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest entries of a 1-D tensor, ties → lower index (a stable sort's order),
    found with one k-th value and a pass instead of a sort (sorting was most of SparseGPT's time)."""
    if k <= 0 or k >= flat.numel():
        return torch.full((flat.numel(),), k > 0, dtype=torch.bool, device=flat.device)
    kth = flat.kthvalue(k).values
    mask = flat < kth
    ties = (flat == kth).nonzero().flatten()
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Unstructured: the `keep` highest scores (ties → lower flat index)."""
    return smallest(-scores.reshape(-1), keep).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M along the input dimension: in every group of M consecutive inputs of a row, keep the top N."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"sparsity.m: {m} does not divide a layer's input dimension {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    idx = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(out_f, in_f)


def block_scores(scores: torch.Tensor, b: int) -> torch.Tensor:
    out_f, in_f = scores.shape
    if out_f % b or in_f % b:
        raise ConfigError(f"sparsity.block_size: {b} does not divide a layer's shape {tuple(scores.shape)}")
    return scores.reshape(out_f // b, b, in_f // b, b).sum(dim=(1, 3))


def block_mask(scores: torch.Tensor, keep_fraction: float, b: int) -> torch.Tensor:
    """Square b×b blocks with the highest summed score, round(keep_fraction · blocks) of them."""
    blocks = block_scores(scores, b)
    keep = round(keep_fraction * blocks.numel())
    return topk_mask(blocks, keep).repeat_interleave(b, 0).repeat_interleave(b, 1)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask → uint8 bit-packed 1-D tensor (for checkpoints)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy())[:numel].astype(bool)
    return torch.from_numpy(bits).view(shape)


def mask_hash(masks: dict[str, torch.Tensor]) -> str:
    """A short digest of all masks: equal on every rank iff the masks agree."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(pack(masks[name]).numpy().tobytes())
    return h.hexdigest()[:16]
