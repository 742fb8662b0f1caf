"""MoE layer forward+backward: scalesparse's backends vs transformers' Mixtral block vs MegaBlocks vs dense.

CPU: E=8 experts, top-2, d_model 512, expert d_ff 2048 (SwiGLU), fp32.
CUDA (`--device cuda`): Mixtral-8x7B's layer, d_model 4096, expert d_ff 14336, bf16, with MegaBlocks'
own `dMoE` (mlp_impl="grouped", GLU) as a peer when megablocks imports.
The dense SwiGLU MLP with hidden k·d_ff has the same active FLOPs: it is the physical limit for a
dropless MoE. All implementations share the same weights and inputs and are interleaved round by
round in one process, so machine noise hits them alike; read the ratios (absolute times count only
on a GPU).

Memory: on CUDA the peak allocated during one step (above the weights); CPU PyTorch keeps no
allocator statistics, so there we report the activation memory each implementation holds for
backward (bytes of distinct tensors saved by autograd), which is where they differ.

    .venv/bin/python benchmarks/moe_layer.py [--device cuda] [--tokens ...] [--rounds N] [--out FILE]
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
E, K = 8, 2
SHAPES = {"cpu": (512, 2048, torch.float32), "cuda": (4096, 14336, torch.bfloat16)}  # d_model, expert d_ff, dtype
D, FF, DTYPE = SHAPES["cpu"]
DENSE = "dense (hidden k*d_ff)"


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, D, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def megablocks_dmoe(ref) -> nn.Module:
    """MegaBlocks' own dropless MoE layer (GLU experts, grouped GEMM) holding `ref`'s weights."""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(hidden_size=D, ffn_hidden_size=FF, moe_num_experts=E, moe_top_k=K, mlp_type="glu",
                     mlp_impl="grouped", activation_fn=F.silu, bias=False, return_bias=False,
                     moe_normalize_expert_weights=1, bf16=DTYPE == torch.bfloat16, fp16=False)  # fmt: skip
    block = dMoE(args)
    gate, up = ref.experts.gate_up_proj.detach().chunk(2, dim=1)  # (E, ff, d) each
    with torch.no_grad():
        block.router.layer.weight.copy_(ref.router.gate.weight)
        block.experts.mlp.w1.copy_(gate.reshape(E * FF, D))
        block.experts.mlp.v1.copy_(up.reshape(E * FF, D))
        block.experts.mlp.w2.copy_(ref.experts.down_proj.detach().transpose(1, 2).reshape(E * FF, D))
    return block


def build(device: str) -> dict[str, nn.Module | None]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from scalesparse.config import ModelConfig, MoEConfig
    from scalesparse.model.moe.layer import MoEMLP

    torch.manual_seed(0)
    mods: dict[str, nn.Module | None] = {}
    with torch.device(device):  # Mixtral-sized experts are built where they run
        for backend in ["grouped", "loop"] + (["megablocks"] if device == "cuda" else []):
            try:
                mods[backend] = MoEMLP(ModelConfig(d_model=D, d_ff=FF),
                                       MoEConfig(num_experts=E, top_k=K, backend=backend))  # fmt: skip
            except Exception as e:  # megablocks missing
                print(f"skip {backend}: {e}")
    ref = mods["grouped"]
    for p in ref.parameters():
        nn.init.normal_(p, std=0.02)
    for m in mods.values():
        m.load_state_dict(ref.state_dict())
    if device == "cuda":
        try:
            with torch.device(device):
                mods["megablocks dMoE"] = megablocks_dmoe(ref)
        except Exception as e:
            print(f"skip megablocks dMoE: {type(e).__name__}: {e}")
    # batched_mm is left out: it gathers a copy of the expert weights per token (at 256 tokens it was
    # 190x the dense time and saved 6 GiB for backward; 16k tokens would not fit in memory)
    for impl in ("eager", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        with torch.device(device):
            block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(ref.router.gate.weight)
            block.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
            block.experts.down_proj.copy_(ref.experts.down_proj)
        mods[f"transformers-{impl}"] = block
    with torch.device(device):
        mods[DENSE] = DenseSwiGLU(K * FF)
    return {n: m.to(device=device, dtype=DTYPE) for n, m in mods.items()}


def step_fn(mod: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        for p in mod.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        name = type(mod).__name__
        y = mod(xi.unsqueeze(0) if "Mixtral" in name else xi.unsqueeze(1) if name == "dMoE" else xi)
        y = y[0] if isinstance(y, tuple) else y
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


def peak_bytes(step: Callable[[], None]) -> int:
    """CUDA: memory allocated at the step's peak above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def timed(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    global D, FF, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, nargs="+", help="default: 1024 4096 16384 (CPU), 4096 16384 (CUDA)")
    ap.add_argument("--rounds", type=int, help="default: 3 (CPU), 10 (CUDA)")
    ap.add_argument("--out", help="default: benchmarks/results/moe_layer.json (CPU), moe_layer_cuda.json (CUDA)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("moe_layer.py: --device cuda but torch sees no CUDA device")
    D, FF, DTYPE = SHAPES[args.device]
    tokens = args.tokens or ([4096, 16384] if cuda else [1024, 4096, 16384])
    rounds = args.rounds or (10 if cuda else 3)
    out_path = Path(args.out or REPO / f"benchmarks/results/moe_layer{'_cuda' if cuda else ''}.json")
    flops_per_token = 3 * 2 * K * 3 * D * FF  # fwd + bwd (2x fwd), k experts, three SwiGLU GEMMs

    mods = build(args.device)
    results: dict[str, dict] = {}
    out = {
        "benchmark": "moe_layer",
        "shape": {"experts": E, "top_k": K, "d_model": D, "d_ff": FF, "activation": "swiglu",
                  "dtype": str(DTYPE).replace("torch.", "")},  # fmt: skip
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
        "results": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for n in tokens:
        x = torch.randn(n, D, device=args.device, dtype=DTYPE)
        steps, times, errors, memory = {}, {}, {}, {}
        for name, mod in mods.items():
            step = step_fn(mod, x)
            try:
                step()  # warm-up, and find the ones that cannot run here
                memory[name] = peak_bytes(step) if cuda else saved_bytes(step, mod)
                steps[name], times[name] = step, []
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        for _ in range(rounds):
            for name, step in steps.items():  # interleaved: every round runs each once
                times[name].append(timed(step, args.device))
        med = {name: statistics.median(t) for name, t in times.items()}
        dense = med[DENSE]
        fastest_tf = min((t for k, t in med.items() if k.startswith("transformers")), default=float("nan"))
        dmoe = med.get("megablocks dMoE", float("nan"))
        row = {}
        for name, t in times.items():
            row[name] = {"median_s": med[name], "times_s": t, "tokens_per_s": n / med[name],
                         "tflops": flops_per_token * n / med[name] / 1e12, "vs_dense": med[name] / dense,
                         "vs_megablocks_dmoe": med[name] / dmoe if dmoe == dmoe else None,
                         ("peak_bytes" if cuda else "activation_bytes"): memory[name]}  # fmt: skip
        row["_failed"] = errors
        row["_grouped_vs_fastest_transformers"] = med["grouped"] / fastest_tf
        results[str(n)] = row
        print(f"\n{n} tokens (fwd+bwd, median of {rounds}):")
        for name, r in row.items():
            if not name.startswith("_"):
                mem = r.get("peak_bytes", r.get("activation_bytes")) / 2**20
                vs_dmoe = f"{r['vs_megablocks_dmoe']:5.2f}x dMoE " if r["vs_megablocks_dmoe"] else ""
                print(f"  {name:<26} {r['median_s'] * 1e3:9.2f} ms  {r['tflops']:7.1f} TFLOP/s  "
                      f"{r['vs_dense']:5.2f}x dense  {vs_dmoe} {mem:9.1f} MiB "
                      f"{'peak' if cuda else 'saved for backward'}")  # fmt: skip
        for name, err in errors.items():
            print(f"  {name:<26} cannot run here: {err}")
        print(f"  grouped / fastest transformers: {row['_grouped_vs_fastest_transformers']:.2f}")
        out_path.write_text(json.dumps(out, indent=1))  # per token count: a cut-short run keeps the rest
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
