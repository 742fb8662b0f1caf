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

Prune, then train: a point may carry `prune:` (prune-config keys: method, sparsity, pattern,
layer_sparsity, calibration.*, ...; the sweep's own `prune:` holds the keys common to such points).
Before any run, each distinct prune job is run once with `scalesparse prune`'s code on the point's
model.from_pretrained (the same calibration for every seed), cached in <out>/pruned/<label> (done
when its report.json exists); the point's runs then start from that folder with its zeros as their
mask (sparsity.mask_from: weights; method static unless the point names set or rigl; N:M patterns
checked as such). `train.steps: 0` makes a point one-shot: the model is evaluated, not trained.
A string value may name a base value as `{section.key}`, e.g. a teacher `{model.from_pretrained}`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalesparse.config import (
    Config,
    PruneConfig,
    config_from_dict,
    parse_override,
    prune_config_from_dict,
    read_yaml_mapping,
)
from scalesparse.errors import ConfigError, ScalesparseError

SWEEP_KEYS = ("name", "base", "set", "prune", "grid", "points", "baselines", "seeds", "out", "max_concurrent")
# prune-config keys a sweep fills in itself, and from what
PRUNE_SET_BY_SWEEP = {"model": "the point's model.from_pretrained", "out": "<out>/pruned/<label>",
                      "data": "the point's data.corpus, data.path and data.cache_dir"}  # fmt: skip
PRUNE_KEYS = tuple(f.name for f in dataclasses.fields(PruneConfig) if f.name not in PRUNE_SET_BY_SWEEP)
BASELINES = ("dense", "small_dense")
FREE_KEYS = ("name", "run_dir", "seed", "logging.progress")  # differ per run by construction
MIN_SEEDS = 3


@dataclass(frozen=True)
class PruneJob:
    """One distinct one-shot pruning job of a sweep, run once before the training runs that start from
    its output (every seed: the same calibration, so the same pruned model)."""

    label: str
    config: dict[str, Any] = field(repr=False)
    """A PruneConfig as a dict; `out` is the job's folder."""

    @property
    def folder(self) -> Path:
        return Path(self.config["out"])

    @property
    def done(self) -> bool:
        return (self.folder / "report.json").is_file()

    def report(self) -> dict[str, Any] | None:
        return json.loads((self.folder / "report.json").read_text()) if self.done else None


@dataclass(frozen=True)
class Run:
    point: str
    seed: int
    changes: dict[str, Any]
    config: dict[str, Any] = field(repr=False)
    prune: str | None = None
    """The label of the PruneJob the run starts from (None: it starts from the base's model)."""

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
    prunes: dict[str, PruneJob] = field(default_factory=dict)


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


def load_sweep(path: str | Path, overrides: list[str] | None = None, seeds: list[int] | None = None,
               out: str | Path | None = None) -> Sweep:  # fmt: skip
    """Read and validate a sweep file; every run's config is checked here, before anything runs.
    `overrides` (KEY.PATH=VALUE, as --set) join the common `set:` (`prune.*` ones the common `prune:`,
    `points.LABEL.*` ones that point's keys); `seeds` and `out` replace the file's (a smaller budget for
    a quick look, another folder)."""
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
    common_prune = flatten(_mapping(spec.get("prune"), "prune"))
    declared = {str(k): dict(_mapping(v, f"points.{k}")) for k, v in _mapping(spec.get("points"), "points").items()}
    for text in overrides or []:
        parts, value = parse_override(text)
        if parts[0] == "prune":
            common_prune[".".join(parts[1:])] = value
        elif parts[0] == "points":
            if len(parts) < 3 or parts[1] not in declared:
                raise ConfigError(f"--set {text}: points.LABEL.KEY with a point of the file "
                                  f"({', '.join(declared) or 'none'})")  # fmt: skip
            declared[parts[1]][".".join(parts[2:])] = value
        else:
            set_path(base, ".".join(parts), value)
    base = interpolate(base, flatten(_validated(base, "base + set").to_dict()), "base")
    base_cfg = _validated(base, "base + set")
    known = flatten(base_cfg.to_dict())
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
    points.update(declared)
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
    seeds = spec.get("seeds", [0, 1, 2]) if seeds is None else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds: must be a non-empty list of integers, got {seeds!r}")
    out = Path(str(out or spec.get("out") or f"runs/sweeps/{name}").replace("{name}", name)).expanduser()

    runs, prunes = [], {}
    for label, declared in points.items():
        where = origin.get(label, f"points.{label}")
        changes, own_prune = split_prune(interpolate(declared, known, where))
        job = None
        if own_prune is not None:  # prune the point's model once; its runs start from the pruned folder
            job = prune_job({**common_prune, **own_prune}, _validated(_applied(base, changes), where), out, where)
            prunes[job.label] = job
            changes = {**changes, **pruned_start(job, changes)}
        for seed in seeds:
            data = _applied(base, changes)
            run_id = f"{label}-seed{seed}"
            data.update(name=f"{name}-{run_id}", seed=seed, run_dir=str(out / "runs" / run_id))
            set_path(data, "logging.progress", False)
            cfg = _validated(data, where)
            check_difference(base_cfg, cfg, changes, label)
            runs.append(Run(label, seed, changes, cfg.to_dict(), job.label if job else None))
    max_concurrent = spec.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ConfigError(f"max_concurrent: {max_concurrent!r} is not allowed; must be an integer >= 1")
    return Sweep(name, out, base_cfg.to_dict(), points, seeds, runs, max_concurrent, prunes)


def _applied(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for key, value in changes.items():
        set_path(data, key, value)
    return data


REFERENCE = re.compile(r"\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\}")  # {section.key}, at least one dot


def interpolate(value: Any, known: dict[str, Any], where: str) -> Any:
    """`{section.key}` inside a string → that key's value in the base config, e.g. a distillation
    teacher `{model.from_pretrained}` follows the base's model when an override moves it."""
    if isinstance(value, dict):
        return {k: interpolate(v, known, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, known, where) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(m: re.Match) -> str:
        key = m.group(1)
        if known.get(key) is None or isinstance(known[key], (dict, list)):
            why = "leaves it unset" if key in known else "has no such key"
            raise ConfigError(f"{where}: {m.group(0)}: the base config {why}; name a value the base sets")
        return str(known[key])

    return REFERENCE.sub(resolve, value)


def split_prune(changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A point's training changes (dotted keys) and its prune keys (dotted, without `prune.`), None
    when it declares no `prune:`."""
    train: dict[str, Any] = {}
    prune: dict[str, Any] | None = None
    for key, value in changes.items():
        if key == "prune" or key.startswith("prune."):
            prune = prune if prune is not None else {}
            if key == "prune":
                prune.update(flatten(_mapping(value, "prune")))
            else:
                prune[key.removeprefix("prune.")] = value
        elif isinstance(value, dict):  # a nested section (train.distill: {...}) as its own keys
            train.update(flatten(value, f"{key}."))
        else:
            train[key] = value
    return train, prune


def prune_job(keys: dict[str, Any], run: Config, out: Path, where: str) -> PruneJob:
    """The prune job of a point whose runs would be `run`: its model, corpus and the given prune-config
    keys, validated; labelled by what it does and a digest of its whole config."""
    for key in keys:
        top = key.split(".")[0]
        if top in PRUNE_SET_BY_SWEEP:
            raise ConfigError(f"{where}: prune.{top}: set by the sweep ({PRUNE_SET_BY_SWEEP[top]}); remove it")
        if top not in PRUNE_KEYS:
            close = difflib.get_close_matches(top, PRUNE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: prune.{top}: unknown prune key{hint}; allowed keys: {', '.join(PRUNE_KEYS)}")
    if not run.model.from_pretrained:
        raise ConfigError(f"{where}: prune: needs model.from_pretrained (the pretrained model folder to prune)")
    if run.data.sources:
        raise ConfigError(f"{where}: prune: calibrates on a registered corpus (data.corpus); data.sources "
                          f"cannot be calibrated on")  # fmt: skip
    d = run.data
    data = {"model": str(Path(run.model.from_pretrained).expanduser().resolve()), "out": "",
            "data": {"corpus": d.corpus, "path": d.path, "cache_dir": d.cache_dir},
            "eval": {"tokens": 0}}  # held-out perplexity is the runs' own, one protocol for every point
    for key, value in keys.items():
        set_path(data, key, value)
    try:
        cfg = _prune_config(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: prune.{e}") from None
    if d.val_fraction == 0:  # a fair comparison never calibrates on the held-out text
        held_out = [doc for doc in cfg.calibration.docs if any(doc.startswith(v) or v.startswith(doc)
                                                                for v in d.val_docs)]  # fmt: skip
        if held_out:
            raise ConfigError(f"{where}: prune.calibration.docs: {held_out[0]!r} is held out for validation "
                              f"(data.val_docs: {', '.join(d.val_docs)}); calibrate on training documents")  # fmt: skip
    body = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]
    shape = cfg.pattern.replace(":", "of") if cfg.pattern else f"{cfg.sparsity * 100:g}"
    label = f"{cfg.method}-{shape}{'-owl' if cfg.layer_sparsity == 'owl' else ''}-{digest}"
    plain = json.loads(json.dumps(body))  # lists, as it reads back from sweep.json
    return PruneJob(label, {**plain, "out": str((out / "pruned" / label).resolve())})


def _prune_config(data: dict[str, Any]) -> PruneConfig:
    return prune_config_from_dict({**data, "out": data["out"] or "unset"})


def pruned_start(job: PruneJob, changes: dict[str, Any]) -> dict[str, Any]:
    """The training keys a pruned point implies: start from the pruned folder, its zeros the mask
    (held by static, evolved by set/rigl when the point names one), N:M zeros checked as such."""
    cfg = _prune_config(job.config)
    implied = {"model.from_pretrained": str(job.folder), "sparsity.method": changes.get("sparsity.method", "static"),
               "sparsity.mask_from": "weights", "sparsity.sparsity": cfg.sparsity}  # fmt: skip
    if cfg.nm is not None:
        implied.update({"sparsity.granularity": "nm", "sparsity.n": cfg.nm[0], "sparsity.m": cfg.nm[1]})
    return implied


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


def run_prune_jobs(sweep: Sweep, todo: list[Run], address: str | None = None) -> dict[str, str]:
    """Run, one after the other, the prune jobs that runs still to do start from, unless cached (a
    report.json in the job's folder; a folder without one is an interrupted job, redone). Returns the
    failed jobs' errors by label: their runs are reported failed, the others go on."""
    from scalesparse.pruning.job import run_prune

    needed = [sweep.prunes[label] for label in dict.fromkeys(r.prune for r in todo if r.prune)]
    cached = [job for job in needed if job.done]
    if needed:
        print(f"{len(needed)} prune jobs: {len(cached)} cached, {len(needed) - len(cached)} to run", flush=True)
    failed = {}
    for job in needed:
        if job.done:
            continue
        shutil.rmtree(job.folder, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            run_prune(prune_config_from_dict(job.config), progress=False, address=address)
        except ScalesparseError as e:
            failed[job.label] = f"prune {job.label}: {e}"
            print(f"FAILED {failed[job.label]}", flush=True)
            continue
        print(f"pruned {job.label} in {time.perf_counter() - t0:.0f} s → {job.folder}", flush=True)
    return failed


def prepare_run_data(todo: list[Run]) -> None:
    """Tokenize once, here: concurrent runs would otherwise race to build the same cache. A pretrained
    model's runs tokenize with what the model resolves to (its own tokenizer, unless they name one)."""
    from scalesparse.data import prepare_data
    from scalesparse.model.pretrained import resolve_pretrained

    seen = set()
    for r in todo:
        try:
            cfg = config_from_dict(r.config)
            if cfg.model.from_pretrained:
                cfg = resolve_pretrained(cfg)
            key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                prepare_data(cfg.data)
        except ScalesparseError:
            pass  # the runs that use it fail on their own, reported like any other failure


def run_sweep(sweep: Sweep, address: str | None = None) -> dict[str, Any]:
    from scalesparse import launch

    sweep.out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (sweep.out / "sweep.json").write_text(json.dumps({
        "name": sweep.name, "base": sweep.base, "points": sweep.points, "seeds": sweep.seeds,
        "prunes": {label: job.config for label, job in sweep.prunes.items()},
        "runs": [{"run_id": r.run_id, "point": r.point, "seed": r.seed, "changes": r.changes, "prune": r.prune}
                 for r in sweep.runs],
    }, indent=1))  # fmt: skip
    for r in sweep.runs:
        print(f"{r.run_id:<28} differs from the base in: "
              + (", ".join(f"{k}={v}" for k, v in r.changes.items()) or "nothing") + f", seed={r.seed}")
    todo = [r for r in sweep.runs if not (r.run_dir / "summary.json").is_file()]
    print(f"{len(sweep.runs)} runs: {len(sweep.runs) - len(todo)} already done, {len(todo)} to run", flush=True)
    warn_few_seeds(sweep)
    t0 = time.perf_counter()
    prune_failed = run_prune_jobs(sweep, todo, address)
    prepare_run_data([r for r in todo if r.prune not in prune_failed])

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

    for r in todo:
        if r.prune in prune_failed:
            done(r, {"error": prune_failed[r.prune]})
    todo = [r for r in todo if r.prune not in prune_failed]
    if todo:
        cpus = max(r.config["parallel"]["workers"] * r.config["resources"]["cpus_per_worker"] for r in todo)
        slots = sweep.max_concurrent or max(1, int(launch.cluster_cpus(address) // cpus))
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


# Where a point that starts from a one-shot pruned model sits, by what its training does with the mask;
# a method not named here keeps its registry position (set, rigl: the pruned mask evolves during training)
AFTER_PRUNING = {"no training": "after training (one-shot)", "static": "after training + fine-tuning"}


def position(config: dict[str, Any], pruned_by: str | None = None) -> str:
    """Where the point sits in the taxonomy (before/during/after; dense-/sparse-to-sparse; static/dynamic;
    granularity): from the sparsifier registry's own declaration, or AFTER_PRUNING for a point that
    starts from a model one-shot pruned by `pruned_by` (a pruning method)."""
    from scalesparse.sparsity import SPARSIFIERS

    parts = []
    sp, steps = config["sparsity"], config["train"]["steps"]
    granularity = {"nm": f"{sp['n']}:{sp['m']}", "block": f"{sp['block_size']}×{sp['block_size']} blocks"}.get(
        sp["granularity"], "unstructured")
    if pruned_by is not None:
        stage = "no training" if steps == 0 else sp["method"]
        where = AFTER_PRUNING.get(stage) or str(SPARSIFIERS.get(sp["method"]).position)
        parts.append(f"{where}, {granularity}, {pruned_by} mask")
    elif sp["method"] != "none":
        parts.append(f"{SPARSIFIERS.get(sp['method']).position}, {granularity}")
    if config["model"]["mlp"] == "moe":
        parts.append("MoE: during training, sparse-to-sparse, dynamic routing, expert granularity")
    if config["train"].get("distill", {}).get("teacher"):
        parts.append(f"distilled ({config['train']['distill']['kind']})")
    label = "; ".join(parts) or "dense"
    return f"{label}, not trained" if steps == 0 and pruned_by is None else label


def tokens_trained(config: dict[str, Any]) -> int:
    """Training tokens of a run: its whole budget (steps × global batch × block), the same on every seed."""
    t = config["train"]
    return t["steps"] * t["global_batch_size"] * config["model"]["seq_len"]


def protocol(sweep: Sweep) -> str:
    """How every point's held-out perplexity is measured (pruning numbers move with it: say it)."""
    d, seq = sweep.base["data"], sweep.base["model"]["seq_len"]
    held_out = (f"the documents {', '.join(d['val_docs'])}" if not d["val_fraction"] else
                f"a {d['val_fraction']:g} fraction of the documents")  # fmt: skip
    text = (f"Held-out perplexity: exp of the mean next-token loss over the first {d['val_blocks']} validation "
            f"blocks of {seq} tokens ({d['val_blocks'] * seq:,} tokens) of {held_out}, never trained on, the same "
            f"blocks for every run, at the end of training (one-shot points: the starting model, untrained).")
    jobs = list(sweep.prunes.values())
    if jobs:
        c = jobs[0].config["calibration"]
        text += (f" One-shot pruning calibrates on {c['samples']} windows of {c['seq_len']} tokens from "
                 f"{', '.join(c['docs'])} (training documents), seed {c['seed']}, once for every seed.")
    return text


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
        config = runs[0].config
        job = sweep.prunes.get(runs[0].prune) if runs[0].prune else None
        report = job.report() if job else None
        prune_s = report["wall_seconds"] if report else 0.0  # once per job; each of its points pays it
        entry = {"changes": runs[0].changes,
                 "position": position(config, _prune_config(job.config).method if job else None),
                 "sparsity": config["sparsity"]["sparsity"] if config["sparsity"]["method"] != "none" else 0.0,
                 "seeds": [s["seed"] for s in summaries], "tokens": tokens_trained(config)}  # fmt: skip
        entry.update({name: mean_std([s.get(key, math.nan) for s in summaries]) for name, key in STATS.items()})
        # the masks in force at the end (a dense run has none), and the time it took to get this model
        entry["sparsity_achieved"] = mean_std([s.get("sparsity", 0.0) for s in summaries])
        entry["wall_s"] = mean_std([s["wall_s"] + prune_s for s in summaries])
        if job is not None:
            c = job.config["calibration"]
            entry["prune"] = {"job": job.label, "folder": str(job.folder), "wall_s": prune_s if report else None,
                              "calibration_tokens": c["samples"] * c["seq_len"]}  # fmt: skip
        if summaries:
            entry.update({k: summaries[0].get(k) for k in CONSTANTS})
        entry["run_dirs"] = [s["run_dir"] for s in summaries]
        points[label] = entry
    return {"name": sweep.name, "points": points, "failed": failed, "seeds": sweep.seeds, "protocol": protocol(sweep)}


COLUMNS = ("point", "val loss", "val ppl", "sparsity (achieved)", "tokens trained", "wall s", "params (nonzero)",
           "active", "train GFLOP/token (sparse)", "tokens/s (measured)", "peak MiB", "position")  # fmt: skip


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per point, mean ± std (n) over seeds, position beside it. Wall time includes
    a pruned point's one-shot pruning; its calibration tokens are shown beside the training tokens."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for label, p in results["points"].items():
        v, ppl, tps, mem = p["val_loss"], p["val_ppl"], p["tokens_per_s"], p["peak_mem_mb"]
        if not v["n"]:
            lines.append(f"| {label} | failed |" + " |" * (len(COLUMNS) - 3) + f" {p['position']} |")
            continue
        tokens = f"{p['tokens']:,}" if "tokens" in p else ""
        if p.get("prune"):
            tokens += f" (+{p['prune']['calibration_tokens']:,} calibration)"
        cells = [label, f"{_show_mean_std(v, '.3f')} (n={v['n']})", _show_mean_std(ppl, ".1f"),
                 _show_mean_std(p["sparsity_achieved"], ".3f") if "sparsity_achieved" in p else "", tokens,
                 _show_mean_std(p["wall_s"], ",.0f") if "wall_s" in p else "",
                 f"{p['params'] / 1e6:.2f}M ({p['params_nonzero'] / 1e6:.2f}M)", f"{p['params_active'] / 1e6:.2f}M",
                 f"{p['flops_per_token_train_sparse'] / 1e9:.4f}" if p.get("tokens") != 0 else "—",
                 _show_mean_std(tps, ",.0f"),
                 _show_mean_std(mem, ",.0f", spread=False), p["position"]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _show_mean_std(stat: dict[str, Any], fmt: str, spread: bool = True) -> str:
    """`mean ± std`, or the mean alone from one seed (a std of one sample is not 0, it is unknown); — when
    no run measured it (a one-shot point trains no step: no throughput)."""
    if stat["n"] == 0:
        return "—"
    if stat["n"] < 2 or not spread:
        return format(stat["mean"], fmt)
    return f"{format(stat['mean'], fmt)} ± {format(stat['std'], fmt)}"


def print_results(results: dict[str, Any]) -> None:
    print("\n" + format_table(results))
    for label, p in results["points"].items():
        if 0 < p["val_loss"]["n"] < MIN_SEEDS:
            print(f"warning: {label}: {p['val_loss']['n']} seed(s); a fair comparison wants at least {MIN_SEEDS}")
    for f in results["failed"]:
        print(f"FAILED {f['run_id']}: {f['error']}")
