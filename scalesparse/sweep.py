"""`scalesparse sweep`: one base config, a grid of changes, several seeds, run fairly.

Every run is the base config plus the sweep's common `set:` values plus *only* the keys of its grid
point (checked, and printed, against the base); the seeds are identical across points. Runs go out
as Ray tasks, as many at once as the cluster's CPUs hold; a run with a summary.json is done and is
not redone, an interrupted one resumes from its latest checkpoint, a failed one is reported (and
the command exits non-zero), never dropped. Results: <out>/results.json (see `aggregate`).

    name: lm-90
    base: ../dst-rigl.yaml          # a train config, relative to this file (or a mapping)
    set: {train.steps: 200}         # common to every run
    grid: {sparsity.method: [static, set, rigl, gmp]}
    points: {moe: {model.mlp: moe, moe.num_experts: 10, moe.top_k: 1}}   # named extra points
    baselines: [dense, small_dense]
    seeds: [0, 1, 2]
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalesparse.config import Config, config_from_dict, read_yaml_mapping
from scalesparse.errors import ConfigError, ScalesparseError

SWEEP_KEYS = ("name", "base", "set", "grid", "points", "baselines", "seeds", "out", "max_concurrent")
BASELINES = ("dense", "small_dense")
FREE_KEYS = ("name", "run_dir", "seed", "logging.progress")  # differ per run by construction
MIN_SEEDS = 3


@dataclass(frozen=True)
class Run:
    point: str
    seed: int
    changes: dict[str, Any]
    config: dict[str, Any] = field(repr=False)

    @property
    def run_id(self) -> str:
        return f"{self.point}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])


@dataclass(frozen=True)
class Sweep:
    name: str
    out: Path
    base: dict[str, Any]
    points: dict[str, dict[str, Any]]
    seeds: list[int]
    runs: list[Run]
    max_concurrent: int | None


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    data[leaf] = value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping of key.path: value, got {type(value).__name__}")
    return value


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    spec = read_yaml_mapping(path)
    for key in spec:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: {key}: unknown sweep key{hint}; allowed keys: {', '.join(SWEEP_KEYS)}")
    name = str(spec.get("name") or path.stem)
    base = spec.get("base")
    if isinstance(base, str):
        base = read_yaml_mapping((path.parent / base).resolve())
    base = copy.deepcopy(_mapping(base, "base"))
    for key, value in _mapping(spec.get("set"), "set").items():
        set_path(base, key, value)
    base_cfg = _validated(base, "base + set")
    grid = _mapping(spec.get("grid"), "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: must be a non-empty list of values")
    points: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # label → where the user wrote it, for error messages
    for combo in itertools.product(*grid.values()) if grid else []:
        changes = dict(zip(grid, combo, strict=True))
        label = str(combo[0]) if len(grid) == 1 else ",".join(f"{k.split('.')[-1]}={v}" for k, v in changes.items())
        points[label] = changes
        origin[label] = "grid (" + ", ".join(f"{k}: {v}" for k, v in changes.items()) + ")"
    for label, changes in _mapping(spec.get("points"), "points").items():
        points[str(label)] = _mapping(changes, f"points.{label}")
    baselines = spec.get("baselines") or []
    for b in baselines:
        if b not in BASELINES:
            raise ConfigError(f"baselines: {b!r} is not one of {', '.join(BASELINES)}")
    if "dense" in baselines:
        points = {"dense": {"sparsity.method": "none"}, **points}
    if "small_dense" in baselines:
        points = {**small_dense_points(base, points), **points}
    if not points:
        raise ConfigError(f"{path}: nothing to run: give a grid, points or baselines")
    seeds = spec.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds: must be a non-empty list of integers, got {seeds!r}")
    out = Path(str(spec.get("out") or f"runs/sweeps/{name}").replace("{name}", name)).expanduser()

    runs = []
    for label, changes in points.items():
        for seed in seeds:
            data = copy.deepcopy(base)
            for key, value in changes.items():
                set_path(data, key, value)
            run_id = f"{label}-seed{seed}"
            data.update(name=f"{name}-{run_id}", seed=seed, run_dir=str(out / "runs" / run_id))
            set_path(data, "logging.progress", False)
            cfg = _validated(data, origin.get(label, f"points.{label}"))
            check_difference(base_cfg, cfg, changes, label)
            runs.append(Run(label, seed, changes, cfg.to_dict()))
    max_concurrent = spec.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ConfigError(f"max_concurrent: {max_concurrent!r} is not allowed; must be an integer >= 1")
    return Sweep(name, out, base_cfg.to_dict(), points, seeds, runs, max_concurrent)


def warn_few_seeds(sweep: Sweep) -> None:
    if len(sweep.seeds) < MIN_SEEDS:
        print(f"warning: {len(sweep.seeds)} seed(s); a fair comparison wants at least {MIN_SEEDS}", flush=True)


def _validated(data: dict[str, Any], where: str) -> Config:
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_difference(base: Config, cfg: Config, changes: dict[str, Any], label: str) -> dict[str, Any]:
    """The resolved run config may differ from the resolved base only in the point's own keys."""
    a, b = flatten(base.to_dict()), flatten(cfg.to_dict())
    diff = {k: b.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in FREE_KEYS}
    stray = sorted(set(diff) - set(changes))
    if stray:
        raise ConfigError(f"points.{label}: differs from the base in {', '.join(stray)}, which it does not declare")
    return diff


def small_dense_points(base: dict[str, Any], points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A dense model as narrow as needed to have the sparse model's nonzero non-embedding parameters
    (one per distinct sparsity in the sweep). Width moves in steps that keep rotary heads even."""
    from scalesparse.train.driver import model_summary

    sparse: dict[float, dict[str, Any]] = {}
    for changes in points.values():
        data = copy.deepcopy(base)
        for key, value in changes.items():
            set_path(data, key, value)
        cfg = config_from_dict(data)
        if cfg.sparsity.method != "none" and cfg.model.mlp == "dense":
            sparse.setdefault(cfg.sparsity.sparsity, data)
    out = {}
    for sparsity, data in sparse.items():
        cfg = config_from_dict(data)
        target = model_summary(cfg, cfg.data.vocab_size)["params_nonzero_non_embedding"]
        step = 2 * cfg.model.n_heads
        best: tuple[int, int] | None = None
        for width in range(step, cfg.model.d_model + 1, step):
            dense = copy.deepcopy(data)
            set_path(dense, "sparsity.method", "none")
            set_path(dense, "model.d_model", width)
            n = model_summary(config_from_dict(dense), cfg.data.vocab_size)["params_non_embedding"]
            if best is None or abs(n - target) < best[0]:
                best = (abs(n - target), width)
        label = "small_dense" if len(sparse) == 1 else f"small_dense@{sparsity}"
        out[label] = {"sparsity.method": "none", "model.d_model": best[1]}
    return out


# ----------------------------------------------------------------------------- running
def _run_one(run: Run) -> dict[str, Any]:
    """One sweep run, inside a Ray task. Resumes a run that was interrupted; errors come back as data."""
    from scalesparse.train import checkpoint as ckpt
    from scalesparse.train.driver import run_training

    cfg = config_from_dict(run.config)
    resume = "auto" if ckpt.complete_checkpoints(cfg.run_path / "checkpoints") else None
    try:
        return run_training(cfg, resume=resume)
    except ScalesparseError as e:
        return {"error": str(e)}


def run_sweep(sweep: Sweep, address: str | None = None) -> dict[str, Any]:
    from scalesparse import launch
    from scalesparse.data import prepare_data

    sweep.out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (sweep.out / "sweep.json").write_text(json.dumps({
        "name": sweep.name, "base": sweep.base, "points": sweep.points, "seeds": sweep.seeds,
        "runs": [{"run_id": r.run_id, "point": r.point, "seed": r.seed, "changes": r.changes} for r in sweep.runs],
    }, indent=1))  # fmt: skip
    for r in sweep.runs:
        print(f"{r.run_id:<28} differs from the base in: "
              + (", ".join(f"{k}={v}" for k, v in r.changes.items()) or "nothing") + f", seed={r.seed}")
    todo = [r for r in sweep.runs if not (r.run_dir / "summary.json").is_file()]
    print(f"{len(sweep.runs)} runs: {len(sweep.runs) - len(todo)} already done, {len(todo)} to run", flush=True)
    warn_few_seeds(sweep)
    # tokenize once, here: concurrent runs would otherwise race to build the same cache
    for data in {json.dumps(r.config["data"], sort_keys=True) for r in todo}:
        try:
            prepare_data(config_from_dict({"data": json.loads(data)}).data)
        except ScalesparseError:
            pass  # the runs that use it fail on their own, reported like any other failure

    cpus = max(r.config["parallel"]["workers"] * r.config["resources"]["cpus_per_worker"] for r in todo) if todo else 1
    slots = sweep.max_concurrent or max(1, int(launch.cluster_cpus(address) // cpus)) if todo else 1
    t0 = time.perf_counter()

    def done(r: Run, result: dict[str, Any]) -> None:
        folder = r.run_dir
        folder.mkdir(parents=True, exist_ok=True)
        if "error" in result:
            (folder / "error.txt").write_text(result["error"] + "\n")
            print(f"FAILED {r.run_id}: {result['error']}", flush=True)
            return
        (folder / "error.txt").unlink(missing_ok=True)
        (folder / "summary.json").write_text(json.dumps(result, indent=1))
        print(f"done {r.run_id}: val loss {result['final_val_loss']:.4f}, {result['tokens_per_s']:,.0f} tok/s, "
              f"{result['wall_s']:.0f} s  [{time.perf_counter() - t0:.0f} s into the sweep]", flush=True)

    if todo:
        print(f"running {len(todo)} runs, {slots} at a time", flush=True)
        launch.run_tasks(_run_one, todo, max_concurrent=slots, on_done=done, address=address)
    results = aggregate(sweep)
    results["wall_s"] = time.perf_counter() - t0
    (sweep.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- aggregation
STATS = {"val_loss": "final_val_loss", "val_ppl": "final_val_ppl", "tokens_per_s": "tokens_per_s",
         "peak_mem_mb": "peak_mem_mb"}  # fmt: skip
CONSTANTS = ("params", "params_active", "params_nonzero", "params_nonzero_non_embedding", "params_non_embedding",
             "flops_per_token_train_sparse", "flops_per_token_inference_sparse", "flops_per_token_train",
             "flops_per_token_forward")  # fmt: skip


def mean_std(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def position(config: dict[str, Any]) -> str:
    """Where the point sits in the taxonomy (before/during/after; dense-/sparse-to-sparse; static/dynamic;
    granularity), from the sparsifier registry's own declaration."""
    from scalesparse.sparsity import SPARSIFIERS

    parts = []
    sp = config["sparsity"]
    if sp["method"] != "none":
        granularity = {"nm": f"{sp['n']}:{sp['m']}", "block": f"{sp['block_size']}×{sp['block_size']} blocks"}.get(
            sp["granularity"], "unstructured")
        parts.append(f"{SPARSIFIERS.get(sp['method']).position}, {granularity}")
    if config["model"]["mlp"] == "moe":
        parts.append("MoE: during training, sparse-to-sparse, dynamic routing, expert granularity")
    return "; ".join(parts) or "dense"


def aggregate(sweep: Sweep) -> dict[str, Any]:
    points: dict[str, Any] = {}
    failed = []
    for label in sweep.points:
        runs = [r for r in sweep.runs if r.point == label]
        summaries = []
        for r in runs:
            folder = r.run_dir
            if (folder / "summary.json").is_file():
                summaries.append({"seed": r.seed, **json.loads((folder / "summary.json").read_text())})
            elif (folder / "error.txt").is_file():
                failed.append({"run_id": r.run_id, "error": (folder / "error.txt").read_text().strip()})
            else:
                failed.append({"run_id": r.run_id, "error": "did not finish"})
        entry = {"changes": runs[0].changes, "position": position(runs[0].config),
                 "sparsity": runs[0].config["sparsity"]["sparsity"] if runs[0].config["sparsity"]["method"] != "none"
                 else 0.0, "seeds": [s["seed"] for s in summaries]}  # fmt: skip
        entry.update({name: mean_std([s.get(key, math.nan) for s in summaries]) for name, key in STATS.items()})
        if summaries:
            entry.update({k: summaries[0].get(k) for k in CONSTANTS})
        entry["run_dirs"] = [s["run_dir"] for s in summaries]
        points[label] = entry
    return {"name": sweep.name, "points": points, "failed": failed, "seeds": sweep.seeds}


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per point, mean ± std (n) over seeds, position beside it."""
    head = ("| point | val loss | val ppl | params (nonzero) | active | train GFLOP/token (sparse) | tokens/s "
            "(measured) | peak MiB | position |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for label, p in results["points"].items():
        v, ppl, tps, mem = p["val_loss"], p["val_ppl"], p["tokens_per_s"], p["peak_mem_mb"]
        if not v["n"]:
            lines.append(f"| {label} | failed | | | | | | | {p['position']} |")
            continue
        lines.append(
            f"| {label} | {_show_mean_std(v, '.3f')} (n={v['n']}) | {_show_mean_std(ppl, '.1f')} | "
            f"{p['params'] / 1e6:.2f}M ({p['params_nonzero'] / 1e6:.2f}M) | {p['params_active'] / 1e6:.2f}M | "
            f"{p['flops_per_token_train_sparse'] / 1e9:.4f} | {_show_mean_std(tps, ',.0f')} | "
            f"{mem['mean']:,.0f} | {p['position']} |"
        )
    return "\n".join(lines)


def _show_mean_std(stat: dict[str, Any], fmt: str) -> str:
    """`mean ± std`, or the mean alone from one seed (a std of one sample is not 0, it is unknown)."""
    if stat["n"] < 2:
        return format(stat["mean"], fmt)
    return f"{format(stat['mean'], fmt)} ± {format(stat['std'], fmt)}"


def print_results(results: dict[str, Any]) -> None:
    print("\n" + format_table(results))
    for label, p in results["points"].items():
        if 0 < p["val_loss"]["n"] < MIN_SEEDS:
            print(f"warning: {label}: {p['val_loss']['n']} seed(s); a fair comparison wants at least {MIN_SEEDS}")
    for f in results["failed"]:
        print(f"FAILED {f['run_id']}: {f['error']}")
