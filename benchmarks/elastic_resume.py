"""What resuming costs when the worker count changes: a ~60M-parameter GPT (configs/tiny.yaml made
wide: d_model 768, 8 layers) checkpointed by 2 workers and by 1 worker (ZeRO-2), then resumed
2 → 1 and 1 → 2 (the layout-free shards, train/elastic.py) beside 2 → 2 and 1 → 1 (DeepSpeed's own
loader), in one Ray instance, interleaved over rounds.

Per resume, from the run's own metrics.jsonl record: seconds to load the checkpoint (slowest rank)
and the peak resident memory of a worker process up to the end of the load (build, DeepSpeed init
and load; the largest over ranks); plus the checkpoint's size on disk, DeepSpeed's files and
scalesparse's layout-free shards separately. Ratios compare the same new layout loaded two ways
(2 -> 1 against 1 -> 1, 1 -> 2 against 2 -> 2), within a round.

    .venv/bin/python benchmarks/elastic_resume.py [--rounds 2] [--out FILE]
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
SHAPE = ["model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.seq_len=128"]
COMMON = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=1", "train.eval_every=0",
          "data.val_blocks=2", "logging.progress=false", "logging.tensorboard=false", "parallel.zero_stage=2",
          "checkpoint.keep=1"]  # fmt: skip
RESUMES = {"2 -> 2 (DeepSpeed)": (2, 2), "2 -> 1 (reshaped)": (2, 1), "1 -> 1 (DeepSpeed)": (1, 1),
           "1 -> 2 (reshaped)": (1, 2)}  # fmt: skip


def sizes(folder: Path) -> dict[str, float]:
    files = [p for p in folder.iterdir() if p.is_file()]
    mib = 2**20
    return {"deepspeed_mib": sum(p.stat().st_size for p in files if p.suffix == ".pt") / mib,
            "layout_free_mib": sum(p.stat().st_size for p in files if p.name.startswith("state_rank")) / mib,
            "total_mib": sum(p.stat().st_size for p in files) / mib}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-path", default=None, help="local corpus tarball")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/elastic_resume.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scalesparse import launch
    from scalesparse.config import load_config
    from scalesparse.train import checkpoint as ckpt
    from scalesparse.train.driver import run_training
    from scalesparse.train.metrics import read_metrics

    data = [f"data.path={args.data_path}"] if args.data_path else []
    launch.init_ray(num_cpus=os.cpu_count())
    rows: dict[str, list[dict]] = {label: [] for label in RESUMES}
    params = None
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for workers in (2, 1):  # one step, checkpointed
            run_dir = f"{tmp}/source-w{workers}"
            s = run_training(load_config(REPO / "configs/tiny.yaml", [*SHAPE, *COMMON, *data, "train.steps=1",
                                         "checkpoint.every=1", f"parallel.workers={workers}", f"run_dir={run_dir}"]))
            params = s["params"]
            sources[workers] = Path(run_dir) / "checkpoints" / ckpt.tag_for(1)
        for r in range(args.rounds):
            for label, (before, after) in RESUMES.items():
                run_dir = f"{tmp}/r{r}-{before}to{after}"
                t0 = time.perf_counter()
                sets = [*SHAPE, *COMMON, *data, "train.steps=2", "checkpoint.every=0", f"parallel.workers={after}",
                        f"run_dir={run_dir}"]  # fmt: skip
                run_training(load_config(REPO / "configs/tiny.yaml", sets), resume=str(sources[before]))
                record = next(x for x in read_metrics(Path(run_dir)) if "resume_s" in x)
                row = {"load_s": record["resume_s"], "peak_mb": record["resume_peak_mb"],
                       "reshaped": record["resume_reshaped"], "run_wall_s": time.perf_counter() - t0}  # fmt: skip
                rows[label].append(row)
                print(f"round {r} {label}: load {row['load_s']:.2f} s, peak {row['peak_mb']:,.0f} MB", flush=True)
        disk = {w: sizes(folder) for w, folder in sources.items()}
    launch.shutdown_ray()

    summary = {label: {"load_s_median": statistics.median(x["load_s"] for x in v),
                       "peak_mb_median": statistics.median(x["peak_mb"] for x in v), "runs": v}
               for label, v in rows.items()}  # fmt: skip
    # the same new layout loaded two ways: what reshaping costs over DeepSpeed's own loader
    for a, b in (("2 -> 1 (reshaped)", "1 -> 1 (DeepSpeed)"), ("1 -> 2 (reshaped)", "2 -> 2 (DeepSpeed)")):
        summary[a]["load_ratio_to_" + b] = statistics.median(
            x["load_s"] / y["load_s"] for x, y in zip(rows[a], rows[b]))
        summary[a]["peak_ratio_to_" + b] = statistics.median(
            x["peak_mb"] / y["peak_mb"] for x, y in zip(rows[a], rows[b]))
    print(f"\n{params / 1e6:.1f}M parameters; checkpoint on disk (MiB): "
          + "; ".join(f"{w} worker(s): DeepSpeed {d['deepspeed_mib']:.0f}, layout-free {d['layout_free_mib']:.0f}"
                      for w, d in disk.items()))  # fmt: skip
    print(f"{'resume':<22} {'load s (median)':>16} {'peak MB (median)':>17}   ratios to the same layout's own load")
    for label, s in summary.items():
        ratios = "  ".join(f"{k.split('_to_')[0].split('_')[0]} {v:.2f}x" for k, v in s.items() if "_ratio_to_" in k)
        print(f"{label:<22} {s['load_s_median']:>16.2f} {s['peak_mb_median']:>17,.0f}   {ratios}")
    result = {"benchmark": "elastic_resume", "params": params, "rounds": args.rounds, "disk": disk,
              "summary": summary, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "date": time.strftime("%Y-%m-%d")}}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
