"""MoE vs dense at the same active parameters per token and the same token budget, over seeds.

configs/moe-small.yaml vs configs/moe-small-dense.yaml (identical but for the MLP), interleaved on
one Ray instance: final validation loss as mean ± std, with parameter counts and measured tokens/s.

    .venv/bin/python benchmarks/moe_quality.py [--seeds 0 1 2] [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import REPO, aggregate, machine, print_table, run_variants

VARIANTS = {
    "moe (8 experts, top-2)": ("configs/moe-small.yaml", []),
    "dense (same active params)": ("configs/moe-small-dense.yaml", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (default: the configs')")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/moe_quality.json"))
    args = ap.parse_args()
    extra = [f"train.steps={args.steps}"] if args.steps else []
    runs = run_variants(VARIANTS, args.seeds, extra)
    summary = {label: aggregate(rows) for label, rows in runs.items()}
    Path(args.out).write_text(json.dumps({"benchmark": "moe_quality", "seeds": args.seeds, "machine": machine(),
                                          "results": summary}, indent=1))  # fmt: skip
    print_table(summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
