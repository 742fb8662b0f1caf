"""`scalesparse` command line: train, export, config show.

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
    print(
        f"done in {summary['wall_s']:.0f} s: final val loss {summary['final_val_loss']:.4f}, "
        f"val ppl {summary['final_val_ppl']:.2f}, {summary['tokens_per_s']:,.0f} tokens/s | {summary['run_dir']}"
    )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from scalesparse.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, Path(args.out))
    print(f"exported {args.checkpoint} → {out}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from scalesparse.config import load_config

    sys.stdout.write(load_config(args.config, args.overrides).to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalesparse", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config on Ray + DeepSpeed workers")
    _add_config_args(p)
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue: 'auto' = latest checkpoint of the run dir; or a checkpoint/run folder")  # fmt: skip
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--summary-json", help="also write the run summary here")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="consolidate a sharded checkpoint into one safetensors model")
    p.add_argument("checkpoint", help="checkpoint folder, checkpoints root or run directory")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_export)

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
