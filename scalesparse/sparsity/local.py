"""Single-process views: whole weights, their gradients and a torch optimizer's Adam moments."""

from __future__ import annotations

import torch
from torch import nn

from scalesparse.sparsity.base import LayerView


def local_views(layers: dict[str, nn.Linear], optimizer: torch.optim.Optimizer | None = None) -> list[LayerView]:
    views = []
    for name, layer in sorted(layers.items()):
        w = layer.weight
        states = []
        if optimizer is not None and w in optimizer.state:
            states = [t.view(-1) for k, t in optimizer.state[w].items() if k in ("exp_avg", "exp_avg_sq")]
        grad = None if w.grad is None else w.grad.view(-1)
        views.append(LayerView(name, tuple(w.shape), 0, w.data.view(-1), grad, states))
    return views
