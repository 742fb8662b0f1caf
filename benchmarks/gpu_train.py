"""Training throughput on one GPU: scalesparse's trainer against a lean PyTorch loop on the same model.

Both train `scalesparse.model.GPT` with the same shape, batch and data, in one process, one after the
other:
* project   the real worker loop (train.single → loop.train_worker: DeepSpeed ZeRO-2, bf16, fused
            AdamW, train.compile), tokens/s as its metrics log them, past the warm-up;
* lean      model.cuda(), torch.autocast(bf16), fused AdamW, gradient clipping, torch.compile (and
            eager), timed with CUDA syncs around a window of steps.
Shapes: (a) d_model 1024, 12 layers, 16 heads, seq 1024, vocab 8192 (~160M); (b) d_model 1024,
24 layers, 16 heads, seq 2048 (~350M). On shape (a) also RigL at 90% with ΔT=100 against dense, and
MoE (E=8, top-2, expert d_ff half the dense MLP's: equal active parameters) with each backend.
MFU = tokens/s × training FLOPs per token / the GPU's peak dense bf16 FLOP/s (--peak-tflops; 989 for
H100/H200 SXM). Tokens are synthetic (uniform ids): speed does not depend on them. Each project case
ends with the trainer's final checkpoint (after its timed window: it costs wall time, not tokens/s).

Cases run in priority order (PRIORITY: the project against the lean compiled loop on shape a first,
then RigL and MoE, then shape b), each in a clean state (engines and compiled graphs dropped, peak
memory reset: every case's peak is its own), and the JSON, ratios included, is rewritten after every
case, so a run cut short by its time limit keeps every figure it measured. With --budget-s a case
whose expected time (the last case's fixed seconds plus its seconds per step times the steps) no
longer fits is recorded as not run.
tokens/s of a project run is total tokens over total time after the warm-up steps, mask updates and
all (RigL's cost is in those steps; a median of intervals would drop them).

    python benchmarks/gpu_train.py [--shapes a b] [--cases ...] [--budget-s S] [--append] [--note T] [--out FILE]
    python benchmarks/gpu_train.py --smoke     # tiny shapes on the CPU: checks the plumbing only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 8192
SHAPES = {
    "a": {"d_model": 1024, "n_layers": 12, "n_heads": 16, "seq_len": 1024, "micro": 16},
    "b": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "seq_len": 2048, "micro": 8},
    "smoke": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64, "micro": 4},
}
GA = 2  # micro-batches per optimizer step


def synthetic_data(folder: Path, vocab: int, tokens: int):
    from scalesparse.data import PreparedData

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "train.npy", rng.integers(0, vocab, tokens, dtype=np.int32).astype(np.uint16))
    np.save(folder / "val.npy", rng.integers(0, vocab, tokens // 10, dtype=np.int32).astype(np.uint16))
    (folder / "tokenizer.json").write_text(json.dumps({"type": "byte"}))  # checkpoints copy one
    return PreparedData(folder, vocab, 0, tokens, tokens // 10)


def model_section(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k != "micro"} | {"activation": "swiglu", "position": "rotary",
                                                               "norm": "rmsnorm"}  # fmt: skip


def project_config(shape: dict, steps: int, run_dir: Path, cuda: bool, extra: dict) -> dict:
    cfg = {
        "name": "bench", "run_dir": str(run_dir), "model": model_section(shape),
        "data": {"vocab_size": VOCAB, "val_blocks": 2},
        "train": {"steps": steps, "global_batch_size": shape["micro"] * GA, "micro_batch_size": shape["micro"],
                  "warmup_steps": 10, "eval_every": 0, "dtype": "bf16" if cuda else "fp32", "compile": cuda},
        "parallel": {"workers": 1, "zero_stage": 2},
        "resources": {"gpus_per_worker": 1 if cuda else 0, "cpus_per_worker": 4},
        "checkpoint": {"every": 0},
        "logging": {"log_every": 10 if cuda else 5, "tensorboard": False, "progress": False},
    }  # fmt: skip
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def reset_memory(cuda: bool) -> float | None:
    """Drop what earlier cases left (compiled graphs hold their modules) and reset the peak; the
    memory still allocated afterwards (MiB), which should be ~0: a leak would inflate later peaks."""
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if not cuda:
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def peak_mb(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def run_project(shape: dict, steps: int, warmup: int, data, extra: dict, cuda: bool) -> dict:
    from scalesparse.config import config_from_dict
    from scalesparse.train.single import train_in_process

    held = reset_memory(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(project_config(shape, steps, Path(tmp) / "run", cuda, extra))
        rows = train_in_process(cfg, data)
        del cfg
    logged = [r for r in rows if "tokens_per_s" in r]
    first = max((r for r in logged if r["step"] <= warmup), key=lambda r: r["step"])
    last = logged[-1]
    tokens = (last["step"] - first["step"]) * shape["micro"] * GA * shape["seq_len"]
    rates = [r["tokens_per_s"] for r in logged if r["step"] > warmup]
    return {"tokens_per_s": tokens / (last["time"] - first["time"]), "median_interval_tokens_per_s":
            statistics.median(rates), "intervals": rates, "peak_mem_mb": peak_mb(cuda),
            "mem_held_at_start_mb": held}  # fmt: skip


def run_lean(shape: dict, steps: int, warmup: int, data, compile: bool, cuda: bool) -> dict:
    """The peer: the same GPT in a plain single-device loop."""
    from scalesparse.config import config_from_dict
    from scalesparse.data import TokenBlocks
    from scalesparse.model import GPT

    held = reset_memory(cuda)
    device = "cuda" if cuda else "cpu"
    cfg = config_from_dict({"model": model_section(shape)})
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB, cfg.moe).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)
    step_model = torch.compile(model) if compile else model
    blocks = TokenBlocks(data.train_path, shape["seq_len"])
    micro = shape["micro"]
    dtype = torch.bfloat16 if cuda else torch.float32

    def step(i: int) -> None:
        for m in range(GA):
            x, y = blocks.get(np.arange((i * GA + m) * micro, (i * GA + m + 1) * micro) % len(blocks))
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                _, loss = step_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / GA).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    tps = (steps - warmup) * GA * micro * shape["seq_len"] / (time.perf_counter() - t0)
    return {"tokens_per_s": tps, "peak_mem_mb": peak_mb(cuda), "mem_held_at_start_mb": held}


def flops_per_token(shape: dict, extra: dict) -> int:
    from scalesparse.config import config_from_dict
    from scalesparse.model import count_flops_per_token

    cfg = config_from_dict({"model": model_section(shape) | extra.get("model", {}), **{
        k: v for k, v in extra.items() if k == "moe"}})  # fmt: skip
    return count_flops_per_token(cfg.model, VOCAB, moe=cfg.moe)["train"]


# (shape, label) in the order the run takes them: the project against the lean compiled loop first
# (the headline ratio), then what the project adds (RigL, MoE per backend), then the rest
PRIORITY = [("a", "project dense"), ("a", "lean compiled"), ("a", "project rigl 90% dT=100"),
            ("a", "project moe grouped"), ("a", "project moe megablocks"), ("b", "project dense"),
            ("b", "lean compiled"), ("a", "lean eager"), ("a", "project moe loop"), ("b", "lean eager")]  # fmt: skip


def cases_for(shape_name: str, shape: dict, cuda: bool) -> dict[str, dict]:
    """label → {"kind": project | lean, "extra" (project overrides) or "compile" (lean)}."""
    out = {
        "project dense": {"kind": "project", "extra": {}},
        "lean compiled": {"kind": "lean", "compile": cuda},
        "lean eager": {"kind": "lean", "compile": False},
    }
    if shape_name in ("a", "smoke"):
        # updates at every ΔT to the end (stop_fraction 1), and the run a whole number of ΔT past the
        # warm-up, so the timed window holds its fair share of mask updates
        rigl = {"method": "rigl", "sparsity": 0.9, "update_interval": 100 if cuda else 10, "stop_fraction": 1.0}
        out["project rigl 90% dT=100"] = {"kind": "project", "extra": {"sparsity": rigl}}
        hidden = config_hidden(shape)
        for backend in ("grouped", "megablocks", "loop") if cuda else ("grouped", "loop"):
            moe = {"num_experts": 8, "top_k": 2, "d_ff": hidden // 2, "backend": backend}
            out[f"project moe {backend}"] = {"kind": "project", "extra": {"model": {"mlp": "moe"}, "moe": moe}}
    return out


def planned(shapes: list[str], cuda: bool, only: list[str] | None) -> list[tuple[str, str, dict]]:
    """(shape, label, case) in priority order (on the CPU smoke shape, the same order of labels)."""
    order = [(("smoke" if not cuda else s), label) for s, label in PRIORITY if not cuda or s in shapes]
    seen, out = set(), []
    for s, label in order:
        case = cases_for(s, SHAPES[s], cuda).get(label)
        if case is None or (s, label) in seen or (only and label not in only):
            continue
        seen.add((s, label))
        out.append((s, label, case))
    return out


def ratios_of(row: dict[str, dict]) -> dict[str, float]:
    tps = {label: r["tokens_per_s"] for label, r in row.items() if "tokens_per_s" in r}
    ratios = {}
    if "project dense" in tps and "lean compiled" in tps:
        ratios["project / lean compiled"] = tps["project dense"] / tps["lean compiled"]
    for label in tps:
        if label.startswith("project ") and label != "project dense" and "project dense" in tps:
            ratios[f"{label[8:]} / dense"] = tps[label] / tps["project dense"]
    return ratios


def config_hidden(shape: dict) -> int:
    from scalesparse.config import config_from_dict

    return config_from_dict({"model": model_section(shape)}).model.hidden_ff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--cases", nargs="+", help="labels to run (default: all)")
    ap.add_argument("--steps", type=int, help="steps per project/lean run (default 60; 250 with RigL)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    ap.add_argument("--budget-s", type=float, help="seconds for all cases: one that no longer fits is not run")
    ap.add_argument("--append", action="store_true", help="add to --out's results instead of starting afresh")
    ap.add_argument("--note", help="recorded in the JSON (e.g. what else the machine was doing)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the plumbing")
    ap.add_argument("--out", help="default benchmarks/results/gpu_train.json (smoke: a temporary file)")
    args = ap.parse_args()
    t_start = time.monotonic()
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_train.py needs CUDA (or --smoke for the CPU plumbing check)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shapes = ["smoke"] if args.smoke else args.shapes
    out_path = Path(args.out or (tempfile.mkdtemp() + "/gpu_train.json" if args.smoke
                                 else REPO / "benchmarks/results/gpu_train.json"))  # fmt: skip
    out = json.loads(out_path.read_text()) if args.append and out_path.is_file() else {
        "benchmark": "gpu_train",
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke: plumbing only, not a measurement)",
        "peak_tflops": args.peak_tflops,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "global_batch": {n: SHAPES[n]["micro"] * GA for n in SHAPES},
        "order": [f"{s} / {label}" for s, label in PRIORITY],
        "results": {},
    }  # fmt: skip
    results: dict[str, dict] = out["results"]
    if args.note:
        out.setdefault("notes", []).append(args.note)

    def write() -> None:  # after every case: a run cut short by a time limit keeps what it measured
        for entry in results.values():
            entry["ratios"] = ratios_of(entry["cases"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    last: dict[str, float] | None = None  # the last case's fixed and per-step seconds: the next one's estimate
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "data", VOCAB, 4_000_000 if cuda else 200_000)
        for name, label, case in planned(shapes, cuda, args.cases):
            shape = SHAPES[name]
            row = results.setdefault(name, {"shape": shape, "cases": {}})["cases"]
            rigl = "rigl" in label
            # RigL: ΔT=100 from step 20 → updates at 100 and 200 inside the timed steps 20..220
            steps = args.steps or ((220 if cuda else 40) if rigl else (60 if cuda else 20))
            warmup = 20 if cuda else 5
            scale = 2 if name == "b" else 1  # shape b: ~2x the work a step (and to compile)
            if args.budget_s and last is not None:
                left = args.budget_s - (time.monotonic() - t_start)
                expected = scale * (last["overhead_s"] + last["s_per_step"] * steps)
                if expected > left:
                    row[label] = {"not_run": f"the budget: ~{expected:.0f} s expected, {left:.0f} s left"}
                    print(f"[{name}] {label:<28} not run: {row[label]['not_run']}", flush=True)
                    write()
                    continue
            t_case = time.monotonic()
            try:
                if case["kind"] == "project":
                    r = run_project(shape, steps, warmup, data, case["extra"], cuda)
                else:
                    r = run_lean(shape, steps, warmup, data, case["compile"], cuda)
            except Exception as e:  # e.g. megablocks not installed: recorded, the rest still runs
                row[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(f"[{name}] {label:<28} failed: {row[label]['error']}", flush=True)
                write()
                continue
            wall = time.monotonic() - t_case
            s_per_step = GA * shape["micro"] * shape["seq_len"] / r["tokens_per_s"]
            # the next case's estimate: fixed cost (start, compilation, checkpoint) + its steps at this pace
            last = {"overhead_s": max(0.0, wall - steps * s_per_step) / scale, "s_per_step": s_per_step / scale}
            fpt = flops_per_token(shape, case.get("extra", {}))
            r |= {"steps": steps, "wall_s": wall, "train_flops_per_token": fpt,
                  "mfu": r["tokens_per_s"] * fpt / (args.peak_tflops * 1e12)}  # fmt: skip
            row[label] = r
            mem = f"{r['peak_mem_mb']:,.0f} MiB peak" if r["peak_mem_mb"] else ""
            print(f"[{name}] {label:<28} {r['tokens_per_s']:>12,.0f} tok/s  MFU {r['mfu']:6.1%}  {mem}"
                  f"  ({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
            write()
            for k, v in ratios_of(row).items():  # the ratios this case completed
                if k.startswith(label.removeprefix("project ") + " /") or (
                        k == "project / lean compiled" and label in ("project dense", "lean compiled")):  # fmt: skip
                    print(f"[{name}]   {k}: {v:.3f}", flush=True)
    write()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
