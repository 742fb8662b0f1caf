"""Prune, then recover, compared fairly with sparse training (issue 23): the whole comparison, end to end.

own (default): pretrain configs/pretrain-small.yaml → export → sweep configs/sweeps/prune-recover.yaml
(3 seeds); smollm2: sweep configs/sweeps/prune-recover-smollm2.yaml on the cached SmolLM2-135M (1 seed,
147,456 training tokens per point). Then the ratios the issue asks for, from the sweep's results:
recovered / dense fine-tuned held-out perplexity (SparseGPT 50% ≤ 1.15×, 2:4 ≤ 1.35×) and how it moves
with the tokens seen, one-shot / untuned dense, distillation / plain recovery, GMP and RigL / dense
fine-tuned, recovery training throughput / dense (≥ 0.95×).

    .venv/bin/python benchmarks/prune_recover.py [--model own|smollm2] [--seeds 0 1 2] [--steps N]
        [--pretrain-steps N] [--val-blocks N] [--calibration-samples N] [--smoke]

Every run, prune job and the pretrained model are cached under --work (by model and budget): an
interrupted benchmark continues where it stopped. Writes benchmarks/results/prune_recover[_smollm2].json
at the files' budgets, `_small` at another, `_smoke` with --smoke (a tiny model, 4 steps: proves the
pipeline, measures nothing), plus the sweep's report.html and the markdown table beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

from _runs import REPO, machine

SWEEPS = {"own": REPO / "configs/sweeps/prune-recover.yaml",
          "smollm2": REPO / "configs/sweeps/prune-recover-smollm2.yaml"}
PRETRAIN = REPO / "configs/pretrain-small.yaml"
SHAPES = ("50", "2of4")
TARGETS = {"50": 1.15, "2of4": 1.35}  # recovered SparseGPT / dense fine-tuned, held-out perplexity
# --smoke: the smallest budget that still runs every command and every point (minutes on 2 cores)
SMOKE_MODEL = ["model.d_model=64", "model.n_layers=2", "model.seq_len=64"]
SMOKE = {"steps": 4, "pretrain_steps": 30, "val_blocks": 4, "calibration_samples": 4, "seeds": [0],
         "sweep": ["model.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4",
                   "prune.calibration.seq_len=64", "resources.cpus_per_worker=1"]}  # fmt: skip


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """Sweep overrides for the flags given: the training steps (warm-up, evaluations on the way and the
    GMP / RigL update intervals scale with them), validation blocks, calibration windows."""
    out = []
    if args.steps is not None:
        s = args.steps
        out += [f"train.steps={s}", f"train.warmup_steps={max(1, round(0.07 * s))}",
                f"train.eval_every={max(1, s // 4)}",
                f"points.gmp-50.sparsity.update_interval={max(1, s // 15)}",
                f"points.rigl-50-from-sparsegpt.sparsity.update_interval={max(1, s // 6)}"]  # fmt: skip
    if args.val_blocks is not None:
        out.append(f"data.val_blocks={args.val_blocks}")
    if args.calibration_samples is not None:
        out.append(f"prune.calibration.samples={args.calibration_samples}")
    return out


def pretrained_model(work: Path, steps: int | None, extra: list[str]) -> tuple[Path, dict]:
    """configs/pretrain-small.yaml trained and exported once (kept in `work`): the own model."""
    from scalesparse.config import load_config
    from scalesparse.export import export_checkpoint
    from scalesparse.train import checkpoint as ckpt
    from scalesparse.train.driver import run_training

    run, export = work / "pretrain", work / "export"
    overrides = [*extra, *([f"train.steps={steps}"] if steps else []), f"run_dir={run}", "logging.progress=false"]
    cfg = load_config(PRETRAIN, overrides)
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        resume = "auto" if ckpt.complete_checkpoints(run / "checkpoints") else None
        print(f"pretraining {PRETRAIN.name} ({cfg.train.steps} steps) → {run}", flush=True)
        run_training(cfg, resume=resume)
    if not (export / "scalesparse.json").is_file():
        export_checkpoint(run, export)
    s = json.loads(summary_file.read_text())
    info = {"config": str(PRETRAIN.relative_to(REPO)), "overrides": overrides, "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_len, "wall_s": s["wall_s"],
            "final_val_ppl": s["final_val_ppl"], "params": s["params"]}  # fmt: skip
    return export, info


def ppl_by_tokens(points: dict, label: str, ref: str) -> list[dict]:
    """Held-out perplexity of `label` over that of `ref` at each evaluation both made (the same steps:
    the same tokens seen), the ratio of the means over seeds."""
    from scalesparse.train.metrics import read_metrics

    def curve(p: dict) -> dict[int, float]:
        per_seed = [{r["step"]: r["val_ppl"] for r in read_metrics(Path(d)) if "val_ppl" in r} for d in p["run_dirs"]]
        steps = set.intersection(*(set(c) for c in per_seed)) if per_seed else set()
        return {t: statistics.mean(c[t] for c in per_seed) for t in sorted(steps)}

    a, b = curve(points[label]), curve(points[ref])
    per_step = points[ref]["tokens"] // max(1, max(b, default=1))
    return [{"step": t, "tokens": t * per_step, "ppl": a[t], "ref_ppl": b[t], "ratio": a[t] / b[t]}
            for t in sorted(set(a) & set(b))]  # fmt: skip


def ratios(points: dict) -> dict:
    def ppl(label: str) -> float | None:
        p = points.get(label)
        return p["val_ppl"]["mean"] if p and p["val_ppl"]["n"] else None

    def ratio(a: str, b: str) -> float | None:
        x, y = ppl(a), ppl(b)
        return x / y if x is not None and y else None

    out: dict = {}
    for shape in SHAPES:
        r: dict = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            r[f"{method}_oneshot_vs_dense_pretrained"] = ratio(f"{method}-{shape}-oneshot", "dense-pretrained")
            r[f"{method}_recovered_vs_dense_finetuned"] = ratio(f"{method}-{shape}-recovered", "dense-finetuned")
        for kind in ("logits", "squarehead"):  # < 1: distillation recovered more than plain fine-tuning
            r[f"sparsegpt_{kind}_vs_plain_recovery"] = ratio(f"sparsegpt-{shape}-recovered-{kind}",
                                                             f"sparsegpt-{shape}-recovered")  # fmt: skip
        if shape == "50":
            r["gmp_vs_dense_finetuned"] = ratio("gmp-50", "dense-finetuned")
            r["rigl_from_sparsegpt_vs_dense_finetuned"] = ratio("rigl-50-from-sparsegpt", "dense-finetuned")
        rec, dense = points.get(f"sparsegpt-{shape}-recovered"), points.get("dense-finetuned")
        if rec and dense and rec["tokens_per_s"]["n"] and dense["tokens_per_s"]["n"]:
            r["throughput_recovery_vs_dense"] = rec["tokens_per_s"]["mean"] / dense["tokens_per_s"]["mean"]
        if rec and dense and rec["run_dirs"] and dense["run_dirs"]:
            r["sparsegpt_recovered_vs_dense_finetuned_by_tokens"] = ppl_by_tokens(
                points, f"sparsegpt-{shape}-recovered", "dense-finetuned")
        main = r["sparsegpt_recovered_vs_dense_finetuned"]
        distill = [v for k, v in r.items() if k.endswith("_vs_plain_recovery") and v is not None]
        r["targets"] = {
            f"sparsegpt recovered ≤ {TARGETS[shape]}× dense fine-tuned": (None if main is None
                                                                          else main <= TARGETS[shape]),
            "distillation beats plain recovery (either kind)": min(distill) < 1 if distill else None,
            "recovery throughput ≥ 0.95× dense": (r["throughput_recovery_vs_dense"] >= 0.95
                                                   if "throughput_recovery_vs_dense" in r else None),
        }  # fmt: skip
        out[shape] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SWEEPS), default="own")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the sweep file's")
    ap.add_argument("--steps", type=int, default=None, help="training steps per point (default: the sweep file's)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="own model (default: pretrain-small.yaml's)")
    ap.add_argument("--val-blocks", type=int, default=None)
    ap.add_argument("--calibration-samples", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="the smallest budget: a tiny model, 4 steps, 1 seed")
    ap.add_argument("--work", default=str(REPO / "runs/benchmarks/prune_recover"), help="runs and caches")
    ap.add_argument("--out", default=None, help="JSON (default: benchmarks/results/prune_recover*.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pretrain_extra = ["parallel.workers=1", "parallel.zero_stage=0"] if args.smoke else []
    sweep_extra: list[str] = []
    if args.smoke:
        if args.model != "own":
            ap.error("--smoke runs the own model (a tiny one); SmolLM2 has no smaller budget than its flags")
        for key in ("steps", "pretrain_steps", "val_blocks", "calibration_samples", "seeds"):
            if getattr(args, key) is None:
                setattr(args, key, SMOKE[key])
        pretrain_extra += SMOKE_MODEL
        sweep_extra += SMOKE["sweep"]
    overrides = budget_overrides(args) + sweep_extra
    at_file_budget = not overrides and args.seeds is None and args.pretrain_steps is None
    tag = hashlib.sha256(json.dumps([args.model, overrides, args.seeds, args.pretrain_steps, pretrain_extra]).encode())
    work = Path(args.work) / f"{args.model}-{'file' if at_file_budget else tag.hexdigest()[:8]}"
    suffix = "_smoke" if args.smoke else "" if at_file_budget else "_small"
    out = Path(args.out or REPO / f"benchmarks/results/prune_recover{'_smollm2' if args.model == 'smollm2' else ''}"
               f"{suffix}.json")  # fmt: skip
    print(f"work folder {work}; results → {out}", flush=True)

    from scalesparse import launch
    from scalesparse.report.html import write_report
    from scalesparse.sweep import format_table, load_sweep, print_results, run_sweep

    t0 = time.perf_counter()
    pretrain = None
    if args.model == "own":
        model, pretrain = pretrained_model(work, args.pretrain_steps, pretrain_extra)
        overrides = [f"model.from_pretrained={model}", *overrides]
    sweep = load_sweep(SWEEPS[args.model], overrides, seeds=args.seeds, out=work / "sweep")
    try:
        results = run_sweep(sweep)  # (the embedded Ray the pretraining started, or a new one)
    finally:
        launch.shutdown_ray()
    print_results(results)
    report = write_report(sweep.out)
    table = format_table(results)
    (sweep.out / "table.md").write_text(table + "\n")
    r, steps = sweep.runs[0].config, max(x.config["train"]["steps"] for x in sweep.runs)
    budget = {"training_tokens_per_point": steps * r["train"]["global_batch_size"] * r["model"]["seq_len"],
              "steps": steps, "global_batch_size": r["train"]["global_batch_size"],
              "seq_len": r["model"]["seq_len"], "seeds": sweep.seeds, "overrides": overrides,
              "calibration": next(iter(sweep.prunes.values())).config["calibration"]}  # fmt: skip
    doc = {"benchmark": "prune_recover", "model": args.model, "sweep": str(SWEEPS[args.model].relative_to(REPO)),
           "smoke": args.smoke, "measured": not args.smoke, "budget": budget, "pretrain": pretrain,
           "machine": machine(), "wall_s": time.perf_counter() - t0, "protocol": results["protocol"],
           "wall_s_is": "this invocation's; runs, prune jobs and the pretrained model cached in the work folder by an "
                        "earlier invocation were not redone",
           "ratios": ratios(results["points"]), "failed": results["failed"], "table_markdown": table,
           "report": str(report), "results": results["points"]}  # fmt: skip
    if args.smoke:  # a tiny model after a few steps: the ratios exist to show the code computes them
        for r in doc["ratios"].values():
            r["targets"] = {target: None for target in r["targets"]}
        doc["note"] = "smoke run: proves every command and point runs; its figures measure nothing"
    out.write_text(json.dumps(doc, indent=1))
    print("\nratios (held-out perplexity; < 1 is better than the reference):")
    for shape, rs in doc["ratios"].items():
        for key, value in rs.items():
            if isinstance(value, float):
                print(f"  {shape:>4} {key:<48} {value:.3f}")
        for target, met in rs["targets"].items():
            verdict = "not judged (smoke)" if args.smoke else "n/a" if met is None else "met" if met else "NOT met"
            print(f"  {shape:>4} target: {target}: {verdict}")
    print(f"wrote {out}; report {report}; {doc['wall_s']:.0f} s in all")


if __name__ == "__main__":
    main()
