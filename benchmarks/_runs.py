"""Shared by the comparison benchmarks: run config variants over seeds, interleaved, on one Ray."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("final_val_loss", "final_val_ppl", "tokens_per_s", "params", "params_active", "flops_per_token_train", "wall_s")


def run_variants(variants: dict[str, tuple[str, list[str]]], seeds: list[int], extra: list[str]) -> dict[str, list]:
    """variants: label → (config path relative to the repo, overrides). Seeds outermost, so a cut-short
    run still has every variant at the seeds done so far."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from scalesparse import launch
    from scalesparse.config import load_config
    from scalesparse.train.driver import run_training

    launch.init_ray(num_cpus=os.cpu_count())
    out: dict[str, list] = {label: [] for label in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for label, (path, sets) in variants.items():
                run_dir = f"{tmp}/{label.replace(' ', '_').replace('/', '_')}-s{seed}"
                overrides = [*sets, *extra, f"seed={seed}", f"run_dir={run_dir}", "checkpoint.every=0",
                             "logging.progress=false"]  # fmt: skip
                s = run_training(load_config(REPO / path, overrides))
                out[label].append({k: s[k] for k in KEYS})
                print(f"seed {seed} {label}: val loss {s['final_val_loss']:.4f}, {s['tokens_per_s']:,.0f} tok/s",
                      flush=True)
    launch.shutdown_ray()
    return out


def aggregate(rows: list[dict]) -> dict:
    from scalesparse.sweep import mean_std  # the same statistics as `scalesparse sweep`

    def stat(key):
        return mean_std([r[key] for r in rows])

    return {"val_loss": stat("final_val_loss"), "val_ppl": stat("final_val_ppl"), "tokens_per_s": stat("tokens_per_s"),
            "params": rows[0]["params"], "params_active": rows[0]["params_active"],
            "train_flops_per_token": rows[0]["flops_per_token_train"], "runs": rows}  # fmt: skip


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def print_table(summary: dict, extra_cols: dict[str, dict[str, str]] | None = None) -> None:
    print(f"\n{'variant':<30} {'val loss (mean ± std, n)':>28} {'val ppl':>8} {'params':>8} {'active':>8} {'tok/s':>8}")
    for label, s in summary.items():
        v = s["val_loss"]
        extra = "  " + "  ".join(c.get(label, "") for c in (extra_cols or {}).values())
        print(f"{label:<30} {v['mean']:>14.4f} ± {v['std']:.4f} (n={v['n']}) {s['val_ppl']['mean']:>8.1f} "
              f"{s['params'] / 1e6:>7.2f}M {s['params_active'] / 1e6:>7.2f}M {s['tokens_per_s']['mean']:>8,.0f}{extra}")
        if v["n"] < 3:
            print(f"  warning: {label} has {v['n']} seed(s); a fair comparison wants at least 3")
