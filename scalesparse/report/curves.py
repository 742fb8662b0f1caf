"""Loss curves of one run, from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from scalesparse.train.metrics import read_metrics


def plot_loss_curve(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_expert_load(run_dir: Path) -> Path | None:
    """Heat map per MoE layer: fraction of token assignments each expert received, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in read_metrics(run_dir) if "expert_load" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    load = np.array([r["expert_load"] for r in records])  # (logs, layers, experts)
    n_layers, n_experts = load.shape[1], load.shape[2]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.3 * n_layers), dpi=110, squeeze=False, sharex=True)
    # one column per log step; a single log step still gets a width (matplotlib warns on a zero-wide image)
    left, right = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(load[:, i, :].T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / n_experts, load.max()),
                       extent=(left, right, n_experts - 0.5, -0.5), interpolation="nearest")  # fmt: skip
        ax.set_ylabel(f"layer {i}\nexpert")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label=f"share of assignments (balanced = {1 / n_experts:.3f})")
    fig.suptitle(f"{Path(run_dir).name}: expert load")
    out = Path(run_dir) / "expert_load.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_sparsity(run_dir: Path) -> Path | None:
    """DST runs: global sparsity and in-time over-parameterization (fraction of weights ever active),
    mask churn per update, and the final per-layer sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "mask_hash" in r]
    if not records:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8), dpi=110)
    steps = [r["step"] for r in records]
    a.plot(steps, [r["sparsity"] for r in records], "o-", label="sparsity")
    a.plot(steps, [r["itop"] for r in records], "s-", label="ever active (ITOP)")
    a.set_xlabel("optimizer step")
    a.set_ylim(0, 1)
    a.legend()
    a.set_title("global")
    upd = [r for r in records if "dst_churn" in r]
    b.bar([r["step"] for r in upd], [r["dst_churn"] for r in upd], width=max(1, (steps[-1] - steps[0]) / 40))
    b.set_xlabel("optimizer step")
    b.set_title("mask churn per update (fraction of weights)")
    last = records[-1]["layer_sparsity"]
    names = [n.removeprefix("layer/") for n in last]
    c.barh(range(len(names)), list(last.values()))
    c.set_yticks(range(len(names)), names, fontsize=6)
    c.set_xlim(0, 1)
    c.set_title("per-layer sparsity (last)")
    fig.suptitle(f"{Path(run_dir).name}: sparsity")
    fig.tight_layout()
    out = Path(run_dir) / "sparsity.png"
    fig.savefig(out)
    plt.close(fig)
    return out
