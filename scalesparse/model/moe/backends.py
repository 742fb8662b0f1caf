"""Expert computation backends behind one interface, registered by name.

    backend(x, weights, experts, ex) -> y
    x: (N, d) tokens; weights, experts: (N, k) routing; ex: the Experts module; y: (N, d)

* loop       the plain per-expert reference (what transformers' eager Mixtral experts do)
* grouped    permute so each expert's tokens are contiguous, one GEMM per expert (custom autograd,
             no padding, no dropped tokens), un-permute and weight: exact, pure PyTorch, CPU and GPU
* megablocks the same permutation with MegaBlocks' grouped-GEMM CUDA kernel (optional `gpu` extra)
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


class GroupedMatmul(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]ᵀ for contiguous row groups; w: (E, out, in).

    Written out per expert into preallocated buffers so that backward allocates one gradient per
    input (indexing w[e] under autograd would materialise a full-size zero gradient per expert).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(x[start : start + c], w[e].t(), out=out[start : start + c])
            start += c
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None  # experts with no tokens get 0
        start = 0
        for e, c in enumerate(ctx.counts):
            if c:
                g = grad[start : start + c]
                if gx is not None:
                    torch.mm(g, w[e], out=gx[start : start + c])
                if gw is not None:
                    torch.mm(g.t(), x[start : start + c], out=gw[e])
            start += c
        return gx, gw, None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return GroupedMatmul.apply(x, w, counts.tolist())


def permuted_experts(x, weights, experts, ex: Experts, gmm) -> torch.Tensor:
    """Sort the N·k assignments by expert (stable: token order within an expert), run the experts
    on contiguous row groups with `gmm`, weight, and scatter-add back to the tokens."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts)
    token = order // k  # assignment → its token
    xs = x.index_select(0, token)  # (N·k, d)
    h = ex.act(gmm(xs, ex.gate_up_proj, counts))  # (N·k, ff)
    out = gmm(h, ex.down_proj, counts) * weights.reshape(-1)[order].unsqueeze(1)  # (N·k, d)
    return torch.zeros_like(x).index_add_(0, token, out)


@BACKENDS.register("grouped")
def grouped_backend(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ex: Experts) -> torch.Tensor:
    return permuted_experts(x, weights, experts, ex, grouped_matmul)


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

    def gmm(a, w, counts):
        return gg.ops.gmm(a, w, counts.cpu(), trans_b=True)  # batch sizes live on the host

    return permuted_experts(x, weights, experts, ex, gmm)


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
