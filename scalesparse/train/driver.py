"""The driver side of `scalesparse train`: everything that can fail cheaply fails here, first.

Order: run directory → resume target (verified against its manifest, shapes compared) → data
(fetched, tokenized, cached once) → model summary → workers (launch.py) → loss-curve plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scalesparse.config import Config
from scalesparse.data import PreparedData, prepare_data
from scalesparse.errors import CheckpointError, ConfigError, ScalesparseError
from scalesparse.progress import Console, ProgressView
from scalesparse.train import checkpoint as ckpt
from scalesparse.train import elastic
from scalesparse.train.metrics import read_metrics


def check_local_gpus(cfg: Config, address: str | None) -> None:
    """A local run (no cluster to join) can only use this machine's GPUs: refuse at once, before the
    data is prepared, what it cannot give (launch checks Ray's view again before workers start)."""
    from scalesparse import launch

    if launch.runs_locally(address):
        launch.check_gpus(cfg.parallel.workers, cfg.resources.gpus_per_worker, address,
                          visible=torch.cuda.device_count())  # fmt: skip
        check_bf16(cfg, torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False),
                   torch.cuda.get_device_name() if torch.cuda.is_available() else "")  # fmt: skip


def check_bf16(cfg: Config, supported: bool, gpu: str) -> None:
    """bf16 training needs a GPU that computes in it (compute capability 8.0+: A100, H100, ...);
    emulated bf16 on older GPUs is slower than fp32, so it is refused rather than silently slow."""
    if cfg.train.dtype == "bf16" and cfg.resources.gpus_per_worker > 0 and gpu and not supported:
        raise ConfigError(f"train.dtype: bf16 needs a GPU with bfloat16 units (compute capability 8.0+); "
                          f"this machine's {gpu} has none; use fp32")  # fmt: skip


def prepare_run_dir(cfg: Config, resume: str | None) -> Path:
    run_dir = cfg.run_path
    root = run_dir / "checkpoints"
    if resume is None and ckpt.complete_checkpoints(root):
        raise ConfigError(
            f"run_dir: {run_dir} already holds checkpoints; pass --resume auto to continue it, "
            f"or choose another run_dir / name"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir: cannot write to {run_dir} ({e.strerror})") from None
    return run_dir


def resolve_resume(cfg: Config, resume: str | None, run_dir: Path, vocab: int) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            print(f"resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting from step 0")
            return None
    else:
        found = ckpt.resolve(resume)
    ckpt.verify(found)
    check_compatible(ckpt.read_state(found), cfg, vocab, found)
    return found


# Keys of the compared sections that describe how the model is laid out over workers, not its shape
LAYOUT_KEYS = {("moe", "expert_parallel")}


def shape_mismatch(saved: dict[str, Any], cfg: Config, sections: list[str]) -> str | None:
    """The first `section.key` where a saved config differs from ours, as 'key = X there, Y here'."""
    ours = cfg.to_dict()
    for section in sections:
        there = saved.get(section, {})
        for key, want in ours[section].items():
            if (section, key) not in LAYOUT_KEYS and there.get(key) != want:
                return f"{section}.{key} = {there.get(key)!r} there, {want!r} here"
    return None


def check_compatible(state: dict[str, Any], cfg: Config, vocab: int, where: Path) -> None:
    sections = ["model"] + (["moe"] if cfg.model.mlp == "moe" else []) + (
        ["sparsity"] if cfg.sparsity.method != "none" or "sparsity" in state["config"] else [])
    mismatch = shape_mismatch(state["config"], cfg, sections)
    if mismatch:
        raise CheckpointError(f"{where}: written for another model shape ({mismatch})")
    if state["vocab_size"] != vocab:
        raise CheckpointError(f"{where}: vocabulary of {state['vocab_size']} tokens, the data has {vocab}")
    if not elastic.reshaped(state, cfg):
        return
    if "elastic" not in state:  # written before checkpoints carried layout-free shards
        raise CheckpointError(
            f"{where}: written by {state['world_size']} workers with ZeRO-{state['zero_stage']} by an older "
            f"scalesparse; resume with parallel.workers={state['world_size']} parallel.zero_stage={state['zero_stage']}"
            f", or convert: `scalesparse export {where} --out DIR`, then start a new run with --set "
            f"train.init_from=DIR (weights carried over; optimizer state and data order restart)"
        )
    carried = ["weights", "Adam moments", "step", "data position"] + (
        ["sparsity masks and schedule"] if cfg.sparsity.method != "none" else []) + (
        ["experts"] if cfg.model.mlp == "moe" else [])
    lost = ("" if state["world_size"] == cfg.parallel.workers else
            "; per-rank random streams (dropout, router jitter) restart from (seed, step, rank)")
    print(f"resume: reshaping {elastic.describe(elastic.layout(state))} → {elastic.describe(elastic.layout_of(cfg))}: "
          f"{', '.join(carried)} carry over{lost}", flush=True)  # fmt: skip


def check_init_from(cfg: Config, vocab: int) -> None:
    """train.init_from must be an exported model of exactly this shape (checked before any worker starts)."""
    from scalesparse.export import read_exported_meta

    folder = Path(cfg.train.init_from).expanduser()
    try:
        meta = read_exported_meta(folder)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    mismatch = shape_mismatch(meta, cfg, ["model"] + (["moe"] if cfg.model.mlp == "moe" else []))
    if mismatch:
        raise ConfigError(f"train.init_from: {folder} is another model shape ({mismatch})")
    if meta["vocab_size"] != vocab:
        raise ConfigError(f"train.init_from: {folder} has a vocabulary of {meta['vocab_size']} tokens, "
                          f"the data {vocab}")


def run_elastic(cfg: Config, args: dict[str, Any], run_dir: Path, address: str | None,
                progress: ProgressView | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run the workers; with fault_tolerance.elastic, when the group failed (and Ray Train's own
    max_failures restarts are spent), continue from the latest complete checkpoint: on fewer workers
    when the cluster no longer holds the group (reshaped, train/elastic.py), as often as it takes, else
    once more at full size. Returns one record per shrink. `progress`: where rank 0's progress is shown.

    A node that crashes is still counted by the cluster until Ray's health checks declare it dead
    (tens of seconds); so the driver watches the cluster for up to restart_timeout_s before it
    decides, and a node that left gracefully (preempted) is seen at once."""
    from scalesparse import launch

    shrunk: list[dict[str, Any]] = []
    retried_from: str | None = None  # the checkpoint the last full-size restart continued from
    while True:
        try:
            launch.run_workers(cfg, args, address=address, progress=progress)
            return shrunk
        except launch.WorkersFailed as e:
            if not cfg.fault_tolerance.elastic:
                raise
            failed_at = time.time()
            latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
            if latest is not None and ckpt.read_state(latest).get("step") == cfg.train.steps:
                print(f"fault tolerance: {e}; after the final checkpoint {latest}: the run is complete", flush=True)
                return shrunk
            slots = wait_for_lost_slots(cfg, address)
            if slots >= cfg.parallel.workers:  # the cluster still holds the group: not a lost node (yet)
                if latest is None or latest.name == retried_from:  # no progress since the last retry
                    raise
                retried_from = latest.name
                print(f"fault tolerance: {e}; the cluster still holds {slots} workers: restarting "
                      f"{cfg.parallel.workers} from {latest}", flush=True)  # fmt: skip
                args = {**args, "resume": str(latest.resolve()), "latest_at_launch": latest.name}
                continue
            smaller = elastic.shrink(cfg, slots)
            if latest is None or smaller is None:
                raise ScalesparseError(f"{e}; the cluster now holds {slots} of {cfg.parallel.workers} workers and "
                                       + ("there is no checkpoint to continue from" if latest is None else
                                          "no smaller worker count divides the global batch")) from e  # fmt: skip
            error = str(e)
        record = {"from_workers": cfg.parallel.workers, "to_workers": smaller.parallel.workers,
                  "checkpoint": latest.name, "time": time.time(), "failed_at": failed_at, "error": error}  # fmt: skip
        print(f"fault tolerance: {cfg.parallel.workers} workers cannot be restarted (the cluster holds {slots}); "
              f"continuing on {smaller.parallel.workers} from {latest}", flush=True)  # fmt: skip
        check_compatible(ckpt.read_state(latest), smaller, args["data"]["vocab_size"], latest)  # prints the reshape
        shrunk.append(record)
        cfg = smaller
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        args = {**args, "config": cfg.to_dict(), "resume": str(latest.resolve()), "latest_at_launch": latest.name}


def wait_for_lost_slots(cfg: Config, address: str | None, poll_s: float = 1.0) -> int:
    """Worker slots the cluster holds, watched for up to fault_tolerance.restart_timeout_s while it
    still shows the full group (a crashed node is declared dead late); returns at once below that."""
    from scalesparse import launch

    r = cfg.resources
    deadline = time.monotonic() + cfg.fault_tolerance.restart_timeout_s
    while True:
        slots = launch.worker_slots(r.cpus_per_worker, r.gpus_per_worker, address)
        if slots < cfg.parallel.workers or time.monotonic() >= deadline:
            return slots
        time.sleep(poll_s)


def model_summary(cfg: Config, vocab: int) -> dict[str, float]:
    from scalesparse.model import GPT, active_params, count_flops_per_token

    with torch.device("meta"):
        model = GPT(cfg.model, vocab, cfg.moe)
    flops = count_flops_per_token(cfg.model, vocab, model)
    out = {
        "params": model.num_params(),
        "params_active": active_params(model),
        "params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token_forward": flops["forward"],
        "flops_per_token_train": flops["train"],
    }
    # Planned here, before any mask exists (run_training replaces them with the figures of the masks
    # the run ended with): the weights masked out at the target sparsity, and at the sparsity in
    # effect at each step averaged over the run (GMP starts dense).
    zeroed, zeroed_in_training = 0, 0
    if cfg.sparsity.method != "none":
        from scalesparse.sparsity import SPARSIFIERS
        from scalesparse.sparsity.masks import select_layers

        layers = select_layers(model, cfg.sparsity.include, cfg.sparsity.exclude)
        masked = sum(m.weight.numel() for m in layers.values())
        shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        sparsifier = SPARSIFIERS.get(cfg.sparsity.method)(cfg.sparsity, shapes, cfg.train.steps, cfg.seed)
        zeroed = round(cfg.sparsity.sparsity * masked)
        zeroed_in_training = round(sparsifier.mean_sparsity() * masked)
    return {**out, **sparse_figures(cfg, out, zeroed, zeroed_in_training)}


def sparse_figures(cfg: Config, dense: dict[str, float], zeroed: int, zeroed_in_training: int) -> dict[str, float]:
    """What `zeroed` masked-out weights (at the end; `zeroed_in_training`: averaged over the steps)
    take off the dense figures: a sparse kernel would skip 2 FLOPs per zeroed weight per token
    forward, 3× that in training. RigL also computes the dense gradient of masked layers once every
    update_interval. Theoretical: scalesparse multiplies masked dense weights, so measured speed does
    not change."""
    extra = 0
    if cfg.sparsity.method != "none":
        from scalesparse.sparsity import SPARSIFIERS

        if SPARSIFIERS.get(cfg.sparsity.method).dense_gradient_every_update:
            extra = 2 * 2 * zeroed // max(1, cfg.sparsity.update_interval)
    forward = dense["flops_per_token_forward"]
    return {"params_nonzero": dense["params"] - zeroed,
            "params_nonzero_non_embedding": dense["params_non_embedding"] - zeroed,
            "flops_per_token_inference_sparse": forward - 2 * zeroed,
            "flops_per_token_train_sparse": 3 * (forward - 2 * zeroed_in_training) + extra}  # fmt: skip


def masks_in_force(records: list[dict[str, Any]], steps: int) -> dict[str, Any] | None:
    """The sparsity figures of the masks a run trained with, from its workers' sparsity log (None
    without one: a dense run). A record at step s holds from optimizer step s on; steps before the
    first record (a resumed run's log starts at its checkpoint) count at the first record's masks."""
    log = sorted((r for r in records if "masked_zeros" in r), key=lambda r: r["step"])  # stable: last wins
    if not log:
        return None
    at_step = {r["step"]: r for r in log}
    current, zeros = log[0], 0
    for step in range(steps):
        current = at_step.get(step, current)
        zeros += current["masked_zeros"]
    last = log[-1]
    return {"sparsity": last["masked_zeros"] / last["masked_weights"], "zeroed": last["masked_zeros"],
            "zeroed_in_training": round(zeros / max(1, steps))}  # fmt: skip


def final_tokens_per_s(records: list[dict[str, Any]]) -> float:
    """The speed of the layout the run ended on: after a resume (maybe onto other workers) only its
    own segment; each segment's first logged interval includes start-up, left out when there is another."""
    resumed_at = max((r["step"] for r in records if "resume_from" in r), default=-1)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > resumed_at]
    return statistics.mean(rates[1:] or rates) if rates else math.nan


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _checked_inputs(cfg: Config, resume: str | None, run_dir: Path) -> tuple[Config, PreparedData, Path | None]:
    """Everything about the run's inputs that can fail, before any worker: the pretrained folder, the
    mask source, the teacher, the data, the checkpoint to resume, the weights to start from."""
    if cfg.model.from_pretrained:  # architecture, shapes and tokenizer from the folder, before data and workers
        from scalesparse.model.pretrained import resolve_pretrained

        cfg = resolve_pretrained(cfg)
    if cfg.sparsity.mask_from == "weights":  # starting weights with zeros, before data and workers
        from scalesparse.model.pretrained import check_mask_source

        check_mask_source(cfg)
    data: PreparedData = prepare_data(cfg.data, cfg.model.vocab_size)  # the embedding must hold every token id
    if cfg.train.distill.teacher:  # the teacher's folder and its fit with the student (headers only)
        from scalesparse.train.distill import teacher_config

        teacher_config(cfg, cfg.model.vocab_size or data.vocab_size, cfg.model.n_layers, cfg.model.d_model)
    start = resolve_resume(cfg, resume, run_dir, data.vocab_size)
    if cfg.train.init_from and start is None:
        check_init_from(cfg, data.vocab_size)
        # workers run in other folders (and on other nodes): hand them an absolute path
        absolute = str(Path(cfg.train.init_from).expanduser().resolve())
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=absolute))
    return cfg, data, start


def _finished(cfg: Config, start: Path | None, run_dir: Path) -> dict[str, Any] | None:
    """A resume whose checkpoint is already at train.steps has nothing to do: say so and return the run's
    summary, without starting Ray."""
    step = ckpt.read_state(start)["step"] if start is not None else None
    if step is None or step < cfg.train.steps:
        return None
    summary_path = run_dir / "summary.json"
    print(f"nothing to do: {start} is at step {step}, train.steps is {cfg.train.steps} "
          f"(raise train.steps to train on){'; its summary: ' + str(summary_path) if summary_path.is_file() else ''}",
          flush=True)  # fmt: skip
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"run_dir": str(run_dir)}
    return {**summary, "nothing_to_do": True}


def run_training(cfg: Config, resume: str | None = None, address: str | None = None) -> dict[str, Any]:
    from scalesparse import launch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    launch.check_reachable(address)  # seconds, not minutes of retries
    if cfg.fault_tolerance.elastic and cfg.checkpoint.every == 0:
        raise ConfigError("fault_tolerance.elastic: continues from the latest checkpoint, but checkpoint.every is 0 "
                          "(only at the end); set checkpoint.every > 0")  # fmt: skip
    check_local_gpus(cfg, address)
    fresh = not cfg.run_path.exists()
    run_dir = prepare_run_dir(cfg, resume)
    try:
        cfg, data, start = _checked_inputs(cfg, resume, run_dir)
    except BaseException:
        if fresh and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run refused before it began leaves no empty run folder behind
        raise
    finished = _finished(cfg, start, run_dir)
    if finished is not None:
        return finished
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    s = model_summary(cfg, data.vocab_size)
    sparse = (f" | sparse ({cfg.sparsity.method}, {cfg.sparsity.sparsity:.0%} of the sparsified layers): "
              f"{s['params_nonzero'] / 1e6:.2f}M nonzero, {s['flops_per_token_train_sparse'] / 1e6:.1f} MFLOP/token "
              f"to train with sparse kernels" if cfg.sparsity.method != "none" else "")  # fmt: skip
    print(
        f"model: {s['params'] / 1e6:.2f}M parameters ({s['params_non_embedding'] / 1e6:.2f}M non-embedding"
        + (f", {s['params_active'] / 1e6:.2f}M active per token" if cfg.model.mlp == "moe" else "") + "), "
        f"{s['flops_per_token_train'] / 1e6:.1f} MFLOP/token to train{sparse} | data: {data.train_tokens:,} train / "
        f"{data.val_tokens:,} val tokens, vocab {data.vocab_size} | {plural(cfg.parallel.workers, 'worker')}, "
        f"ZeRO-{cfg.parallel.zero_stage}, grad accum {cfg.grad_accum} | run dir {run_dir}",
        flush=True,
    )
    if start is not None:
        print(f"resuming from {start}", flush=True)
    args = {"config": cfg.to_dict(), "run_dir": str(run_dir.resolve()), "data": data.to_dict(),
            "resume": str(start.resolve()) if start else None,
            "latest_at_launch": getattr(ckpt.latest_checkpoint(run_dir / "checkpoints"), "name", None)}  # fmt: skip
    t0 = time.perf_counter()
    # everything printed while the workers run goes to train.log; Ray's and DeepSpeed's routine notices
    # only there. Rank 0's progress is drawn here: a bar on a terminal, a line per log step otherwise.
    try:
        with Console(run_dir / "train.log") as console:
            view = ProgressView(cfg.logging.log_every, console) if cfg.logging.progress else None
            try:
                shrunk = run_elastic(cfg, args, run_dir, address, view)
            except KeyboardInterrupt:
                from scalesparse import launch

                console.mute()  # Ray's processes' account of being stopped: train.log only
                launch.shutdown_ray()  # the workers stop first: none finishes a newer checkpoint after this line
                raise
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        where = (f"the latest complete checkpoint is {latest} (step {ckpt.read_state(latest)['step']}); continue "
                 f"with the same command and --resume auto" if latest else "no checkpoint was written yet")
        print(f"\ninterrupted: {where}", flush=True)
        raise
    wall = time.perf_counter() - t0

    records = read_metrics(run_dir)
    in_force = masks_in_force(records, cfg.train.steps)
    if in_force is not None:  # the nonzero counts and sparse FLOPs of the masks the run trained with
        s = {**s, "sparsity": in_force["sparsity"],
             **sparse_figures(cfg, s, in_force["zeroed"], in_force["zeroed_in_training"])}  # fmt: skip
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "tokens_per_s" in r]
    summary = {
        "run_dir": str(run_dir),
        "wall_s": wall,
        "final_val_loss": evals[-1]["val_loss"] if evals else math.nan,
        "final_val_ppl": evals[-1]["val_ppl"] if evals else math.nan,
        "tokens_per_s": final_tokens_per_s(records),
        "peak_mem_mb": max((r["peak_mem_mb"] for r in steps if "peak_mem_mb" in r), default=math.nan),
        **s,
        **({"workers_lost": shrunk} if shrunk else {}),
    }
    try:
        from scalesparse.report.curves import plot_expert_load, plot_loss_curve, plot_sparsity

        summary["plot"] = str(plot_loss_curve(run_dir))
        for key, plot in (("expert_load_plot", plot_expert_load), ("sparsity_plot", plot_sparsity)):
            out = plot(run_dir)
            if out is not None:
                summary[key] = str(out)
    except Exception as e:  # a plot must never fail a finished run
        print(f"warning: could not draw the loss curve ({e})")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
