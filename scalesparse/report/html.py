"""`scalesparse report DIR`: a self-contained HTML page (figures inlined) plus the PNG files.

DIR is a sweep directory (results.json from `scalesparse sweep`) or a single run directory.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import time
from pathlib import Path
from typing import Any

from scalesparse.errors import ScalesparseError

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:8px 0}
.warn{color:#a40}.fail{color:#c00}"""


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} ({path.name})</figcaption></figure>")  # fmt: skip


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out) + "</table>"


def _markdown_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def _page(title: str, body: list[str]) -> str:
    stamp = f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.platform()})"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>Report written {stamp}.</p>"
            + "\n".join(body) + "</body></html>")  # fmt: skip


def sweep_report(folder: Path) -> Path:
    from scalesparse.report import sweep_plots as sp
    from scalesparse.sweep import MIN_SEEDS, format_table

    results: dict[str, Any] = json.loads((folder / "results.json").read_text())
    figures = [
        (sp.ppl_by_point(results, folder / "ppl_by_point.png"), "Held-out perplexity per point, by position"),
        (sp.loss_curves(results, folder / "loss_curves.png"), "Loss curves, mean ± std band over seeds"),
        (sp.metric_vs_sparsity(results, folder / "ppl_vs_sparsity.png", "val_ppl", "validation perplexity",
                               "validation perplexity vs sparsity (mean ± std over seeds)"),
         "Validation perplexity vs sparsity per method, error bars = std over seeds"),
        (sp.metric_vs_sparsity(results, folder / "throughput_vs_sparsity.png", "tokens_per_s", "tokens/s (measured)",
                               "measured training throughput vs sparsity"), "Measured throughput vs sparsity"),
        (sp.layer_sparsity(results, folder / "layer_sparsity.png"), "Per-layer sparsity (DST runs)"),
        (sp.dst_dynamics(results, folder / "dst_dynamics.png"), "Mask churn and in-time over-parameterization"),
        *((p, f"Expert load over training: {p.stem.removeprefix('expert_load_')}")
          for p in sp.expert_load(results, folder)),
    ]  # fmt: skip
    body = ["<h2>Results</h2>", _table(_markdown_rows(format_table(results))),
            "<p>Theoretical FLOPs count only the nonzero weights; the measured throughput is what this "
            "implementation (dense kernels with masked weights) achieved. Wall time is each run's, plus the "
            "one-shot pruning job's for points that start from a pruned model.</p>"]  # fmt: skip
    if results.get("protocol"):
        body.append(f"<p>{html.escape(results['protocol'])}</p>")
    for label, p in results["points"].items():
        if 0 < p["val_loss"]["n"] < MIN_SEEDS:
            body.append(f"<p class='warn'>warning: {html.escape(label)} has {p['val_loss']['n']} seed(s); "
                        f"a fair comparison wants at least {MIN_SEEDS}.</p>")  # fmt: skip
    for f in results.get("failed", []):
        body.append(f"<p class='fail'>FAILED {html.escape(f['run_id'])}: {html.escape(f['error'])}</p>")
    body += ["<h2>Figures</h2>"] + [_figure(path, caption) for path, caption in figures if path is not None]
    out = folder / "report.html"
    out.write_text(_page(f"Sweep {results['name']}", body))
    return out


def run_report(folder: Path) -> Path:
    from scalesparse.report.curves import plot_expert_load, plot_loss_curve, plot_sparsity

    figures = [(plot_loss_curve(folder), "Training and validation loss"),
               (plot_sparsity(folder), "Sparsity, mask churn, in-time over-parameterization, per-layer sparsity"),
               (plot_expert_load(folder), "Expert load over training")]  # fmt: skip
    body = []
    summary = folder / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rows = [["quantity", "value"]] + [[k, f"{v:,.4g}" if isinstance(v, float) else str(v)] for k, v in s.items()]
        body += ["<h2>Summary</h2>", _table(rows)]
    body += ["<h2>Figures</h2>"] + [_figure(path, caption) for path, caption in figures if path is not None]
    out = folder / "report.html"
    out.write_text(_page(f"Run {folder.name}", body))
    return out


def write_report(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if (folder / "results.json").is_file():
        return sweep_report(folder)
    if (folder / "metrics.jsonl").is_file():
        return run_report(folder)
    raise ScalesparseError(f"{folder}: neither a sweep (results.json) nor a run directory (metrics.jsonl)")
