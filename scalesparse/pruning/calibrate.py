"""The shared layer-by-layer calibration walk, the same for every method and architecture.

Blocks are processed in order: each block's calibration inputs are the outputs of the already-pruned
blocks before it (SparseGPT's sequential scheme). Only the block being pruned is moved to `device`;
the rest of the model stays where it is. With several workers, each holds a share of the calibration
samples: the methods' statistics are all-reduced (comm), and each layer's solve runs on one worker,
its result broadcast to the others.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from scalesparse import comm
from scalesparse.pruning.base import PRUNERS, weight_matrix
from scalesparse.pruning.hf import find_blocks, linear_layers


class _Captured(Exception):
    pass


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    """‖(W − Ŵ)X‖² / ‖WX‖² over the calibration inputs of the layer."""
    seconds: float


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]):
    """Hidden states entering block 0 for each batch, and the keyword arguments blocks are called with
    (attention mask, positions, rotary embeddings…: the same for every batch of equal shape)."""
    inputs, kwargs = [], {}

    def grab(_module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _recorder(pruner, xxt: torch.Tensor):
    """Forward hook feeding a layer's inputs to its pruner, and to Σxxᵀ for the error report."""

    def record(_module, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).double().cpu()
        xxt.add_(x.t() @ x)
        pruner.add_batch(args[0].cpu())

    return record


def relative_error(w0: torch.Tensor, w: torch.Tensor, xxt: torch.Tensor) -> float:
    """‖(W₀ − W)X‖² / ‖W₀X‖² from Σxxᵀ, without keeping the inputs: tr(D Σxxᵀ Dᵀ) / tr(W₀ Σxxᵀ W₀ᵀ)."""
    d, w0 = (w0 - w).double(), w0.double()
    return float(((d @ xxt) * d).sum() / ((w0 @ xxt) * w0).sum().clamp_min(1e-30))


def _write(layer: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        weight_matrix(layer).copy_(w.to(layer.weight.dtype))


@torch.no_grad()
def prune_model(model: nn.Module, batches: list[torch.Tensor], method: str, sparsity: float,
                nm: tuple[int, int] | None = None, include: tuple[str, ...] = ("*",),
                exclude: tuple[str, ...] = (), device: str = "cpu", pruner_args: dict | None = None,
                progress: bool = True) -> PruneReport:  # fmt: skip
    """Prune every matching Linear of every decoder block in place. `batches`: this worker's share of
    the calibration token ids, each (B, T)."""
    t_start = time.perf_counter()
    cls = PRUNERS.get(method)
    prefix, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, batches)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    report = PruneReport()
    bar = tqdm(total=len(blocks), desc=f"{method} {sparsity:.0%}", disable=not progress or comm.rank() != 0)
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        layers = {n: m for n, m in linear_layers(block).items()
                  if any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in include)
                  and not any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in exclude)}  # fmt: skip
        pruners = {n: cls(m, **(pruner_args or {})) for n, m in layers.items()}
        xxt = {n: torch.zeros(p.columns, p.columns, dtype=torch.float64) for n, p in pruners.items()}

        handles = [m.register_forward_hook(_recorder(pruners[n], xxt[n])) for n, m in layers.items()]
        for h in hidden:
            _run_block(block, h.to(device), kwargs)
        for handle in handles:
            handle.remove()
        for n, p in pruners.items():  # statistics are sums: add up every worker's share
            for t in [*p.stats(), xxt[n]]:
                comm.all_reduce_sum(t)
        for j, (n, m) in enumerate(sorted(layers.items())):
            t0 = time.perf_counter()
            w0 = weight_matrix(m).detach().float().cpu().clone()
            owner = j % comm.world_size()  # independent solves spread over workers
            w = pruners[n].prune(sparsity, nm)[1] if comm.rank() == owner else torch.empty_like(w0)
            w = comm.broadcast_tensor(w, owner)
            _write(m, w)
            report.layers.append(LayerReport(f"{prefix}.{i}.{n}", tuple(w0.shape), float((w == 0).float().mean()),
                                             relative_error(w0, w, xxt[n]), time.perf_counter() - t0))  # fmt: skip
        hidden = [_run_block(block, h.to(device), kwargs).to(h.device) for h in hidden]  # pruned outputs feed on
        block.to(home)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - t_start
    return report
