"""MoE layer forward+backward: scalesparse `grouped` vs `loop` vs transformers' Mixtral block vs dense.

E=8 experts, top-2, d_model 512, expert d_ff 2048 (SwiGLU), fp32. The dense SwiGLU MLP with hidden
k·d_ff has the same active FLOPs: it is the physical limit for a dropless MoE. All implementations
share the same weights and inputs and are interleaved round by round in one process, so machine
noise hits them alike; read the ratios (absolute times count only on a GPU).

Memory: CPU PyTorch keeps no allocator statistics, so we report the activation memory each
implementation holds for backward (bytes of distinct tensors saved by autograd), which is where
they differ; parameters and their gradients are the same for all.

    .venv/bin/python benchmarks/moe_layer.py [--tokens 1024 4096 16384] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
E, K, D, FF = 8, 2, 512, 2048


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, D, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def build(device: str) -> dict[str, nn.Module | None]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from scalesparse.config import ModelConfig, MoEConfig
    from scalesparse.model.moe.layer import MoEMLP

    torch.manual_seed(0)
    mods: dict[str, nn.Module | None] = {}
    for backend in ["grouped", "loop"] + (["megablocks"] if device == "cuda" else []):
        try:
            mods[backend] = MoEMLP(ModelConfig(d_model=D, d_ff=FF), MoEConfig(num_experts=E, top_k=K, backend=backend))
        except Exception as e:  # megablocks missing
            print(f"skip {backend}: {e}")
    ref = mods["grouped"]
    for p in ref.parameters():
        nn.init.normal_(p, std=0.02)
    for m in mods.values():
        m.load_state_dict(ref.state_dict())
    # batched_mm is left out: it gathers a copy of the expert weights per token (at 256 tokens it was
    # 190x the dense time and saved 6 GiB for backward; 16k tokens would not fit in memory)
    for impl in ("eager", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(ref.router.gate.weight)
            block.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
            block.experts.down_proj.copy_(ref.experts.down_proj)
        mods[f"transformers-{impl}"] = block
    mods["dense (hidden k*d_ff)"] = DenseSwiGLU(K * FF)
    return {n: m.to(device) for n, m in mods.items()}


def step_fn(mod: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        for p in mod.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = mod(xi.unsqueeze(0) if "Mixtral" in type(mod).__name__ else xi)
        y.float().pow(2).mean().backward()

    return step


def saved_bytes(step: Callable[[], None], mod: nn.Module) -> int:
    params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # weights are saved too, but they are the same for everyone
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def timed(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/moe_layer.json"))
    args = ap.parse_args()

    mods = build(args.device)
    results: dict[str, dict] = {}
    for n in args.tokens:
        x = torch.randn(n, D, device=args.device)
        steps, times, errors, memory = {}, {}, {}, {}
        for name, mod in mods.items():
            step = step_fn(mod, x)
            try:
                step()  # warm-up, and find the ones that cannot run here
                memory[name] = saved_bytes(step, mod)
                steps[name], times[name] = step, []
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        for _ in range(args.rounds):
            for name, step in steps.items():  # interleaved: every round runs each once
                times[name].append(timed(step, args.device))
        dense = statistics.median(times["dense (hidden k*d_ff)"])
        fastest_tf = min((statistics.median(t) for k, t in times.items() if k.startswith("transformers")),
                         default=float("nan"))  # fmt: skip
        row = {}
        for name, t in times.items():
            med = statistics.median(t)
            row[name] = {"median_s": med, "times_s": t, "tokens_per_s": n / med, "vs_dense": med / dense,
                         "activation_bytes": memory[name]}  # fmt: skip
        row["_failed"] = errors
        row["_grouped_vs_fastest_transformers"] = statistics.median(times["grouped"]) / fastest_tf
        results[str(n)] = row
        print(f"\n{n} tokens (fwd+bwd, median of {args.rounds}):")
        for name, r in row.items():
            if not name.startswith("_"):
                print(f"  {name:<26} {r['median_s'] * 1e3:9.1f} ms  {r['vs_dense']:5.2f}x dense  "
                      f"{r['activation_bytes'] / 2**20:8.1f} MiB saved for backward")  # fmt: skip
        for name, err in errors.items():
            print(f"  {name:<26} cannot run here: {err}")
        print(f"  grouped / fastest transformers: {row['_grouped_vs_fastest_transformers']:.2f}")

    out = {
        "benchmark": "moe_layer",
        "shape": {"experts": E, "top_k": K, "d_model": D, "d_ff": FF, "activation": "swiglu", "dtype": "fp32"},
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
