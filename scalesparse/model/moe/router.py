"""Top-k softmax gating with the Switch load-balancing loss and the ST-MoE router z-loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    weights: torch.Tensor
    """(N, k) gate weight of each chosen expert, in the input dtype."""
    experts: torch.Tensor
    """(N, k) expert index, int64."""
    probs: torch.Tensor
    """(N, E) softmax over all experts, fp32."""
    logits: torch.Tensor
    """(N, E) router logits, fp32."""


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool, jitter: float) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.jitter = renormalize, jitter
        # Mixtral's router weight layout (E, d): nn.Linear(d, E) stores exactly that
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        # x: (N, d_model)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x).float()  # softmax and top-k in fp32 so bf16 ties do not flip routes
        probs = F.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights.to(x.dtype), experts, probs, logits)


def load_balancing_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch Transformer's E·Σ_e f_e·P_e: f_e the fraction of the N·k assignments sent to expert e
    (not differentiable), P_e the mean router probability of e. Equals 1.0 when balanced."""
    counts = tokens_per_expert(routing, num_experts).float()
    f = counts / counts.sum()
    p = routing.probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE's router z-loss: keeps router logits small, which keeps the softmax stable."""
    return torch.logsumexp(routing.logits, dim=-1).pow(2).mean()


def tokens_per_expert(routing: Routing, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64, on the routing's device). A scatter-add, not bincount: on CUDA
    bincount reads the largest id back to the host to size its output, a sync per layer."""
    flat = routing.experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
