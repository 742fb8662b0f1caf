"""MoE vs dense at the same active parameters per token and the same token budget, over seeds.

Runs configs/moe-small.yaml and configs/moe-small-dense.yaml (identical but for the MLP) for each
seed, interleaved, on one Ray instance, and reports the final validation loss as mean ± std,
with parameter counts and measured tokens/s beside it.

    .venv/bin/python benchmarks/moe_quality.py [--seeds 0 1 2] [--steps 300] [--out FILE]
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
CONFIGS = {
    "moe (8 experts, top-2)": "configs/moe-small.yaml",
    "dense (same active params)": "configs/moe-small-dense.yaml",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the configs')")
    ap.add_argument("--data-path", default=None, help="local corpus tarball")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/moe_quality.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scalesparse import launch
    from scalesparse.config import load_config
    from scalesparse.train.driver import run_training

    launch.init_ray(num_cpus=os.cpu_count())
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, path in CONFIGS.items():
                sets = [f"seed={seed}", f"run_dir={tmp}/{Path(path).stem}-s{seed}", "checkpoint.every=0",
                        "logging.progress=false"]  # fmt: skip
                if args.steps:
                    sets.append(f"train.steps={args.steps}")
                if args.data_path:
                    sets.append(f"data.path={args.data_path}")
                s = run_training(load_config(REPO / path, sets))
                runs[name].append({k: s[k] for k in ("final_val_loss", "final_val_ppl", "tokens_per_s", "params",
                                                     "params_active", "flops_per_token_train", "wall_s")})
                print(f"seed {seed} {name}: val loss {s['final_val_loss']:.4f}, {s['tokens_per_s']:,.0f} tok/s")
    launch.shutdown_ray()

    def agg(key, rows):
        vals = [r[key] for r in rows]
        return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}

    summary = {
        name: {"val_loss": agg("final_val_loss", rows), "val_ppl": agg("final_val_ppl", rows),
               "tokens_per_s": agg("tokens_per_s", rows), "params": rows[0]["params"],
               "params_active": rows[0]["params_active"], "train_flops_per_token": rows[0]["flops_per_token_train"],
               "runs": rows}  # fmt: skip
        for name, rows in runs.items()
    }
    out = {"benchmark": "moe_quality", "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "wall_s": time.perf_counter() - t_start, "results": summary}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if len(args.seeds) < 3:
        print(f"warning: {len(args.seeds)} seed(s); a fair comparison wants at least 3")
    print(f"\n{'model':<28} {'val loss (mean ± std)':>22} {'params':>9} {'active':>9} {'tok/s':>9}")
    for name, s in summary.items():
        v = s["val_loss"]
        print(f"{name:<28} {v['mean']:>12.4f} ± {v['std']:.4f}   {s['params'] / 1e6:>7.2f}M "
              f"{s['params_active'] / 1e6:>7.2f}M {s['tokens_per_s']['mean']:>9,.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
