"""Expert computation backends behind one interface, registered by name.

    backend(x, weights, experts, ex) -> y
    x: (N, d) tokens; weights, experts: (N, k) routing; ex: the Experts module; y: (N, d)

* loop       the plain per-expert reference (what transformers' eager Mixtral experts do)
* grouped    permute so each expert's tokens are contiguous, run each expert's MLP on its rows, un-permute
             and weight: exact, no padding, no dropped tokens, pure PyTorch. On CPU (and CUDA without
             a grouped GEMM) one hand-written autograd function runs the experts in cache-sized row
             blocks; on CUDA in bf16 where torch has a grouped GEMM (`torch._grouped_mm`: Hopper,
             Blackwell) two grouped GEMMs run every expert at once and the permutation needs no host
             sync (group offsets come from a device-side search of the sorted expert ids)
* megablocks MegaBlocks' dropless machinery as its dMoE runs it (`mlp_impl="grouped"`): its CUDA sort,
             histogram and cumsum for the routing, its fused gather/scatter (the scatter applies the
             routing weights), and its grouped GEMM, which is bf16-only (in fp32 the experts run one
             GEMM each between MegaBlocks' routing kernels) (optional `gpu` extra)

Each backend also has a `sorted` form, the experts on rows already grouped by expert, which expert
parallelism runs on the tokens that arrive from other ranks (SORTED_MLPS).

Weights are stored in fp32 or in the model's dtype; the experts compute in the input's dtype (or
autocast's), casting weights when they differ, as nn.Linear does under autocast.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.errors import ConfigError
from scalesparse.registry import Registry

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Experts"], torch.Tensor]
BACKENDS: Registry[Backend] = Registry("moe backend")
SortedMLP = Callable[[torch.Tensor, torch.Tensor, "Experts"], torch.Tensor]
"""(xs (M, d) rows grouped by expert, counts (E,), ex) -> unweighted outputs (M, d)"""
SORTED_MLPS: Registry[SortedMLP] = Registry("moe backend")


class Experts(nn.Module):
    """E expert MLPs stored as 3-D tensors in Mixtral's layout (out_features, in_features per expert).

    swiglu: gate_up_proj (E, 2·ff, d) holds [gate; up]; gelu: gate_up_proj (E, ff, d) holds up.
    down_proj (E, d, ff).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, swiglu: bool) -> None:
        super().__init__()
        self.num_experts, self.d_ff, self.swiglu = num_experts, d_ff, swiglu
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, (2 if swiglu else 1) * d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def expert_weights(ex: Experts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) in `dtype`: the parameters themselves when they already are (no copy)."""
    return ex.gate_up_proj.to(dtype), ex.down_proj.to(dtype)


@BACKENDS.register("loop")
def loop_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    x = x.to(compute_dtype(x))
    w1, w2 = expert_weights(ex, x.dtype)
    y = torch.zeros_like(x)
    for e in range(ex.num_experts):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = ex.act(F.linear(x[token], w1[e]))
        out = F.linear(h, w2[e]) * weights[token, slot, None].to(x.dtype)
        y.index_add_(0, token, out)
    return y


def row_blocks(counts: list[int], rows: int):
    """(expert, first row, end row) over contiguous expert groups, each cut into blocks of <= rows."""
    start = 0
    for e, c in enumerate(counts):
        for a in range(start, start + c, rows):
            yield e, a, min(a + rows, start + c)
        start += c


# Hidden activations per block on CPU: 16 MiB keeps a block's (rows, 2·ff) hidden in cache between the
# GEMM that writes it and the activation that reads it (benchmarks/moe_layer.py, 16k tokens: 0.86x the
# dense MLP's time, where composing autograd ops over the whole hidden took 1.09x; 256-row blocks lost
# the gain, 512 and 1024 rows were alike). On CUDA one GEMM per expert is best.
CPU_BLOCK_BYTES = 16 * 2**20


def block_rows(gate_up: torch.Tensor) -> int:
    """Rows per block for experts with weights gate_up (E, 2·ff or ff, d)."""
    if gate_up.is_cuda:
        return 2**62
    return max(64, CPU_BLOCK_BYTES // (gate_up.shape[1] * gate_up.element_size()))


class GroupedExpertMLP(torch.autograd.Function):
    """y[rows of e] = act(x[rows of e] @ W1[e]ᵀ) @ W2[e]ᵀ over contiguous row groups, one expert (and row
    block) at a time, forward and backward written out by hand:

    * each block's hidden is produced, activated and consumed while it is still in cache, instead of
      three passes over an (N·k, 2·ff) tensor;
    * only the inputs and the pre-activation hidden are saved; the activation is recomputed per block
      in backward (0.6x the saved memory of composing autograd ops);
    * weight gradients are written per expert into one buffer (indexing W[e] under autograd would
      materialise a full-size zero gradient per expert).
    """

    @staticmethod
    def forward(ctx, xs, w1, w2, counts: list[int], swiglu: bool, rows: int):
        ff = w2.shape[2]
        h = xs.new_empty(xs.shape[0], w1.shape[1])
        y = xs.new_empty(xs.shape[0], w2.shape[1])
        for e, a, b in row_blocks(counts, rows):
            hb = torch.mm(xs[a:b], w1[e].t(), out=h[a:b])
            act = F.silu(hb[:, :ff]).mul_(hb[:, ff:]) if swiglu else F.gelu(hb)
            torch.mm(act, w2[e].t(), out=y[a:b])
        ctx.save_for_backward(xs, w1, w2, h)
        ctx.counts, ctx.swiglu, ctx.rows = counts, swiglu, rows
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xs, w1, w2, h = ctx.saved_tensors
        gy = gy.contiguous()
        ff = w2.shape[2]
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        gx = torch.empty_like(xs) if need_x else None
        gw1 = torch.zeros_like(w1) if need_w1 else None  # experts with no tokens get 0
        gw2 = torch.zeros_like(w2) if need_w2 else None
        gh = h.new_empty(min(ctx.rows, h.shape[0]), h.shape[1])  # one block's hidden gradient, reused
        for e, a, b in row_blocks(ctx.counts, ctx.rows):
            hb, g, ghb = h[a:b], gy[a:b], gh[: b - a]
            if ctx.swiglu:  # act = silu(gate) · up
                gate, up = hb[:, :ff], hb[:, ff:]
                s = F.silu(gate)
                if need_w2:
                    gw2[e].addmm_(g.t(), s * up)
                ga = g @ w2[e]
                torch.mul(ga, s, out=ghb[:, ff:])
                torch.ops.aten.silu_backward.grad_input(ga.mul_(up), gate, grad_input=ghb[:, :ff])
            else:
                if need_w2:
                    gw2[e].addmm_(g.t(), F.gelu(hb))
                ghb = torch.ops.aten.gelu_backward(g @ w2[e], hb)
            if need_w1:
                gw1[e].addmm_(ghb.t(), xs[a:b])
            if need_x:
                torch.mm(ghb, w1[e], out=gx[a:b])
        return gx, gw1, gw2, None, None, None


def blocked_expert_mlp(xs: torch.Tensor, counts: torch.Tensor, ex: Experts) -> torch.Tensor:
    """The experts on rows already sorted by expert (counts[e] rows each), one expert (and row block)
    at a time; unweighted outputs. Needs the counts on the host."""
    xs = xs.to(compute_dtype(xs))
    w1, w2 = expert_weights(ex, xs.dtype)
    return GroupedExpertMLP.apply(xs, w1, w2, counts.tolist(), ex.swiglu, block_rows(w1))


def grouped_mm_applies(x: torch.Tensor, ex: Experts) -> bool:
    """Whether torch's grouped GEMM kernel runs these experts: CUDA, bf16, a GPU it has a kernel for
    (Hopper, Blackwell), rows of 16-byte multiples. Elsewhere torch's `_grouped_mm` falls back to a
    loop that copies the offsets to the host, and the blocked path is the better loop."""
    if not (x.is_cuda and compute_dtype(x) == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    return all(n % 8 == 0 for n in (x.shape[-1], ex.d_ff))


def grouped_mm_expert_mlp(xs: torch.Tensor, offsets: torch.Tensor, ex: Experts) -> torch.Tensor:
    """The experts on rows sorted by expert with two grouped GEMMs; offsets: int32 (E,) end row of
    each expert's group, on the device. Unweighted outputs."""
    xs = xs.to(compute_dtype(xs))
    w1, w2 = expert_weights(ex, xs.dtype)
    h = ex.act(torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offsets))
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)


def sorted_assignments(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): the N·k assignments sorted by expert (stable: token order within an expert),
    and the int32 end row of each expert's group, found by searching the sorted ids on the device
    (bincount would sync with the host to size its output)."""
    ids, order = torch.sort(experts.reshape(-1), stable=True)
    bounds = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    return order, torch.searchsorted(ids, bounds, right=True).to(torch.int32)


def grouped_mm_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    """Sort, gather, two grouped GEMMs, un-permute with a gather (a permutation: no atomics) and
    weight each token's k outputs in one batched product: no host sync anywhere."""
    N, k = experts.shape
    order, offsets = sorted_assignments(experts, ex.num_experts)
    ys = grouped_mm_expert_mlp(x.index_select(0, order // k), offsets, ex)  # (N·k, d) by expert
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    per_token = ys.index_select(0, inverse).view(N, k, -1)  # back to token-major
    return torch.bmm(weights.to(ys.dtype).unsqueeze(1), per_token).squeeze(1).to(x.dtype)


def permuted_experts(x, weights, experts, ex: Experts, expert_mlp) -> torch.Tensor:
    """Sort the N·k assignments by expert (stable: token order within an expert), run the experts
    on contiguous row groups with `expert_mlp`, weight, and scatter-add back to the tokens."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts)
    token = order // k  # assignment → its token
    out = expert_mlp(x.index_select(0, token), counts, ex)  # (N·k, d)
    out = out * weights.reshape(-1)[order].unsqueeze(1).to(out.dtype)
    return out.new_zeros(N, out.shape[1]).index_add_(0, token, out).to(x.dtype)


@SORTED_MLPS.register("grouped")
@SORTED_MLPS.register("loop")
def grouped_expert_mlp(xs: torch.Tensor, counts: torch.Tensor, ex: Experts) -> torch.Tensor:
    if grouped_mm_applies(xs, ex):
        return grouped_mm_expert_mlp(xs, torch.cumsum(counts, 0).to(torch.int32), ex)
    return blocked_expert_mlp(xs, counts, ex)


@BACKENDS.register("grouped")
def grouped_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    if grouped_mm_applies(x, ex):
        return grouped_mm_backend(x, weights, experts, ex)
    return permuted_experts(x, weights, experts, ex, blocked_expert_mlp)


# ----------------------------------------------------------------------------- MegaBlocks
@functools.cache
def megablocks_available() -> bool:
    """Probed once: CUDA present and MegaBlocks' routing ops and grouped GEMM importable."""
    return megablocks_unavailable_reason() is None


@functools.cache
def megablocks_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA"
    try:
        from megablocks import grouped_gemm_util as gg
        from megablocks import ops  # noqa: F401  (its CUDA routing kernels)
    except ImportError as e:
        return f"megablocks does not import ({e})"
    if not gg.grouped_gemm_is_available():
        return "megablocks is installed without grouped_gemm"
    return None


def megablocks_moe(x, weights, experts, ex: Experts, ops, expert_mlp: SortedMLP) -> torch.Tensor:
    """MegaBlocks dMoE's grouped forward (ParallelDroplessMLP.grouped_forward_once) on our weights.

    ops: sort, histogram, inclusive_cumsum, gather, scatter with MegaBlocks' signatures. Indices are
    over the N·k assignments; gather copies row index // k of x; scatter writes each row back to its
    assignment scaled by its routing weight and sums each token's k rows. `expert_mlp` runs the
    experts on the gathered rows (megablocks_expert_mlp: MegaBlocks' grouped GEMM).
    """
    N, k = experts.shape
    dtype = compute_dtype(x)
    flat = experts.reshape(-1).int()
    with torch.no_grad():
        bin_ids, indices = ops.sort(flat, max(1, math.ceil(math.log2(ex.num_experts))))
        tokens_per_expert = ops.histogram(flat, ex.num_experts)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0).view(-1)
    xs = ops.gather(x.to(dtype), indices, bin_ids, bins, k)
    ys = expert_mlp(xs, tokens_per_expert, ex)
    return ops.scatter(ys, indices, bin_ids, weights.reshape(-1).to(ys.dtype), bins, k).to(x.dtype)


@SORTED_MLPS.register("megablocks")
def megablocks_expert_mlp(xs: torch.Tensor, counts: torch.Tensor, ex: Experts, gmm=None) -> torch.Tensor:
    """MegaBlocks' grouped GEMM (grouped_gemm's gmm, as its GroupedMLP calls it). Its kernels take bf16
    only: in fp32 the experts run one cuBLAS GEMM each (the blocked path), between MegaBlocks' routing."""
    xs = xs.to(compute_dtype(xs))
    if xs.dtype != torch.bfloat16:
        return blocked_expert_mlp(xs, counts, ex)
    if gmm is None:
        from megablocks import grouped_gemm_util as gg

        gmm = gg.ops.gmm
    w1, w2 = expert_weights(ex, xs.dtype)
    batch_sizes = counts.cpu().to(torch.long)  # the grouped GEMM plans on the host, as in MegaBlocks
    return gmm(ex.act(gmm(xs, w1, batch_sizes, trans_b=True)), w2, batch_sizes, trans_b=True)


@BACKENDS.register("megablocks")
def megablocks_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    from megablocks import ops

    return megablocks_moe(x, weights, experts, ex, ops, megablocks_expert_mlp)


def choose_backend(cfg: MoEConfig) -> tuple[str, str]:
    """(backend, why)."""
    if cfg.backend == "auto":
        reason = megablocks_unavailable_reason()
        if reason is None:
            return "megablocks", "auto: MegaBlocks imports and CUDA is present"
        return "grouped", f"auto: megablocks unavailable ({reason})"
    if cfg.backend == "megablocks" and not megablocks_available():
        raise ConfigError(
            "moe.backend: 'megablocks' cannot run here (needs CUDA and `pip install scalesparse[gpu]`, "
            f"i.e. megablocks with its grouped_gemm kernels: {megablocks_unavailable_reason()}); use 'grouped'"
        )
    return cfg.backend, "moe.backend"


@functools.cache
def _announce(name: str, why: str) -> None:
    from scalesparse import comm

    if comm.rank() == 0:
        print(f"moe: experts run on the '{name}' backend ({why})", flush=True)


def resolve_backend(cfg: MoEConfig) -> str:
    name, why = choose_backend(cfg)
    _announce(name, why)  # once per process, whatever the number of layers
    return name


def expert_hidden(model: ModelConfig, moe: MoEConfig) -> int:
    return moe.d_ff if moe.d_ff is not None else model.hidden_ff
