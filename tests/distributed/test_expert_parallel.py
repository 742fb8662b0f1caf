"""Expert parallelism with real processes: 2 gloo ranks, each holding half of the experts and its own
tokens, must reproduce the single-process MoE layer in outputs and in every gradient."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.moe.backends import Experts, grouped_expert_mlp
from scalesparse.model.moe.expert_parallel import expert_parallel_forward
from scalesparse.model.moe.layer import MoEMLP
from tests.distributed.test_sparse_sync import free_port

pytestmark = pytest.mark.distributed
D, FF, E, K = 16, 24, 4, 2
TOKENS = (11, 6)  # uneven on purpose


def reference() -> MoEMLP:
    torch.manual_seed(0)
    layer = MoEMLP(ModelConfig(d_model=D, d_ff=FF), MoEConfig(num_experts=E, top_k=K, backend="grouped"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS[rank], D, generator=g)
    return x, torch.randn(TOKENS[rank], D, generator=g)  # tokens, loss weights


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ref = reference()
        local = Experts(E // 2, D, FF, swiglu=True)
        own = slice(rank * E // 2, (rank + 1) * E // 2)
        with torch.no_grad():
            local.gate_up_proj.copy_(ref.experts.gate_up_proj[own])
            local.down_proj.copy_(ref.experts.down_proj[own])
        x, c = inputs(rank)
        x.requires_grad_(True)
        y = expert_parallel_forward(x, ref.router(x), local, E, grouped_expert_mlp)
        (y * c).sum().backward()
        torch.save({"y": y.detach(), "x_grad": x.grad, "gate_up": local.gate_up_proj.grad,
                    "down": local.down_proj.grad, "router": ref.router.gate.weight.grad},
                   os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_expert_parallel_equals_the_single_process_layer(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ref = reference()
    xs = [inputs(r)[0].requires_grad_(True) for r in range(2)]
    total = sum((ref(x) * inputs(r)[1]).sum() for r, x in enumerate(xs))
    total.backward()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for r in range(2):
        with torch.no_grad():
            torch.testing.assert_close(got[r]["y"], ref(inputs(r)[0]), **tol)
        torch.testing.assert_close(got[r]["x_grad"], xs[r].grad, **tol)
        own = slice(r * E // 2, (r + 1) * E // 2)
        # an expert's gradient gathers the tokens of both ranks
        torch.testing.assert_close(got[r]["gate_up"], ref.experts.gate_up_proj.grad[own], **tol)
        torch.testing.assert_close(got[r]["down"], ref.experts.down_proj.grad[own], **tol)
    # the replicated router sees each rank's tokens; data parallelism sums (then averages) them
    torch.testing.assert_close(got[0]["router"] + got[1]["router"], ref.router.gate.weight.grad, **tol)
