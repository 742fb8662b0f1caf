"""Loading a pretrained folder into the trainer's workers: seconds and peak resident memory per worker
on 2 workers under ZeRO-3 (born partitioned, each reading only its partitions) and ZeRO-2 (every
worker a whole copy, by design), beside transformers' own `from_pretrained` in one process.

Models: SmolLM2-135M (`scalesparse assets fetch smollm2-135m`) and a random ~1.1B-parameter Llama
(TinyLlama's shape, fp32, written once as safetensors shards with an index under --cache). Each
measurement is a fresh process (its peak, VmHWM, is its own); a worker's load is building the model and
copying the weights in (`loop.build_model` + `load_pretrained`), timed in the worker, the slower rank
counted; each side starts with the shards in the page cache. The fixed overhead of a process
(torch, DeepSpeed, the process group) is measured the same
way on an empty model (one layer of width 16): memory targets are net of it.

Targets (issue 22): ZeRO-3 peak per worker ≤ 0.6 × the model's fp32 size + the overhead; load time
≤ 1.5 × transformers'. Timings on this shared machine move by 20–30% between runs: `--rounds N`
interleaves the sides N times and keeps each one's fastest (every round is in the JSON).

    .venv/bin/python benchmarks/load_pretrained.py                     # SmolLM2 and the 1.1B Llama
    .venv/bin/python benchmarks/load_pretrained.py --models smollm2    # SmolLM2 only (a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0}  # fmt: skip
EMPTY = {**LLAMA_1B, "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
SHARD_BYTES = 2 << 30


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    child started by a parent that once held 4 GB would report 4 GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_random_llama(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A random Llama folder as transformers writes one (config.json, shards, index), built one shard at
    a time without transformers (initialising 1.1B parameters through it takes minutes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    d, ff, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    hd = d // shape["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": (shape["vocab_size"], d), "model.norm.weight": (d,),
               "lm_head.weight": (shape["vocab_size"], d)}  # fmt: skip
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                        p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                        p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, d),
                        p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                        p + "mlp.down_proj.weight": (d, ff)})  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, s in tensors.items():
        current[name] = torch.ones(s) if "norm" in name else torch.randn(s, generator=g) * 0.02
        size += current[name].numel() * 4
        if size >= SHARD_BYTES or name == list(tensors)[-1]:
            shards.append(current)
            save_file(current, str(tmp / f"part{len(shards)}.safetensors"), metadata={"format": "pt"})
            current, size = {}, 0
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"part{i}.safetensors", tmp / final)
        weight_map.update({name: final for name in shard})
    total = sum(math.prod(s) * 4 for s in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))  # fmt: skip
    LlamaConfig(**shape).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------- measured in fresh processes
def _worker(rank: int, port: int, folder: str, stage: int, out: str) -> None:
    import torch

    from scalesparse import comm
    from scalesparse.config import config_from_dict
    from scalesparse.model.pretrained import load_pretrained, resolve_pretrained
    from scalesparse.train.engine import partitions, select_accelerator
    from scalesparse.train.loop import build_model, loads_partitioned

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))  # fmt: skip
    cfg = resolve_pretrained(config_from_dict({
        "model": {"from_pretrained": folder, "seq_len": 256}, "train": {"global_batch_size": 2, "micro_batch_size": 1},
        "parallel": {"workers": WORLD, "zero_stage": stage}}))  # fmt: skip
    select_accelerator(cfg)
    comm.init_group("gloo", rank, WORLD, "127.0.0.1", port)
    import deepspeed  # noqa: F401  (its import is fixed overhead, not loading)

    before = peak_mb()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, cfg.model.vocab_size, WORLD)
    read = load_pretrained(model, folder, seed=cfg.seed, partitions=partitions(model))
    seconds = time.perf_counter() - t0
    comm.barrier()
    row = {"seconds": seconds, "peak_mb": peak_mb(), "peak_before_mb": before, "read_bytes": read,
           "partitioned": loads_partitioned(cfg), "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                                for p in model.parameters())}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    comm.close_group()


def measure_ours(folder: str, stage: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, folder, stage, out), nprocs=WORLD, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"seconds": max(r["seconds"] for r in ranks), "peak_mb": max(r["peak_mb"] for r in ranks), "ranks": ranks}


def measure_hf(folder: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(WORLD)
    before = peak_mb()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lazy = time.perf_counter() - t0
    lazy_peak = peak_mb()
    # its weights may still be pages of the memory-mapped files, read at first use: touch one element
    # per 4 KiB page, so that what is timed and measured is a model in memory, as the workers' are
    with torch.no_grad():
        for p in model.parameters():
            p.view(-1)[:: 4096 // p.element_size()].sum()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": peak_mb(), "peak_before_mb": before, "untouched_seconds": lazy,
            "untouched_peak_mb": lazy_peak, "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def warm(folder: Path) -> None:
    """Read every shard once, so each side starts from the page cache (not the disk) alike."""
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def in_fresh_process(side: str, folder: Path, stage: int = 0) -> dict:
    warm(folder)
    cmd = [sys.executable, __file__, "--measure", side, "--folder", str(folder), "--stage", str(stage)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the comparison
SIDES = {"zero3": ("ours", 3), "zero2": ("ours", 2), "transformers": ("hf", 0)}


def compare(label: str, folder: Path, empty: Path, rounds: int) -> dict:
    fp32_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20  # headers: < 0.01%
    overhead = {side: in_fresh_process(kind, empty, stage)["peak_mb"] for side, (kind, stage) in SIDES.items()}
    runs = {side: [] for side in SIDES}
    for r in range(rounds):
        for side, (kind, stage) in SIDES.items():
            runs[side].append(in_fresh_process(kind, folder, stage))
            print(f"{label} round {r + 1} {side}: {runs[side][-1]['seconds']:.1f} s, "
                  f"peak {runs[side][-1]['peak_mb']:,.0f} MB", flush=True)  # fmt: skip
    best = {side: min(rows, key=lambda x: x["seconds"]) for side, rows in runs.items()}
    hf_s = best["transformers"]["seconds"]
    out = {"model_fp32_mb": fp32_mb, "params": best["transformers"]["params"], "overhead_mb": overhead,
           "rounds": runs}  # fmt: skip
    for side in SIDES:
        peak = max(r["peak_mb"] for r in runs[side])  # memory: the worst round
        out[side] = {"seconds": best[side]["seconds"], "peak_mb": peak,
                     "net_peak_over_fp32": (peak - overhead[side]) / fp32_mb,
                     "seconds_over_transformers": best[side]["seconds"] / hf_s}  # fmt: skip
    z3 = out["zero3"]
    out["targets"] = {"zero3_net_peak_le_0.6_fp32": z3["net_peak_over_fp32"] <= 0.6,
                      "zero3_time_le_1.5_transformers": z3["seconds_over_transformers"] <= 1.5}  # fmt: skip
    print(f"\n{label}: fp32 {fp32_mb:,.0f} MB, {out['params'] / 1e6:,.0f} M parameters")
    print(f"{'side':<14} {'seconds':>8} {'× hf':>6} {'peak MB':>9} {'overhead':>9} {'net / fp32':>11}")
    for side in SIDES:
        s = out[side]
        print(f"{side:<14} {s['seconds']:>8.1f} {s['seconds_over_transformers']:>6.2f} {s['peak_mb']:>9,.0f} "
              f"{overhead[side]:>9,.0f} {s['net_peak_over_fp32']:>11.2f}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=["smollm2", "llama-1b"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cache", default="~/.cache/scalesparse/bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load_pretrained.json"))
    ap.add_argument("--measure", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        row = measure_ours(args.folder, args.stage) if args.measure == "ours" else measure_hf(args.folder)
        print(json.dumps(row))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks._runs import machine
    from scalesparse.assets import fetch_model

    cache = Path(args.cache).expanduser()
    empty = write_random_llama(cache / "random-llama-empty", EMPTY)
    folders = {"smollm2": lambda: fetch_model("smollm2-135m"),
               "llama-1b": lambda: write_random_llama(cache / "random-llama-1.1b", LLAMA_1B)}  # fmt: skip
    results = {"machine": machine(), "world": WORLD, "rounds": args.rounds,
               "models": {m: compare(m, folders[m](), empty, args.rounds) for m in args.models}}  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
