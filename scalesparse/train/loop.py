"""The training loop run inside each worker: batch → forward → backward → step → log/eval/save.

Exact resume rests on three things, all restored from the checkpoint: the data position (the
global batch of a step is a pure function of seed and samples consumed), the RNG state of each rank,
and DeepSpeed's model/optimizer shards. The LR is a pure function of the step.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scalesparse import comm
from scalesparse.config import Config, config_from_dict
from scalesparse.data import BatchSchedule, PreparedData, TokenBlocks, rank_slice
from scalesparse.progress import LineProgress, Progress, ProgressFactory, tqdm_progress
from scalesparse.train import checkpoint as ckpt
from scalesparse.train import elastic
from scalesparse.train.engine import (
    born_partitioned,
    build_engine,
    expert_parallel,
    grad_norm,
    local_model_shard,
    lr_at,
    partitions,
    select_accelerator,
    set_lr,
    sparse_views,
    use_deterministic_kernels,
    worker_device,
)
from scalesparse.train.experts import ExpertParallel
from scalesparse.train.metrics import MetricsLogger


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    samples_seen: int = 0
    """Training blocks consumed (the data position)."""


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(checkpointer: ckpt.Checkpointer, engine, cfg: Config, state: TrainState,
                    data: PreparedData, sparsity: DST | None = None,
                    experts: ExpertParallel | None = None) -> Path:  # fmt: skip
    rank = comm.rank()

    def write_shards(folder: Path) -> None:
        engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        save_file(_rng_state(), str(folder / f"rng_rank{rank}.safetensors"))
        if experts is not None:
            experts.save(folder)
        shard = local_model_shard(engine)
        if shard is not None:
            save_file(shard[0], str(folder / f"model_rank{rank}.safetensors"), metadata=shard[1])
        elastic.save_state(folder, engine)  # layout-free: resumable on any worker count / ZeRO stage
        if rank == 0:  # a checkpoint is self-contained: export needs no corpus cache
            shutil.copy(data.tokenizer_path, folder / "tokenizer.json")
            if sparsity is not None:  # masks are identical on every rank: one copy, bit-packed
                save_file(sparsity.sparsifier.state_dict(), str(folder / "sparsity.safetensors"))

    meta = {"format": 1, "elastic": elastic.FORMAT,
            "step": state.step, "samples_seen": state.samples_seen, "vocab_size": data.vocab_size,
            "world_size": comm.world_size(), "zero_stage": cfg.parallel.zero_stage,
            "config": cfg.to_dict(), "saved_at": time.time()}  # fmt: skip
    return checkpointer.save(state.step, write_shards, meta)


def load_checkpoint(engine, folder: Path, cfg: Config, sparsity: DST | None = None,
                    experts: ExpertParallel | None = None) -> TrainState:  # fmt: skip
    meta = ckpt.read_state(folder)
    if sparsity is not None:  # masks are the same on every rank and for every layout
        sparsity.sparsifier.load_state_dict(load_file(str(folder / "sparsity.safetensors")))
    if elastic.reshaped(meta, cfg):  # another worker count / ZeRO stage: our layout-free shards
        elastic.load_state(folder, engine, meta["step"], meta["samples_seen"], experts)
        if meta["world_size"] == comm.world_size():  # the same ranks: their random streams go on
            _set_rng_state(load_file(str(folder / f"rng_rank{comm.rank()}.safetensors")))
        else:
            elastic.reseed(cfg.seed, meta["step"], comm.rank())
    else:  # the layout that wrote it: DeepSpeed's own shards, and each rank's RNG state
        if experts is not None:
            experts.load(folder)
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True)
        if load_path is None:
            raise ckpt.CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint")
        _set_rng_state(load_file(str(folder / f"rng_rank{comm.rank()}.safetensors")))
    return TrainState(step=meta["step"], samples_seen=meta["samples_seen"])


class DST:
    """The trainer's side of sparsity: masks made on the plain model before DeepSpeed wraps it,
    then, at each step's accumulation boundary (gradients reduced, optimizer not yet stepped),
    mask updates on this rank's ZeRO slices and gradient masking. Checks after every update that
    all ranks hold the same masks."""

    def __init__(self, cfg: Config, model) -> None:
        from scalesparse.sparsity import SPARSIFIERS
        from scalesparse.sparsity.masks import select_layers

        self.layers = select_layers(model, cfg.sparsity.include, cfg.sparsity.exclude)
        self.parts = {n: partitions(m).get("weight") for n, m in self.layers.items()}  # born partitioned: slices
        shapes = {n: self.parts[n].shape if self.parts[n] else tuple(m.weight.shape) for n, m in self.layers.items()}
        self.sparsifier = SPARSIFIERS.get(cfg.sparsity.method)(cfg.sparsity, shapes, cfg.train.steps, cfg.seed)
        self.pending: dict[str, Any] = {}

    def init_masks(self, model, first_micro_batches, device: torch.device | str = "cpu") -> None:
        from scalesparse.sparsity.base import LayerView
        from scalesparse.sparsity.local import local_views

        if getattr(self.sparsifier, "needs_dense_gradient", False):
            # pruning at initialisation: one dense gradient of the first global batch (the only dense
            # all-reduce of gradients sparsity ever does), on the worker's device (DeepSpeed, which
            # moves the model there next, finds it there already)
            model.to(device)
            for x, y in first_micro_batches:
                loss = model(x.to(device), y.to(device))[1] / len(first_micro_batches)
                loss.backward()
            for layer in self.layers.values():
                comm.all_reduce_mean(layer.weight.grad)
        if any(self.parts.values()):  # each rank's partition, as the views at a step boundary
            views = [LayerView(n, p.shape, p.start, p.local, None, []) for n, p in sorted(self.parts.items())]
        else:
            views = local_views(self.layers)
        self.sparsifier.init_masks(views)
        model.zero_grad(set_to_none=True)
        self.pending = {"step": 0, **self._report()}

    def at_boundary(self, engine, step: int) -> None:
        views = sparse_views(engine, self.layers, with_grads=True)
        if self.sparsifier.should_update(step):
            stats = self.sparsifier.update(step, views)
            self.pending = {"step": step + 1, **stats, **self._report()}
        self.sparsifier.mask_grads(views)

    def _report(self) -> dict[str, Any]:
        from scalesparse.sparsity.masks import mask_hash

        hashes = comm.all_gather_object(mask_hash(self.sparsifier.masks))
        if len(set(hashes)) != 1:
            raise RuntimeError(f"sparsity masks differ across ranks: {hashes}")
        report = self.sparsifier.sparsity_report()
        # exact counts beside the fraction: the run's summary figures (nonzero parameters, sparse
        # FLOPs) are made from them, the masks in force rather than the configured target
        return {"sparsity": report.pop("global"), "masked_weights": report.pop("weights"),
                "masked_zeros": report.pop("zeros"), "itop": report.pop("in_time_overparam"), "mask_hash": hashes[0],
                "layer_sparsity": report}  # fmt: skip

    def masks_loaded(self, step: int) -> dict[str, Any]:
        """The log record of masks a checkpoint brought back (collective): a resumed run's figures too
        come from the masks in force."""
        return {"step": step, **self._report()}

    def take_log(self) -> dict[str, Any]:
        out, self.pending = self.pending, {}
        return out


class MoEStats:
    """Expert load and router losses since the last log line, summed over micro-batches and ranks."""

    def __init__(self, layers) -> None:
        self.layers = layers
        self.reset()

    def reset(self) -> None:
        self.load: torch.Tensor | None = None  # (layers, E), on the statistics' device once they arrive
        self.scalars: torch.Tensor | None = None  # balance loss, z-loss, dropped fraction
        self.count = 0

    def _sums(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.load is None:
            E = self.layers[0].moe.num_experts if self.layers else 0
            self.load = torch.zeros(len(self.layers), E, dtype=torch.float64, device=device)
            self.scalars = torch.zeros(3, dtype=torch.float64, device=device)
        return self.load, self.scalars

    def accumulate(self) -> None:
        # summed where the statistics are (the GPU in CUDA training): no host sync per micro-batch
        for i, layer in enumerate(self.layers):
            st = layer.stats
            load, scalars = self._sums(st["load"].device)
            load[i] += st["load"].detach().double()
            scalars += torch.stack([torch.as_tensor(st[k], device=load.device).detach().double()
                                    for k in ("balance_loss", "z_loss", "dropped")])  # fmt: skip
        self.count += 1

    def collect(self) -> dict[str, Any]:
        """Collective (every rank calls it at the same steps); empty for a dense model."""
        if not self.layers:
            return {}
        load, scalars = self._sums("cpu")  # (no micro-batch since the last collect: zeros)
        comm.all_reduce_sum(load)
        scalars = comm.all_reduce_mean(scalars).cpu() / (max(1, self.count) * len(self.layers))
        load = (load / load.sum(dim=1, keepdim=True)).cpu()  # fraction of assignments per expert
        out = {"moe_balance_loss": float(scalars[0]), "moe_z_loss": float(scalars[1]),
               "moe_dropped": float(scalars[2]), "expert_load": load.tolist()}  # fmt: skip
        self.reset()
        return out


@torch.no_grad()
def evaluate(engine, blocks: TokenBlocks, n_blocks: int, micro: int) -> float:
    """Mean next-token loss over the first n_blocks validation blocks, sharded over ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
    """
    world, rank = comm.world_size(), comm.rank()
    n = min(n_blocks, len(blocks)) // world * world
    if n == 0:
        raise ValueError(f"validation split has {len(blocks)} blocks, fewer than {world} workers")
    mine = torch.arange(n)[rank::world].numpy()
    engine.eval()
    # summed where the losses are (no host sync per batch), reduced there: NCCL takes CUDA tensors
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for i in range(0, len(mine), micro):
        x, y = blocks.get(mine[i : i + micro])
        _, loss = engine(x.to(engine.device), y.to(engine.device))
        total[0] += loss.detach().double() * y.numel()
        total[1] += y.numel()
    engine.train()
    comm.all_reduce_sum(total)
    return float(total[0] / total[1])


def peak_memory_mb() -> float:
    """This process's peak: CUDA memory allocated by torch on a GPU, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def loads_partitioned(cfg: Config) -> bool:
    """A pretrained model under ZeRO-3 is born partitioned and each worker reads only its partitions
    (no worker ever holds it whole). Not with SNIP: its dense gradient at initialisation runs the
    whole model before DeepSpeed wraps it."""
    from scalesparse.sparsity import SPARSIFIERS

    method = cfg.sparsity.method
    snip = method != "none" and getattr(SPARSIFIERS.get(method), "needs_dense_gradient", False)
    return bool(cfg.model.from_pretrained) and cfg.parallel.zero_stage == 3 and not snip


def build_model(cfg: Config, data_vocab: int, world: int):
    """The worker's model: from scratch, drawn from the seed; for a pretrained folder, allocated but not
    drawn (its weights are read next), and under loads_partitioned born partitioned."""
    from contextlib import nullcontext

    from scalesparse.model import GPT
    from scalesparse.model.pretrained import uninitialised

    pretrained, partitioned = bool(cfg.model.from_pretrained), loads_partitioned(cfg)
    with born_partitioned(cfg, world) if partitioned else nullcontext(), (
        uninitialised() if pretrained else nullcontext()
    ):
        return GPT(cfg.model, cfg.model.vocab_size or data_vocab, cfg.moe, init=not pretrained)


def train_worker(args: dict[str, Any], progress_factory: ProgressFactory | None = None) -> None:
    """Entry point of one worker. `args`: config (dict), run_dir, data (PreparedData dict), resume."""
    cfg = config_from_dict(args["config"])
    # torch/DeepSpeed deprecation chatter from inside DeepSpeed: not actionable by users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    select_accelerator(cfg)
    use_deterministic_kernels(cfg.train.deterministic)  # before the model reaches the GPU
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = worker_device(cfg)  # DeepSpeed places what it wraps here too
    rank, world = comm.rank(), comm.world_size()
    run_dir = Path(args["run_dir"])
    data = PreparedData.from_dict(args["data"])
    T, micro, ga = cfg.model.seq_len, cfg.train.micro_batch_size, cfg.grad_accum
    train_blocks = TokenBlocks(data.train_path, T)
    val_blocks = TokenBlocks(data.val_path, T)

    checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep)
    # After a worker-group restart (a worker died) the run's own `latest` has moved on since the driver
    # launched us: continue from it. Otherwise start where the driver said (--resume, possibly older).
    latest = ckpt.latest_checkpoint(checkpointer.root)
    restarted = latest is not None and latest.name != args.get("latest_at_launch")
    resume = latest if restarted else (Path(args["resume"]) if args.get("resume") else None)
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg, data.vocab_size, world)
    if cfg.model.from_pretrained and resume is None:  # a resumed run's weights come from its checkpoint
        from scalesparse.model.pretrained import load_pretrained

        load_pretrained(model, cfg.model.from_pretrained, cfg.model.allow_pickle, cfg.seed, partitions(model))
    if cfg.train.init_from and resume is None:
        from scalesparse.export import load_weights

        load_weights(model, Path(cfg.train.init_from))
    dst = DST(cfg, model) if cfg.sparsity.method != "none" else None
    # before DeepSpeed sees the model (it moves what it wraps to the device; the experts move here)
    experts = ExpertParallel(model, cfg, device) if expert_parallel(cfg) else None
    schedule = BatchSchedule(len(train_blocks), cfg.seed)
    if dst is not None and resume is None:
        first = schedule.global_batch(0, cfg.train.global_batch_size)
        dst.init_masks(model, [train_blocks.get(rank_slice(first, m, rank, world, micro)) for m in range(ga)], device)
    engine = build_engine(model, cfg, world)
    moe_stats = MoEStats(engine.module.moe_layers())
    distiller = None
    if cfg.train.distill.enabled:  # under ZeRO-3 the teacher too is born partitioned (train/distill.py)
        from scalesparse.train.distill import Distiller

        distiller = Distiller.build(cfg, engine, device, world)

    state = TrainState()
    resumed: dict[str, Any] = {}
    if resume is not None:
        t_load = time.perf_counter()
        state = load_checkpoint(engine, resume, cfg, dst, experts)
        # what resuming cost (slowest rank; peak resident memory of the process so far, load included)
        cost = comm.all_gather_object((time.perf_counter() - t_load, peak_memory_mb()))
        resumed = {"step": state.step, "resume_s": max(c[0] for c in cost), "resume_peak_mb": max(c[1] for c in cost),
                   "resume_reshaped": elastic.reshaped(ckpt.read_state(resume), cfg),
                   "resume_from": resume.name}  # fmt: skip
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout streams differ per rank, reproducibly

    logger = MetricsLogger(run_dir, rank == 0, cfg.logging.tensorboard, state.step if resume else None)
    if resumed:
        logger.log(resumed)
        if dst is not None:
            logger.log(dst.masks_loaded(state.step))
    progress: Progress | None = None
    if rank == 0 and cfg.logging.progress:
        if progress_factory is not None:  # launch's: the driver draws what rank 0 reports
            progress = progress_factory(cfg.train.steps, cfg.name)
        elif args.get("progress_lines"):  # run in-process, output not a terminal
            progress = LineProgress(cfg.train.steps, cfg.name, cfg.logging.log_every)
        else:
            progress = tqdm_progress(cfg.train.steps, cfg.name)
        progress.update(state.step)
    tokens_per_step = cfg.train.global_batch_size * T

    def run_eval(step: int) -> None:
        val = evaluate(engine, val_blocks, cfg.data.val_blocks, micro)
        logger.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
        if rank == 0:  # through the progress when there is one: in order with it, above its bar
            line = f"step {step}: val_loss {val:.4f}  val_ppl {math.exp(min(val, 50.0)):.2f}"
            if progress is not None:
                progress.write(line)
            else:
                print(line, flush=True)

    if state.step == 0 and resume is None:
        run_eval(0)
    t_last, tokens_since = time.perf_counter(), 0
    while state.step < cfg.train.steps:
        step = state.step
        lr = lr_at(step, cfg.train)
        set_lr(engine, lr)
        if experts is not None:
            experts.set_lr(lr)
        batch = schedule.global_batch(state.samples_seen, cfg.train.global_batch_size)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        for m in range(ga):
            x, y = train_blocks.get(rank_slice(batch, m, rank, world, micro))
            if distiller is None:
                _, loss = engine(x.to(device), y.to(device))
            else:  # (1 − w)·task + w·distill (train/distill.py)
                loss = distiller.loss(engine, x.to(device), y.to(device))
            engine.backward(loss)
            if dst is not None and m == ga - 1:
                dst.at_boundary(engine, step)
            if experts is not None and m == ga - 1:
                experts.step(engine)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            loss_sum += loss.detach().double()
            moe_stats.accumulate()
        state.step += 1
        state.samples_seen += cfg.train.global_batch_size
        tokens_since += tokens_per_step

        last = state.step == cfg.train.steps
        if state.step % cfg.logging.log_every == 0 or last:
            mean_loss = float(comm.all_reduce_mean(loss_sum / ga))
            now = time.perf_counter()
            tps = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0
            norm = experts.grad_norm if experts is not None else grad_norm(engine)
            peak = {"peak_mem_mb": max(comm.all_gather_object(peak_memory_mb()))} if last else {}
            logger.log({"step": state.step, "loss": mean_loss, "lr": lr, "tokens_per_s": tps, "time": time.time(),
                        **peak,
                        **({"grad_norm": norm} if norm is not None else {}), **moe_stats.collect(),
                        **(distiller.collect() if distiller is not None else {})})  # fmt: skip
            if progress is not None:
                progress.set_description(f"{cfg.name} loss {mean_loss:.3f} | {tps:,.0f} tok/s")
        if dst is not None and dst.pending:
            logger.log(dst.take_log())
        if progress is not None:
            progress.update(1)
        if (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last:
            run_eval(state.step)
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or last:
            save_checkpoint(checkpointer, engine, cfg, state, data, dst, experts)
    if dst is not None and dst.pending:  # train.steps 0: no step logged the masks the model was evaluated with
        logger.log(dst.take_log())
    if progress is not None:
        progress.close()
    logger.close()
