"""Tokens/s of configs/tiny.yaml with 1 vs 2 Ray/DeepSpeed workers, measured side by side.

Configurations are interleaved over several rounds inside one process and one Ray instance, so
machine noise hits them alike; the ratio is what counts on a CPU (absolute numbers only on a GPU).
Throughput is read from each run's metrics.jsonl, skipping the first logging interval (start-up).

    .venv/bin/python benchmarks/trunk_throughput.py [--steps 60] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "1 worker x 1 CPU": {"parallel.workers": 1, "resources.cpus_per_worker": 1},
    "1 worker x 2 CPUs": {"parallel.workers": 1, "resources.cpus_per_worker": 2},
    "2 workers x 1 CPU": {"parallel.workers": 2, "resources.cpus_per_worker": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=str(REPO / "configs/tiny.yaml"))
    ap.add_argument("--data-path", default=None, help="local corpus tarball (default: the config's)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/trunk_throughput.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scalesparse import launch
    from scalesparse.config import load_config
    from scalesparse.train.driver import run_training
    from scalesparse.train.metrics import read_metrics

    launch.init_ray(num_cpus=os.cpu_count())
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, sets in VARIANTS.items():
                overrides = [f"{k}={v}" for k, v in sets.items()] + [
                    f"train.steps={args.steps}", "train.eval_every=0", "checkpoint.every=0",
                    "logging.log_every=10", "logging.progress=false", "logging.tensorboard=false",
                    f"run_dir={tmp}/r{r}-{name.replace(' ', '_')}",
                ]  # fmt: skip
                if args.data_path:
                    overrides.append(f"data.path={args.data_path}")
                cfg = load_config(args.config, overrides)
                t0 = time.perf_counter()
                run_training(cfg)
                records = [x for x in read_metrics(cfg.run_path) if "tokens_per_s" in x][1:]
                tps = statistics.mean(x["tokens_per_s"] for x in records)
                results[name].append(tps)
                print(f"round {r}: {name}: {tps:,.0f} tokens/s ({time.perf_counter() - t0:.0f} s with start-up)")
    launch.shutdown_ray()

    base = statistics.mean(results["1 worker x 1 CPU"])
    summary = {
        name: {"tokens_per_s": statistics.mean(v), "runs": v, "ratio_vs_1x1": statistics.mean(v) / base}
        for name, v in results.items()
    }
    out = {
        "benchmark": "trunk_throughput",
        "config": Path(args.config).name,
        "steps": args.steps,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%d"),
        "results": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\nvariant               tokens/s   ratio vs 1 worker x 1 CPU")
    for name, s in summary.items():
        print(f"{name:<20} {s['tokens_per_s']:>9,.0f}   {s['ratio_vs_1x1']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
