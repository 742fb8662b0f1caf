"""Figures of a sweep, from its runs' metrics.jsonl and the aggregated results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from scalesparse.train.metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")  # long rotated layer names stay inside the picture
    _plt().close(fig)
    return out


def _by_step(run_dirs: list[str], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps seen in every seed, with the mean and std over seeds of `key`."""
    series = [{r["step"]: r[key] for r in read_metrics(Path(d)) if key in r} for d in run_dirs]
    series = [s for s in series if s]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    mean = [statistics.mean(s[t] for s in series) for t in steps]
    std = [statistics.stdev(s[t] for s in series) if len(series) > 1 else 0.0 for t in steps]
    return steps, mean, std


def loss_curves(results: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    for label, p in results["points"].items():
        for ax, key in ((a, "loss"), (b, "val_loss")):
            steps, mean, std = _by_step(p["run_dirs"], key)
            if not steps:
                continue
            line = ax.plot(steps, mean, "o-" if len(steps) < 20 else "-", ms=3, lw=1.2,
                           label=f"{label} (n={p['val_loss']['n']})")[0]  # fmt: skip
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
    for ax, title in ((a, "training loss (mean ± std over seeds)"), (b, "validation loss (mean ± std over seeds)")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    return _save(fig, out)


def metric_vs_sparsity(results: dict[str, Any], out: Path, key: str, ylabel: str, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, p in results["points"].items():
        stat = p[key]
        if stat["n"]:
            ax.errorbar([p["sparsity"]], [stat["mean"]], yerr=[stat["std"]], fmt="o", capsize=4,
                        label=f"{label} (n={stat['n']})")  # fmt: skip
    ax.set_xlabel("sparsity of the sparsified layers (0 = dense)")
    ax.yaxis.set_major_formatter(_plt().FuncFormatter(lambda v, _: f"{v:,.6g}"))  # 11,420, not 1.142e+04
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def ppl_by_point(results: dict[str, Any], out: Path) -> Path | None:
    """Held-out perplexity of every point (mean ± std over seeds), coloured by when it is sparse (the
    position's first part): for sweeps that compare pruning with training, else None."""
    if not any(p.get("prune") for p in results["points"].values()):
        return None
    plt = _plt()
    shown = {label: p for label, p in results["points"].items() if p["val_ppl"]["n"]}
    when = {label: p["position"].split(",")[0] for label, p in shown.items()}
    colours = {w: f"C{i}" for i, w in enumerate(dict.fromkeys(when.values()))}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.2), dpi=110)
    for i, (label, p) in enumerate(shown.items()):
        ax.barh(i, p["val_ppl"]["mean"], xerr=p["val_ppl"]["std"], color=colours[when[label]], capsize=3)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=w) for w, c in colours.items()], fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.09), ncol=len(colours))  # below the axes: bars reach both sides
    ax.set_yticks(range(len(shown)), list(shown), fontsize=7)
    ax.invert_yaxis()
    values = [p["val_ppl"]["mean"] for p in shown.values()]
    wide = max(values) > 10 * min(values)  # one-shot 2:4 can be 30× the dense model: a log axis then
    if wide:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.set_xlabel(f"held-out perplexity ({'log scale; ' if wide else ''}mean ± std over seeds)")
    ax.set_title("held-out perplexity per point")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out)


def _dst_points(results: dict[str, Any]) -> dict[str, list[str]]:
    return {label: p["run_dirs"] for label, p in results["points"].items()
            if p["run_dirs"] and any("mask_hash" in r for r in read_metrics(Path(p["run_dirs"][0])))}  # fmt: skip


def layer_sparsity(results: dict[str, Any], out: Path) -> Path | None:
    points = _dst_points(results)
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    width = 0.8 / len(points)
    names: list[str] = []
    for i, (label, dirs) in enumerate(points.items()):
        last = [r for r in read_metrics(Path(dirs[0])) if "layer_sparsity" in r][-1]["layer_sparsity"]
        names = [n.removeprefix("layer/") for n in last]
        ax.bar([j + i * width for j in range(len(names))], list(last.values()), width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("final sparsity")
    ax.set_title("per-layer sparsity at the end of training (first seed)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def dst_dynamics(results: dict[str, Any], out: Path) -> Path | None:
    points = _dst_points(results)
    if not points:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    for label, dirs in points.items():
        steps, mean, std = _by_step(dirs, "dst_churn")
        if steps:
            a.errorbar(steps, mean, yerr=std, fmt="o-", ms=3, capsize=2, label=label)
        steps, mean, _ = _by_step(dirs, "itop")
        if steps:
            b.plot(steps, mean, "o-", ms=3, label=label)
    a.set_title("mask churn per update (fraction of masked weights)")
    b.set_title("in-time over-parameterization (fraction of weights ever active)")
    for ax in (a, b):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (no churn yet: static masks, or runs shorter than ΔT)
            ax.legend(fontsize=7)
    b.set_ylim(0, 1)
    return _save(fig, out)


def expert_load(results: dict[str, Any], out_dir: Path) -> list[Path]:
    from scalesparse.report.curves import plot_expert_load

    outs = []
    for label, p in results["points"].items():
        if not p["run_dirs"]:
            continue
        made = plot_expert_load(Path(p["run_dirs"][0]))
        if made is not None:
            target = out_dir / f"expert_load_{label}.png"
            target.write_bytes(made.read_bytes())
            outs.append(target)
    return outs
