"""Expert computation backends behind one interface, registered by name.

    backend(x, weights, experts, ex) -> y
    x: (N, d) tokens; weights, experts: (N, k) routing; ex: the Experts module; y: (N, d)

* loop       the plain per-expert reference (what transformers' eager Mixtral experts do)
* grouped    permute so each expert's tokens are contiguous, run each expert's MLP on its rows (one
             hand-written autograd function, in cache-sized row blocks on CPU; no padding, no dropped
             tokens), un-permute and weight: exact, pure PyTorch, CPU and GPU
* megablocks the same permutation with MegaBlocks' grouped-GEMM CUDA kernels (optional `gpu` extra)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.errors import ConfigError
from scalesparse.registry import Registry

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Experts"], torch.Tensor]
BACKENDS: Registry[Backend] = Registry("moe backend")


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


@BACKENDS.register("loop")
def loop_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    y = torch.zeros_like(x)
    for e in range(ex.num_experts):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = ex.act(F.linear(x[token], ex.gate_up_proj[e]))
        out = F.linear(h, ex.down_proj[e]) * weights[token, slot, None]
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


def grouped_expert_mlp(xs: torch.Tensor, counts: torch.Tensor, ex: Experts) -> torch.Tensor:
    """The experts on rows already sorted by expert (counts[e] rows each); unweighted outputs."""
    rows = block_rows(ex.gate_up_proj)
    return GroupedExpertMLP.apply(xs, ex.gate_up_proj, ex.down_proj, counts.tolist(), ex.swiglu, rows)


def permuted_experts(x, weights, experts, ex: Experts, expert_mlp) -> torch.Tensor:
    """Sort the N·k assignments by expert (stable: token order within an expert), run the experts
    on contiguous row groups with `expert_mlp`, weight, and scatter-add back to the tokens."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts)
    token = order // k  # assignment → its token
    out = expert_mlp(x.index_select(0, token), counts, ex)  # (N·k, d)
    out = out * weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, token, out)


@BACKENDS.register("grouped")
def grouped_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    return permuted_experts(x, weights, experts, ex, grouped_expert_mlp)


@functools.cache
def megablocks_available() -> bool:
    """Probed once: CUDA present and MegaBlocks' grouped GEMM importable."""
    if not torch.cuda.is_available():
        return False
    try:
        from megablocks import grouped_gemm_util as gg
    except ImportError:
        return False
    return gg.grouped_gemm_is_available()


@BACKENDS.register("megablocks")
def megablocks_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    from megablocks import grouped_gemm_util as gg

    def expert_mlp(xs, counts, ex):
        counts = counts.cpu()  # MegaBlocks wants the group sizes on the host
        h = ex.act(gg.ops.gmm(xs, ex.gate_up_proj, counts, trans_b=True))
        return gg.ops.gmm(h, ex.down_proj, counts, trans_b=True)

    return permuted_experts(x, weights, experts, ex, expert_mlp)


def resolve_backend(cfg: MoEConfig) -> str:
    if cfg.backend == "auto":
        return "megablocks" if megablocks_available() else "grouped"
    if cfg.backend == "megablocks" and not megablocks_available():
        raise ConfigError(
            "moe.backend: 'megablocks' cannot run here (needs CUDA and `pip install scalesparse[gpu]`, "
            "i.e. megablocks with its grouped_gemm kernels); use 'grouped'"
        )
    return cfg.backend


def expert_hidden(model: ModelConfig, moe: MoEConfig) -> int:
    return moe.d_ff if moe.d_ff is not None else model.hidden_ff
