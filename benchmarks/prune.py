"""One-shot pruning of a real pretrained LLM: perplexity and wall time per method, and SparseGPT's
cost against layer width.

Part 1: SmolLM2-135M (scalesparse assets fetch smollm2-135m; Q4_1 weights dequantised to fp32), each
method at 50% unstructured and 2:4 (`--patterns`), the same calibration (`--calibration`: 16 × 256
tokens of The Tempest by default) and the same evaluation (Hamlet, sliding windows; see each
report.md) for all; Wanda and magnitude with each `--layer-error` setting asked for (off by default,
as in `scalesparse prune`); `--repeats` interleaved runs, medians, each run's 1-minute load average
beside its time (on a shared machine the spread is the other users'). Pruning time is the walk
alone (`prune_seconds`: no model loading, no perplexity), and each method's ratio to SparseGPT's.
Part 2: SparseGPT on one random d×d layer with n calibration tokens: Hessian accumulation (∝ n·d²)
and the solve (∝ d³) timed separately, for growing d.
On a GPU (`--device cuda`): a LLaMA-7B-shaped decoder (hidden 4096, ffn 11008, 32 heads; random
weights, `--blocks` of its 32 blocks) pruned block by block on the device with 128 × 2048 calibration
tokens, seconds per block for each method and the peak GPU memory; targets from issue 14 printed
beside them (SparseGPT ≤ 4 s per block, Wanda ≤ 1 s, magnitude ≤ 0.5 s on an H100/H200). The model
is in bf16 (`--dtype`), as a user's checkpoint is; the fp32 work (Gram sums, solves) runs with TF32
matmuls (`--no-tf32` for full fp32; `scalesparse prune` itself leaves torch's default, TF32 off). Each
method does only its own work (layer_error off): magnitude runs no calibration forward, Wanda sums
per-column x² without Gram matrices; their reconstruction error is therefore not reported.

    .venv/bin/python benchmarks/prune.py [--methods ...] [--widths 256 512 1024 2048] [--out FILE]
    .venv/bin/python benchmarks/prune.py --calibration 64 512 --patterns unstructured --layer-error false true \
        --repeats 2 --skip-scaling --out benchmarks/results/prune_speed.json     # the README's speed rows
    .venv/bin/python benchmarks/prune.py --device cuda [--blocks 4] [--out FILE]
    .venv/bin/python benchmarks/prune.py --device cpu --llama-shape tiny    # the GPU part's plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def real_model(args) -> list[dict]:
    """Each method × pattern × error-report setting on SmolLM2-135M, `--repeats` times interleaved (the
    machine may be shared: each run's load average is kept beside its time); the perplexities of the
    repeats must agree (the pruning is deterministic)."""
    from scalesparse.assets import fetch_model
    from scalesparse.config import load_prune_config
    from scalesparse.pruning import PRUNERS
    from scalesparse.pruning.job import run_prune

    model = fetch_model("smollm2-135m")
    samples, seq_len = args.calibration
    cases = []
    for pattern in args.patterns:
        for method in args.methods:
            # SparseGPT's error report is free (its Hessian is the Gram matrix): one setting is enough
            reports = [True] if PRUNERS.get(method).needs_gram else args.layer_error
            cases += [(pattern, method, le) for le in reports]
    runs: dict[tuple, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for pattern, method, le in cases:
                out = f"{tmp}/{k}-{method}-{pattern}-{le}".replace(":", "of")
                sets = [f"model={model}", f"method={method}", "sparsity=0.5", f"out={out}",
                        f"eval.tokens={args.eval_tokens}", f"calibration.samples={samples}",
                        f"calibration.seq_len={seq_len}", f"layer_error={str(le).lower()}"]  # fmt: skip
                if pattern != "unstructured":
                    sets.append(f"pattern={pattern}")
                load = os.getloadavg()[0]
                r = run_prune(load_prune_config(None, sets), progress=False)
                r["loadavg_1min"] = [load, os.getloadavg()[0]]  # before and after the run
                runs[(pattern, method, le)].append(r)
                print(f"round {k}: {method:>9} {pattern:>12} layer_error={le!s:5}: ppl {r['ppl_before']:.2f} → "
                      f"{r['ppl_after']:.2f}, pruning {r['prune_seconds']:.1f} s "
                      f"(load {load:.1f} → {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    rows = []
    for (pattern, method, le), rs in runs.items():
        ppls = {r["ppl_after"] for r in rs}
        assert len(ppls) == 1, f"{method} {pattern}: the repeats' perplexities differ: {ppls}"
        first = rs[0]
        rows.append({"method": method, "pattern": None if pattern == "unstructured" else pattern,
                     "sparsity": first["sparsity"], "layer_error": le,
                     "rel_error_reported": any(x["rel_error"] is not None for x in first["layers"]),
                     "ppl_before": first["ppl_before"], "ppl_after": first["ppl_after"],
                     "prune_seconds": statistics.median(r["prune_seconds"] for r in rs),
                     "prune_seconds_min": min(r["prune_seconds"] for r in rs),
                     "samples": [{"prune_seconds": r["prune_seconds"], "wall_seconds": r["wall_seconds"],
                                  "phase_seconds": r["phase_seconds"], "loadavg_1min": r["loadavg_1min"]}
                                 for r in rs],
                     "calibration": first["calibration"], "eval": first["eval"]})  # fmt: skip
    for pattern in args.patterns:
        key = None if pattern == "unstructured" else pattern
        ref = next((r for r in rows if r["method"] == "sparsegpt" and r["pattern"] == key), None)
        for r in rows:
            if ref and r["pattern"] == key:
                r["vs_sparsegpt"] = r["prune_seconds"] / ref["prune_seconds"]
                r["vs_sparsegpt_min"] = r["prune_seconds_min"] / ref["prune_seconds_min"]
                print(f"{r['method']:>9} {pattern:>12} layer_error={r['layer_error']!s:5}: median "
                      f"{r['prune_seconds']:.1f} s = {r['vs_sparsegpt']:.2f}× SparseGPT "
                      f"(fastest runs {r['vs_sparsegpt_min']:.2f}×), ppl {r['ppl_after']:.2f}", flush=True)  # fmt: skip
    return rows


def workers(args) -> dict:
    """SparseGPT 50% on the real model with 1 and 2 workers (same calibration, same output), each run
    a fresh `scalesparse prune` process, worker counts interleaved for `--rounds` rounds; medians and
    every sample are reported.

    One core per worker in both cases (OMP_NUM_THREADS=1; each Ray worker reserves 1 CPU): adding a
    worker adds a core, as on a cluster. Ray is started once, before the clock, and the 2-worker runs
    join it with --address, as they would join a cluster's Ray; its start-up on this machine is timed
    separately. Wall time: the command end to end (interpreter, imports, model load, the workers'
    start, pruning, saving), as a user sees it.
    """
    import subprocess

    import ray

    from scalesparse import launch
    from scalesparse.assets import fetch_model

    model = fetch_model("smollm2-135m")
    t0 = time.perf_counter()
    launch.init_ray(num_cpus=os.cpu_count())
    ray_start = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    samples: dict[int, list[dict]] = {n: [] for n in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for n in args.workers:
                out = f"{tmp}/w{n}-{k}"
                cmd = [sys.executable, "-m", "scalesparse", "prune", "--model", str(model), "--method", "sparsegpt",
                       "--sparsity", "0.5", "--out", out, "--workers", str(n), "--set", "eval.tokens=0",
                       "--set", f"calibration.samples={args.samples}"]  # fmt: skip
                if n > 1:
                    cmd += ["--address", address]
                t0 = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                r = json.loads(Path(out, "report.json").read_text())
                row = {"prune_seconds": r["prune_seconds"], "wall_seconds": wall,
                       "rank0_phase_seconds": r["phase_seconds"]}  # fmt: skip
                samples[n].append(row)
                phases = ", ".join(f"{p} {v:.1f}" for p, v in r["phase_seconds"].items())
                print(f"round {k}, {n} worker(s): pruning {row['prune_seconds']:.1f} s ({phases}), wall {wall:.1f} s",
                      flush=True)  # fmt: skip
    launch.shutdown_ray()
    rows = {n: {"prune_seconds": statistics.median(s["prune_seconds"] for s in ss),
                "wall_seconds": statistics.median(s["wall_seconds"] for s in ss), "threads_per_worker": 1,
                "samples": ss} for n, ss in samples.items()}  # fmt: skip
    base = rows[args.workers[0]]
    for n, row in rows.items():
        row["prune_ratio"] = row["prune_seconds"] / base["prune_seconds"]
        row["wall_ratio"] = row["wall_seconds"] / base["wall_seconds"]
        print(f"{n} worker(s): median pruning {row['prune_seconds']:.1f} s ({row['prune_ratio']:.2f}×), "
              f"wall {row['wall_seconds']:.1f} s ({row['wall_ratio']:.2f}×)", flush=True)  # fmt: skip
    return {"calibration_samples": args.samples, "ray_start_seconds": ray_start, "rounds": args.rounds,
            "by_workers": rows}  # fmt: skip


def scaling(args) -> list[dict]:
    from torch import nn

    from scalesparse.pruning import PRUNERS

    rows = []
    for d in args.widths:
        torch.manual_seed(0)
        layer = nn.Linear(d, d, bias=False)
        x = torch.randn(args.tokens, d)
        p = PRUNERS.get("sparsegpt")(layer)
        t0 = time.perf_counter()
        for chunk in x.split(512):
            p.add_batch(chunk)
        t1 = time.perf_counter()
        p.prune(0.5)
        t2 = time.perf_counter()
        rows.append({"d": d, "tokens": args.tokens, "hessian_s": t1 - t0, "solve_s": t2 - t1})
        print(f"d={d:>5}: Hessian {t1 - t0:.3f} s, solve {t2 - t1:.3f} s", flush=True)
    for a, b in zip(rows, rows[1:]):
        r = b["d"] / a["d"]
        b["hessian_growth_vs_prev"] = b["hessian_s"] / a["hessian_s"]
        b["solve_growth_vs_prev"] = b["solve_s"] / a["solve_s"]
        b["expected_growth"] = {"hessian (n·d²)": r**2, "solve (d³)": r**3}
    return rows


LLAMA_SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "samples": 128, "seq": 2048},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "samples": 8, "seq": 128},
}
TARGET_S_PER_BLOCK = {"sparsegpt": 4.0, "wanda": 1.0, "magnitude": 0.5}


def llama_blocks(args, write=lambda rows: None) -> dict:
    """Seconds per block of each method on a LLaMA-shaped model with random weights, on args.device;
    `write(result so far)` after each method."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalesparse.pruning.calibrate import prune_model

    shape = LLAMA_SHAPES[args.llama_shape]
    cuda = args.device.startswith("cuda")
    heads = shape["num_attention_heads"]
    cfg = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=args.blocks,
                      vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (1, shape["seq"]), generator=g) for _ in range(shape["samples"])]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    rows = {}
    result = {"shape": {**shape, "blocks": args.blocks}, "calibration_tokens": shape["samples"] * shape["seq"],
              "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
              "tf32": args.tf32 if cuda else None, "layer_error": False, "methods": rows}  # fmt: skip
    for method in args.methods:
        for nm in (None, (2, 4)) if method == "sparsegpt" else (None,):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype).eval()  # a fresh model per method: each prunes the same weights
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            report = prune_model(model, batches, method, 0.5, nm=nm, device=args.device, progress=False,
                                 layer_error=False)  # fmt: skip
            label = method + (" 2:4" if nm else "")
            per_block = report.block_seconds
            errors = [r.rel_error for r in report.layers if r.rel_error is not None]
            warm = per_block[1:] or per_block  # the first block pays CUDA's lazy kernel and library loading
            row = {"seconds_per_block": statistics.median(warm), "block_seconds": per_block,
                   "phase_seconds": report.phases, "total_seconds": report.seconds,
                   "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                   "mean_rel_error": statistics.mean(errors) if errors else "not computed (layer_error off)",
                   "target_seconds_per_block": TARGET_S_PER_BLOCK.get(method)}  # fmt: skip
            rows[label] = row
            target = f"(target ≤ {row['target_seconds_per_block']} s on an H100/H200)" if cuda else ""
            mem = f", peak {row['peak_gpu_mb']:,.0f} MiB" if cuda else ""
            print(f"{label:>14}: {row['seconds_per_block']:.2f} s per block{mem} {target}", flush=True)
            del model
            write(result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calibration", type=int, nargs=2, default=[16, 256], metavar=("SAMPLES", "SEQ_LEN"),
                    help="calibration of the real-model part (the prune config's default: 16 × 256)")
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"], help="real-model part")
    ap.add_argument("--layer-error", nargs="+", default=["false"], choices=["false", "true"],
                    help="prune.layer_error settings to time for Wanda and magnitude (SparseGPT's report is free)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the real-model runs (medians)")
    ap.add_argument("--skip-scaling", action="store_true", help="leave out SparseGPT's cost against layer width")
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens for the scaling sweep")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--workers", type=int, nargs="*", default=[], help="e.g. 1 2: time SparseGPT on that many workers")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the worker comparison")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of 256 tokens (workers part)")
    ap.add_argument("--only-workers", action="store_true", help="run just the worker comparison")
    ap.add_argument("--device", default="cpu", help="cuda: only the LLaMA-7B-shaped per-block timing")
    ap.add_argument("--llama-shape", default="7b", choices=list(LLAMA_SHAPES))
    ap.add_argument("--blocks", type=int, default=4, help="decoder blocks of the LLaMA-shaped model (the first, "
                    "a warm-up, is left out of seconds_per_block)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="the LLaMA-shaped model's")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false", help="full fp32 matmuls on the GPU")
    ap.add_argument("--out", help="default benchmarks/results/prune.json (prune_cuda.json with --device cuda)")
    args = ap.parse_args()
    args.layer_error = [x == "true" for x in args.layer_error]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device.startswith("cuda") or args.llama_shape != "7b":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("prune.py: --device cuda but torch sees no CUDA device")
        out_path = Path(args.out or REPO / "benchmarks/results/prune_cuda.json")
        head = {"benchmark": "prune_llama_blocks", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}

        def write(result: dict) -> None:
            out_path.write_text(json.dumps({**head, **result}, indent=1))

        write(llama_blocks(args, write))
        print(f"wrote {out_path}")
        return
    out_path = Path(args.out or REPO / "benchmarks/results/prune.json")
    if args.only_workers:  # add to an existing result file
        out = json.loads(out_path.read_text()) if out_path.is_file() else {"benchmark": "prune"}
        key = "workers" if args.samples == ap.get_default("samples") else f"workers_samples{args.samples}"
        out[key] = workers(args)
        out_path.write_text(json.dumps(out, indent=1))
        print(f"wrote {out_path}")
        return
    out = {"benchmark": "prune", "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
           "command": " ".join(["benchmarks/prune.py", *sys.argv[1:]]),
           "machine": {"name": f"{os.cpu_count()}-core CPU", "cpus": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__},
           "real_model": [] if args.skip_real else real_model(args),
           "sparsegpt_scaling": None if args.skip_scaling else scaling(args),
           "workers": workers(args) if args.workers else None}  # fmt: skip
    out_path.write_text(json.dumps(out, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
