"""Sparse training methods at 90% sparsity on Shakespeare, equal token budget, over seeds.

Every variant is configs/dst-rigl.yaml with only the method changed (and, for small-dense, the width):
dense, small-dense (dense at the sparse model's non-embedding parameter count), static, SET, RigL, GMP.

    .venv/bin/python benchmarks/dst_quality.py [--seeds 0 1 2] [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import REPO, aggregate, machine, print_table, run_variants

BASE = "configs/dst-rigl.yaml"
# Nonzero non-embedding parameters of the sparse model at 90%: 80.3k kept mask entries + 1.2k norm
# weights = 81.4k. The closest dense width with an even rotary head dimension is 40: 87.4k (+7%).
# (Embeddings are not counted, as usual in such comparisons.)
VARIANTS = {
    "dense": (BASE, ["sparsity.method=none"]),
    "small-dense (same nonzeros)": (BASE, ["sparsity.method=none", "model.d_model=40", "model.n_heads=4"]),
    "static": (BASE, ["sparsity.method=static"]),
    "set": (BASE, ["sparsity.method=set"]),
    "rigl": (BASE, ["sparsity.method=rigl"]),
    "gmp": (BASE, ["sparsity.method=gmp"]),
}
POSITION = {
    "dense": "-",
    "small-dense (same nonzeros)": "-",
    "static": "before training, sparse-to-sparse, static",
    "set": "during training, sparse-to-sparse, dynamic",
    "rigl": "during training, sparse-to-sparse, dynamic",
    "gmp": "during training, dense-to-sparse, dynamic",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/dst_quality.json"))
    args = ap.parse_args()
    extra = [f"train.steps={args.steps}"] if args.steps else []
    runs = run_variants(VARIANTS, args.seeds, extra)
    summary = {label: {**aggregate(rows), "position": POSITION[label]} for label, rows in runs.items()}
    Path(args.out).write_text(json.dumps({"benchmark": "dst_quality", "sparsity": 0.9, "seeds": args.seeds,
                                          "machine": machine(), "results": summary}, indent=1))  # fmt: skip
    print_table(summary, {"position": POSITION})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
