"""The MoE MLP: route → experts (a backend) → weighted combine, plus its auxiliary losses.

Dropless by default. With `capacity_factor` set, it behaves like Switch/GShard instead: each expert
takes at most C = ⌈factor·N·k/E⌉ assignments in padded (E, C, d) batches, first choices before
second choices, in token order; the rest are dropped (those tokens keep only their residual).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.mlp import MLPS
from scalesparse.model.moe.backends import (
    BACKENDS,
    SORTED_MLPS,
    Experts,
    expert_hidden,
    expert_weights,
    resolve_backend,
)
from scalesparse.model.moe.expert_parallel import expert_parallel_forward
from scalesparse.model.moe.router import TopKRouter, load_balancing_loss, tokens_per_expert, z_loss


def capacity_assignment(experts: torch.Tensor, num_experts: int, capacity: int):
    """Which of the N·k assignments fit: (keep (N·k,), slot in its expert's buffer (N·k,)).

    Assignments are ranked slot-major (every token's first choice before any second choice), then
    by token position, as in GShard. Returned in token-major order, matching experts.reshape(-1).
    """
    N, k = experts.shape
    slot_major = experts.t().reshape(-1)  # (k·N,)
    one_hot = F.one_hot(slot_major, num_experts)
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)  # rank of each assignment within its expert
    position = position.view(k, N).t().reshape(-1)  # back to token-major
    return position < capacity, position


def padded_experts(x, weights, experts, ex: Experts, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard-style computation on (E, C, d) padded batches. Returns (y, keep)."""
    N, k = experts.shape
    E, d = ex.num_experts, x.shape[1]
    keep, position = capacity_assignment(experts, E, capacity)
    flat = experts.reshape(-1)
    token = torch.arange(N, device=x.device).repeat_interleave(k)[keep]
    dest = flat[keep] * capacity + position[keep]  # row in the (E·C, d) buffer
    buf = x.new_zeros(E * capacity, d).index_copy(0, dest, x.index_select(0, token)).view(E, capacity, d)
    w1, w2 = expert_weights(ex, x.dtype)
    h = ex.act(torch.bmm(buf, w1.transpose(1, 2)))
    out = torch.bmm(h, w2.transpose(1, 2)).view(E * capacity, d)
    out = out.index_select(0, dest) * weights.reshape(-1)[keep].unsqueeze(1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out), keep


@MLPS.register("moe")
class MoEMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.router = TopKRouter(cfg.d_model, moe.num_experts, moe.top_k, moe.renormalize, moe.jitter)
        self.experts = Experts(moe.num_experts, cfg.d_model, expert_hidden(cfg, moe), cfg.activation == "swiglu")
        self.backend_name = resolve_backend(moe)
        self.backend = BACKENDS.get(self.backend_name)
        self.sorted_mlp = SORTED_MLPS.get(self.backend_name)  # what expert parallelism runs
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.expert_parallel = 1  # set by expert_parallel.shard_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        routing = self.router(flat)
        E = self.moe.num_experts
        if self.expert_parallel > 1:
            y = expert_parallel_forward(flat, routing, self.experts, E, self.sorted_mlp)
            dropped = flat.new_zeros((), dtype=torch.float32)
        elif self.moe.capacity_factor is None:
            y = self.backend(flat, routing.weights, routing.experts, self.experts)
            dropped = flat.new_zeros((), dtype=torch.float32)
        else:
            capacity = math.ceil(self.moe.capacity_factor * flat.shape[0] * self.moe.top_k / E)
            y, keep = padded_experts(flat, routing.weights, routing.experts, self.experts, capacity)
            dropped = 1.0 - keep.float().mean()
        balance, z = load_balancing_loss(routing, E), z_loss(routing)
        self.aux_loss = self.moe.aux_loss_weight * balance + self.moe.z_loss_weight * z
        self.stats = {"load": tokens_per_expert(routing, E).detach(), "balance_loss": balance.detach(),
                      "z_loss": z.detach(), "dropped": dropped.detach()}  # fmt: skip
        return y.view(shape)

    def active_matmul_params(self) -> int:
        """Weights one token multiplies with: the router and k of the E experts."""
        per_expert = (self.experts.gate_up_proj.numel() + self.experts.down_proj.numel()) // self.moe.num_experts
        return self.router.gate.weight.numel() + self.moe.top_k * per_expert
