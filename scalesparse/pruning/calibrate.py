"""The shared layer-by-layer calibration walk, the same for every method and architecture.

Blocks are processed in order: each block's calibration inputs are the outputs of the already-pruned
blocks before it (SparseGPT's sequential scheme). Only the block being pruned is moved to `device`;
the rest of the model stays where it is, so a model larger than the GPU prunes block by block. On the
device live the block, its calibration inputs (when they fit; else they stream from the CPU batch by
batch), the Gram sums, the methods' statistics, the solves and the error report. With several
workers, each holds a share of the calibration samples: the methods' statistics are all-reduced
(comm), and each layer's solve runs on one worker, its result broadcast to the others.
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from scalesparse import comm
from scalesparse.pruning import PRUNERS  # the methods, registered
from scalesparse.pruning.base import weight_matrix
from scalesparse.pruning.hf import find_blocks, linear_layers
from scalesparse.pruning.owl import outlier_ratio, owl_sparsities


class _Captured(Exception):
    pass


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float | None
    """‖(W − Ŵ)X‖² / ‖WX‖² over the calibration inputs of the layer; None where it was not computed
    (layer_error off, for a method that needs no Σxxᵀ of its own)."""
    seconds: float


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds this worker spent per phase: calibrate (forward + statistics), reduce (all-reduce),
    solve (its own solves), broadcast (waiting for and receiving the others'), propagate (pruned outputs)."""
    block_seconds: list[float] = field(default_factory=list)
    """Wall seconds per decoder block, all phases (device work included: the block's results are read)."""
    block_sparsity: list[float] = field(default_factory=list)
    """OWL only: the sparsity each decoder block was pruned to (their mean is the target)."""
    block_outlier_ratio: list[float] = field(default_factory=list)
    """OWL only: each block's fraction of Wanda scores above m × their mean, on the dense model."""

    def timed(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - t0
        return now


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


def to_device(value, device):
    """Tensors anywhere inside tuples, lists and dicts moved to `device` (Llama's rotary
    `position_embeddings` is a (cos, sin) tuple); other values as they are."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [to_device(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def resident_inputs(hidden: list[torch.Tensor], device: str, budget: float = 0.25) -> list[torch.Tensor]:
    """The block inputs moved to the device for the whole walk when they take at most `budget` of its
    free memory (no copy per batch per block); else left where they are, to stream batch by batch."""
    if not str(device).startswith("cuda"):
        return hidden
    need = sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return [h.to(device) for h in hidden] if need <= budget * free else hidden


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class SharedInputs:
    """One calibration pass through a block: each distinct layer input's statistics, gathered once.

    q, k and v read the same tensor, as do gate and up: the first layer to see a tensor leads its
    group, its pruner's `add_batch` runs and, with `gram`, its group's Σxxᵀ (float64; the walk's main
    cost, n·d² per input) is added; the group's other pruners copy the leader's sums afterwards
    (`share`). Which layers share an input is seen as they run and is the same for every batch. From
    the second batch on, a pass stops as soon as every layer's input has been recorded in it: the
    last layer's product and the rest of the block are never computed (a quarter of a Llama block's
    matmuls: down_proj). A layer that does not run in a pass (an MoE expert no token of that batch
    was routed to) lets the pass run whole, so no statistics are lost; a layer called twice in one
    pass turns the early stop off. `stop_early=False` runs whole blocks (OWL's dense pass needs their
    outputs). `agree` makes the groups and the Gram sums the same on every worker before the sums are
    all-reduced (a worker may have seen other experts run, or no batch at all).
    """

    def __init__(self, pruners: dict, gram: bool, stop_early: bool = True) -> None:
        self.pruners, self.gram, self.stop_early = pruners, gram, stop_early
        self.leader: dict[str, str] = {}  # layer name → the layer whose pruner gathers for its group
        self.sums: dict[str, torch.Tensor] = {}  # leader → Σxxᵀ of its group's input
        self._batch: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) → (input, leader), one forward
        self._ran: list[str] = []  # layers in the order they ran in this pass
        self._first = True
        self.may_stop = False  # set after the first pass: each layer ran at most once in it

    def hook(self, name: str):
        def record(_module, args):  # a forward pre-hook: runs before the layer's own product
            x = args[0]
            hit = self._batch.get(id(x))
            if hit is None or hit[0] is not x:
                assert self.leader.setdefault(name, name) == name, f"{name}: its input changed groups"
                if self.gram:
                    if name not in self.sums:
                        self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64,
                                                      device=x.device)  # fmt: skip
                    # one batch's product in fp32 (as SparseGPT's reference code does; fp64 was most of
                    # the walk's time), summed over batches and workers in fp64 so the order of the sum
                    # barely matters; where the block runs (the GPU with --device cuda)
                    flat = x.reshape(-1, x.shape[-1]).float()
                    self.sums[name].add_(flat.t() @ flat)  # fp32 → fp64 inside the add: no temporary
                self.pruners[name].add_batch(x)
                self._batch[id(x)] = (x, name)
            else:
                assert self.leader.setdefault(name, hit[1]) == hit[1], f"{name}: its input changed groups"
            self._ran.append(name)
            if self.may_stop and len(self._ran) == len(self.pruners):
                raise _Captured  # every layer's input is recorded (each ran once on the first pass)

        return record

    def run(self, block: nn.Module, layers: dict[str, nn.Module], hidden: list[torch.Tensor], kwargs: dict,
            device) -> list[torch.Tensor] | None:  # fmt: skip
        """Every batch through the block with the statistics recorded; the block's outputs (on the
        inputs' device) when the pass runs whole blocks, else None."""
        handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in layers.items()]
        outputs = [] if not self.stop_early else None
        try:
            for h in hidden:
                try:
                    out = _run_block(block, h.to(device), kwargs)
                    if outputs is not None:
                        outputs.append(out.to(h.device))
                except _Captured:
                    pass
                self._end_batch()
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def _end_batch(self) -> None:
        self._batch.clear()
        if self._first:  # (a layer called twice would lose its second call to an early stop)
            self.may_stop = self.stop_early and len(set(self._ran)) == len(self._ran)
            self._first = False
        self._ran = []

    def agree(self, layers: dict[str, nn.Module], device) -> None:
        """The same groups and Gram sums on every worker: the union of what each saw (the sharing is
        the model's, so the workers that saw a layer agree on its group); a layer no worker saw run is a
        group of its own. Sums a worker lacks are zeros, so that the all-reduced lists line up."""
        union: dict[str, str] = {}
        for seen in comm.all_gather_object(self.leader):
            for name, lead in seen.items():
                union.setdefault(name, lead)
        for name in layers:
            union.setdefault(name, name)
        self.leader = union
        if self.gram:
            for lead in set(union.values()) - set(self.sums):
                n = weight_matrix(layers[lead]).shape[1]
                self.sums[lead] = torch.zeros(n, n, dtype=torch.float64, device=device)

    def gram_sums(self) -> list[torch.Tensor]:
        """The distinct Σxxᵀ, in the same order on every worker (after `agree`)."""
        return [self.sums[n] for n in sorted(self.sums)]

    def share(self) -> None:
        """Each follower's statistics := its leader's."""
        for name, lead in self.leader.items():
            if name != lead:
                for mine, theirs in zip(self.pruners[name].stats(), self.pruners[lead].stats(), strict=True):
                    mine.copy_(theirs)

    def of(self, name: str) -> torch.Tensor:
        """Σxxᵀ of the layer's input."""
        return self.sums[self.leader[name]]


@torch.no_grad()
def dense_outlier_ratios(blocks, block_layers, hidden: list[torch.Tensor], kwargs: dict, device: str,
                         m: float) -> list[float]:  # fmt: skip
    """OWL's statistic per block, on the dense model: the calibration inputs run through every block
    unpruned; each layer's Wanda scores from its inputs' per-column Σx² (summed over workers)."""
    ratios = []
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        layers = block_layers(i, block)
        norms = {n: PRUNERS.get("wanda")(layer) for n, layer in layers.items()}  # its per-column Σx²
        shared = SharedInputs(norms, gram=False, stop_early=False)
        outputs = shared.run(block, layers, hidden, kwargs, device)
        shared.agree(layers, device)
        shared.share()
        for stat in (s for p in norms.values() for s in p.stats()):
            comm.all_reduce_sum(stat)
        scores = [weight_matrix(layer).detach().abs().float() * norms[n].sq_sum.sqrt().float() for n, layer in
                  layers.items()]  # fmt: skip
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        hidden = outputs
        block.to(home)
    return ratios


def relative_error(w0: torch.Tensor, w: torch.Tensor, xxt: torch.Tensor) -> float:
    """‖(W₀ − W)X‖² / ‖W₀X‖² from Σxxᵀ, without keeping the inputs: tr(D Σxxᵀ Dᵀ) / tr(W₀ Σxxᵀ W₀ᵀ).
    In fp32: a reported figure, and in fp64 these two products cost as much as the solve itself."""
    d, w0, xxt = (w0 - w).float(), w0.float(), xxt.float()
    return float(((d @ xxt) * d).sum(dtype=torch.float64) / ((w0 @ xxt) * w0).sum(dtype=torch.float64).clamp_min(1e-30))


def _write(layer: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        weight_matrix(layer).copy_(w.to(layer.weight.dtype))


def assign_owners(costs: dict[str, float], workers: int) -> dict[str, int]:
    """Longest job first onto the least-loaded worker (the same answer on every rank: no ties left to chance)."""
    load = [0.0] * workers
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        w = min(range(workers), key=lambda r: (load[r], r))
        owners[name] = w
        load[w] += costs[name]
    return owners


@torch.no_grad()
def prune_model(model: nn.Module, batches: list[torch.Tensor], method: str, sparsity: float,
                nm: tuple[int, int] | None = None, include: tuple[str, ...] = ("*",),
                exclude: tuple[str, ...] = (), device: str = "cpu", pruner_args: dict | None = None,
                progress: bool = True, layer_error: bool = True,
                owl: tuple[float, float] | None = None) -> PruneReport:  # fmt: skip
    """Prune every matching Linear of every decoder block in place. `batches`: this worker's share of
    the calibration token ids, each (B, T). `owl`: (m, λ) for OWL's non-uniform block sparsities
    (pruning/owl.py; a dense pass over the blocks first), else every block at `sparsity`.

    Each method pays only for what it uses: Σxxᵀ (the walk's main cost, n·d² per input) is computed
    for SparseGPT, or for every method when `layer_error` asks for the reconstruction-error report;
    magnitude without the report runs no forward pass at all."""
    t_start = time.perf_counter()
    cls = PRUNERS.get(method)
    with_gram = cls.needs_gram or layer_error
    prefix, blocks = find_blocks(model)
    if cls.needs_inputs or with_gram or owl:
        hidden, kwargs = capture_block_inputs(model, blocks, batches)
    else:
        hidden, kwargs = [], {}
    hidden = resident_inputs(hidden, device)
    kwargs = to_device(kwargs, device)
    report = PruneReport()

    def block_layers(i: int, block: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in linear_layers(block).items()
                if any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in include)
                and not any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in exclude)}  # fmt: skip

    if owl:
        t = time.perf_counter()
        ratios = dense_outlier_ratios(blocks, block_layers, hidden, kwargs, device, owl[0])
        report.block_sparsity = owl_sparsities(ratios, sparsity, owl[1])
        report.block_outlier_ratio = ratios
        report.timed("owl", t)
    measured: dict[str, float] = {}  # seconds per layer name in the previous block: the next block's costs
    bar = tqdm(total=len(blocks), desc=f"{method} {sparsity:.0%}", disable=not progress or comm.rank() != 0)
    for i, block in enumerate(blocks):
        t_block = time.perf_counter()
        home = next(block.parameters()).device
        block.to(device)
        layers = block_layers(i, block)
        pruners = {n: cls(m, **(pruner_args or {}), external_gram=True) for n, m in layers.items()}

        t = time.perf_counter()
        shared = SharedInputs(pruners, gram=with_gram)
        shared.run(block, layers, hidden, kwargs, device)
        t = report.timed("calibrate", t)
        shared.agree(layers, device)
        shared.share()
        # statistics are sums: add up every worker's share (each group's Gram matrix once; every layer's
        # own small sums, so that the list is the same on a worker that saw no batch)
        for stat in [*shared.gram_sums(), *(s for p in pruners.values() for s in p.stats())]:
            comm.all_reduce_sum(stat)
        xxt = {n: shared.of(n) for n in layers} if with_gram else {}
        for n, p in pruners.items():
            if p.needs_gram:
                p.xxt = xxt[n]
        t = report.timed("reduce", t)
        block_sparsity = report.block_sparsity[i] if report.block_sparsity else sparsity
        entries, t = _solve(layers, pruners, xxt, block_sparsity, nm, report, t, measured)
        measured = {n: e[3] for n, e in entries.items()}  # the same on every rank: the times were broadcast
        report.layers += [LayerReport(f"{prefix}.{i}.{n}", *entries[n]) for n in sorted(entries)]
        if i + 1 < len(blocks):  # the pruned outputs feed the next block (the last block's are not needed)
            hidden = [_run_block(block, h.to(device), kwargs).to(h.device) for h in hidden]
        report.timed("propagate", t)
        block.to(home)  # (synchronous from a GPU: the block's work is done when this returns)
        report.block_seconds.append(time.perf_counter() - t_block)
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - t_start
    return report


def _solve(layers, pruners, xxt, sparsity, nm, report: PruneReport, t: float, measured: dict[str, float]):
    """Prune every layer of a block with the workers sharing the work; every worker ends with all the
    results. Each layer goes whole to one worker (longest first onto the least loaded); every worker
    runs all of its own solves before the results are broadcast, so the solves overlap instead of
    taking turns. Costs are the same layers' measured seconds in the previous block (blocks are alike,
    and no formula knows the per-column overheads of every device); the first block uses the flop count.
    (Splitting SparseGPT's largest layer by rows was tried and gained nothing: the d³ factorisation
    is not split by rows, and the per-column loop is overhead-bound on CPU.)"""
    rank = comm.rank()
    if set(measured) >= set(pruners):
        costs = {n: measured[n] for n in pruners}
    else:
        costs = {n: p.rows * p.columns**2 + p.columns**3 for n, p in pruners.items()}
    owners = assign_owners(costs, comm.world_size())
    solved = {}
    for n in sorted(owners):
        if owners[n] == rank:
            t0 = time.perf_counter()
            w0 = weight_matrix(layers[n]).detach().float().clone() if n in xxt else None  # on the solving device
            w = pruners[n].prune(sparsity, nm)[1]
            # (a float: waits for the device to finish the solve); NaN on the wire where not computed
            err = relative_error(w0, w, xxt[n]) if w0 is not None else float("nan")
            info = torch.tensor([err, time.perf_counter() - t0])
            solved[n] = torch.cat([w.reshape(-1).float().cpu(), info])
    t = report.timed("solve", t)
    shapes = {n: tuple(weight_matrix(layers[n]).shape) for n in owners}
    # each result travels as [weights..., relative error, seconds]: one broadcast per worker per block
    everyone = comm.share_owned(solved, owners, {n: shapes[n][0] * shapes[n][1] + 2 for n in owners})
    entries = {}
    for n in sorted(owners):
        w, (err, seconds) = everyone[n][:-2].view(shapes[n]), everyone[n][-2:].tolist()
        _write(layers[n], w)
        entries[n] = (shapes[n], float((w == 0).float().mean()), None if math.isnan(err) else err, seconds)
    return entries, report.timed("broadcast", t)
