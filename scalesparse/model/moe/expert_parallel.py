"""Expert parallelism: each rank holds E/P of the experts; tokens travel to their experts' ranks.

Forward on every rank, for its own tokens:
  1. route (router replicated, data parallel), sort the N·k assignments by destination rank;
  2. all-to-all the token rows and their expert ids (uneven splits);
  3. run the local experts on what arrived (the same grouped expert MLP as the single-process path);
  4. all-to-all the results back (the reverse splits), weight them and add them to their tokens.
Autograd sends gradients back along the same routes, so an expert's weight gradient sums the
contributions of every rank's tokens: with the data-parallel 1/P averaging that the other weights
get, it equals the single-process gradient (tests/distributed/test_expert_parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from scalesparse import comm
from scalesparse.model.moe.backends import Experts, permuted_experts
from scalesparse.model.moe.router import Routing


def expert_parallel_forward(
    x: torch.Tensor, routing: Routing, local: Experts, num_experts: int, expert_mlp
) -> torch.Tensor:
    """x: (N, d) this rank's tokens; `local` holds experts [rank·E/P, (rank+1)·E/P)."""
    P = comm.world_size()
    per_rank = num_experts // P
    N, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # by expert, hence by destination rank
    token = order // k
    send = torch.bincount(flat // per_rank, minlength=P)
    recv = comm.exchange_counts(send) if comm.is_distributed() else send
    send_l, recv_l = send.tolist(), recv.tolist()
    arrived = comm.all_to_all(x.index_select(0, token), send_l, recv_l)  # (M, d)
    arrived_expert = comm.all_to_all(flat[order].unsqueeze(1), send_l, recv_l).squeeze(1) - comm.rank() * per_rank
    ones = torch.ones(arrived.shape[0], 1, dtype=x.dtype, device=x.device)
    done = permuted_experts(arrived, ones, arrived_expert.unsqueeze(1), local, expert_mlp)  # (M, d)
    back = comm.all_to_all(done, recv_l, send_l)  # (N·k, d), in the order sent
    out = back * routing.weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, token, out)


def shard_experts(model: nn.Module, rank: int, world: int, device: torch.device | str | None = None
                  ) -> dict[str, nn.Parameter]:  # fmt: skip
    """Keep experts [rank·E/P, (rank+1)·E/P) of every MoE layer and switch the layers to all-to-all.

    The local experts are deliberately *not* registered as submodules: whatever wraps the model
    (DeepSpeed) must not see, reduce or partition them. Returns them by their full-model names
    (e.g. layers.0.mlp.experts.gate_up_proj), holding this rank's slice along the expert dimension,
    on `device` (default: where the model is).
    """
    from scalesparse.model.moe.layer import MoEMLP

    out: dict[str, nn.Parameter] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, MoEMLP):
            continue
        full: Experts = layer.experts
        per = full.num_experts // world
        local = Experts(per, full.down_proj.shape[1], full.d_ff, full.swiglu).to(device or full.down_proj.device)
        with torch.no_grad():
            for p_name in ("gate_up_proj", "down_proj"):
                getattr(local, p_name).copy_(getattr(full, p_name)[rank * per : (rank + 1) * per])
                out[f"{name}.experts.{p_name}"] = getattr(local, p_name)
        del layer._modules["experts"]
        object.__setattr__(layer, "experts", local)  # an attribute, not a submodule
        layer.expert_parallel = world
    return out
