"""`scalesparse prune`: load → perplexity before → calibrate and prune block by block → perplexity
after → save_pretrained (safetensors) + report.json / report.md. Everything that can fail cheaply
(paths, config, text lengths) fails before the model is touched."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from scalesparse.config import PruneConfig
from scalesparse.errors import ConfigError
from scalesparse.pruning.model_folder import check_model_folder, context_length, read_model_config

if TYPE_CHECKING:
    import torch

# The driver (run_prune) imports no torch: with workers > 1 it only checks and hands over (~1.3 s
# sooner); everything that needs torch is imported where it runs.


def _text(cfg: PruneConfig, docs: tuple[str, ...]) -> str:
    from scalesparse.data import fetch_corpus, split_documents

    _, chosen = split_documents(fetch_corpus(cfg.data), docs)
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in chosen)


LOG = "prune.log"  # written while workers run (--workers N); a failed attempt's log is appended to, not refused


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(p.name != LOG for p in out.iterdir())):
        raise ConfigError(f"out: {out} exists and is not an empty folder; choose another")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"out: cannot write to {out} ({e.strerror})") from None


def check_context(cfg: PruneConfig, model_config: dict, where: str) -> None:
    """Calibration sequences and evaluation windows must fit the positions the model was built for
    (a learned position table past its end fails deep inside the forward with an IndexError)."""
    found = context_length(model_config)
    if found is None:
        return
    key, n = found
    context = f"the model's context ({key} = {n} in {where})"
    if cfg.calibration.seq_len > n:
        raise ConfigError(f"calibration.seq_len: {cfg.calibration.seq_len} is longer than {context}; lower it, "
                          f"e.g. --set calibration.seq_len={n}")  # fmt: skip
    if cfg.eval.tokens and cfg.eval.window > n:
        raise ConfigError(f"eval.window: {cfg.eval.window} is longer than {context}; lower it, e.g. "
                          f"--set eval.window={n} --set eval.stride={min(cfg.eval.stride, n // 2)}")  # fmt: skip


def check_calibration_text(cfg: PruneConfig) -> None:
    """The folder's tokenizer must turn the calibration text into enough tokens: said here, before
    the model is loaded or any worker starts (a tokenizer that drops every character otherwise
    surfaces as 'too little text' minutes later). Read with `tokenizers` alone (no torch in the
    driver); a folder without tokenizer.json is checked where the model loads."""
    file = Path(cfg.model).expanduser() / "tokenizer.json"
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # a malformed file raises the library's own exception types
        raise ConfigError(f"model: cannot read {file} ({str(e).splitlines()[0][:160]})") from None
    n = len(tok.encode(_text(cfg, cfg.calibration.docs), add_special_tokens=False).ids)
    if n == 0:
        raise ConfigError(f"model: {file} turns the calibration text ({', '.join(cfg.calibration.docs)}) into no "
                          f"tokens; is it the model's own tokenizer?")  # fmt: skip
    _check_enough_tokens(n, cfg)


def _check_enough_tokens(n: int, cfg: PruneConfig) -> None:
    c = cfg.calibration
    if n < c.seq_len + 1:
        raise ConfigError(f"calibration: {n} tokens in {list(c.docs)} is too few for seq_len={c.seq_len}")


def calibration_batches(ids: torch.Tensor, cfg: PruneConfig, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    import torch

    c = cfg.calibration
    _check_enough_tokens(ids.numel(), cfg)
    g = torch.Generator().manual_seed(c.seed)
    starts = torch.randint(0, ids.numel() - c.seq_len, (c.samples,), generator=g).tolist()
    mine = starts[rank::world]  # each worker gets a share; the statistics are summed over workers
    return [ids[s : s + c.seq_len].unsqueeze(0) for s in mine]


def run_prune(cfg: PruneConfig, progress: bool = True, address: str | None = None) -> dict:
    """Check everything cheap here, then prune in this process or on `cfg.workers` Ray workers."""
    out = Path(cfg.out).expanduser()
    check_model_folder(cfg.model, cfg.gguf_file, cfg.allow_pickle)
    if cfg.gguf_file is None:  # a GGUF file carries its config inside: checked once loaded
        folder = Path(cfg.model).expanduser()
        check_context(cfg, read_model_config(folder), str(folder / "config.json"))
    if cfg.workers > 1:
        from scalesparse import launch
        from scalesparse.progress import Console

        launch.check_reachable(address)  # seconds, not minutes of retries
    _check_out(out)
    if cfg.gguf_file is None:  # (a GGUF tokenizer takes ~40 s to load: checked where it loads)
        check_calibration_text(cfg)
    if cfg.workers == 1:
        return _prune(cfg, progress)

    # a plain gang of Ray actors, not a Ray Train run: a one-shot job needs no restarts, and the gang
    # starts ~15 s sooner (most of what a second worker saves on a small model)
    gpus = 1.0 if cfg.device.startswith("cuda") else 0.0
    # as in training: the workers' lines reach the terminal once, Ray's routine notices only prune.log
    with Console(out / LOG):
        launch.run_on_actors(_prune_worker, {"config": asdict(cfg), "progress": progress}, workers=cfg.workers,
                             cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=gpus, name="prune",
                             address=address)  # fmt: skip
    return json.loads((out / "report.json").read_text())


def _prune_worker(args: dict) -> None:
    from scalesparse.config import prune_config_from_dict

    _prune(prune_config_from_dict(args["config"]), args["progress"])


def _prune(cfg: PruneConfig, progress: bool) -> dict:
    """On every worker: each calibrates on its share of the samples; the walk sums the statistics and
    spreads the solves; rank 0 evaluates, saves and reports."""
    import torch

    from scalesparse import comm
    from scalesparse.pruning.calibrate import prune_model
    from scalesparse.pruning.evaluate import evaluation_device, perplexity
    from scalesparse.pruning.hf import find_blocks, load_causal_lm

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} but this machine has no CUDA device visible to torch; "
                          f"use --device cpu")  # fmt: skip
    t0 = time.perf_counter()
    lead = comm.rank() == 0
    out = Path(cfg.out).expanduser()
    calib_text, eval_text = _text(cfg, cfg.calibration.docs), _text(cfg, cfg.eval.docs)
    if not lead:  # one bar per step on the terminal, rank 0's (transformers draws one in every process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok = load_causal_lm(cfg.model, cfg.gguf_file, cfg.allow_pickle)
    find_blocks(model)  # unsupported architectures fail here, before any work
    check_context(cfg, model.config.to_dict(), cfg.model)
    calib_ids = torch.tensor(tok(calib_text, add_special_tokens=False)["input_ids"])
    batches = calibration_batches(calib_ids, cfg, comm.rank(), comm.world_size())
    e = cfg.eval
    eval_ids = torch.tensor(tok(eval_text, add_special_tokens=False)["input_ids"])[e.offset : e.offset + e.tokens]
    if e.tokens and eval_ids.numel() < e.tokens:
        raise ConfigError(f"eval: only {eval_ids.numel()} tokens after offset {e.offset} in {list(e.docs)}")
    where = evaluation_device(model, cfg.device)
    before = perplexity(model, eval_ids, e.window, e.stride, where) if e.tokens and lead else None
    report = prune_model(model, batches, cfg.method, cfg.sparsity, cfg.nm, cfg.include, cfg.exclude, cfg.device,
                         {"blocksize": cfg.blocksize, "damp": cfg.damp}, progress=progress,
                         layer_error=cfg.layer_error,
                         owl=(cfg.owl.m, cfg.owl.lam) if cfg.layer_sparsity == "owl" else None)  # fmt: skip
    phases_by_rank = comm.all_gather_object(report.phases)  # where a slow rank made the others wait
    if not lead:
        comm.barrier()
        return {}
    after = perplexity(model, eval_ids, e.window, e.stride, where) if e.tokens else None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    pruned = sum(r.shape[0] * r.shape[1] * r.sparsity for r in report.layers)
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    result = {
        "model": cfg.model, "method": cfg.method, "sparsity": cfg.sparsity, "pattern": cfg.pattern,
        "workers": comm.world_size(), "device": cfg.device, "eval_device": where,
        "ppl_before": before["ppl"] if before else None, "ppl_after": after["ppl"] if after else None,
        "pruned_fraction_of_pruned_layers": pruned / max(1, total), "layer_sparsity": cfg.layer_sparsity,
        **({"owl": asdict(cfg.owl), "block_sparsity": report.block_sparsity,
            "block_outlier_ratio": report.block_outlier_ratio} if cfg.layer_sparsity == "owl" else {}),
        "calibration": {**asdict(cfg.calibration), "tokens": cfg.calibration.samples * cfg.calibration.seq_len},
        "eval": {**asdict(e), **({k: before[k] for k in ("tokens_scored",)} if before else {})},
        "prune_seconds": report.seconds, "wall_seconds": time.perf_counter() - t0, "phase_seconds": report.phases,
        "phase_seconds_by_rank": phases_by_rank,
        "layers": [asdict(r) for r in report.layers],
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(_markdown(result))
    comm.barrier()  # the others wait until the model is saved
    return result


def _markdown(r: dict) -> str:
    c, e = r["calibration"], r["eval"]
    ppl = (f"| perplexity | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} |" if r["ppl_before"] is not None
           else "| perplexity | (not evaluated) | |")  # fmt: skip
    protocol = (f"Protocol: perplexity on {', '.join(e['docs'])} tokens [{e['offset']}, {e['offset'] + e['tokens']}), "
                f"sliding windows of {e['window']} tokens with stride {e['stride']} (each token scored once). "
                if e["tokens"] else "Perplexity not evaluated (eval.tokens = 0). ")  # fmt: skip
    lines = [
        f"# {r['method']} {r['pattern'] or 'unstructured'} at {r['sparsity']:.0%}: {r['model']}", "",
        "| | dense | pruned |", "|---|---|---|", ppl, "",
        f"{protocol}Calibration: {c['samples']} windows of {c['seq_len']} tokens from {', '.join(c['docs'])}, "
        f"seed {c['seed']}. Pruning took {r['prune_seconds']:.1f} s. Overall sparsity of the pruned layers: "
        f"{r['pruned_fraction_of_pruned_layers']:.4f}.", "",
        "| layer | shape | sparsity | relative reconstruction error | seconds |", "|---|---|---|---|---|",
    ]  # fmt: skip
    if r.get("block_sparsity"):  # OWL: the per-block plan before the per-layer table
        o = r["owl"]
        lines[-2:-2] = [f"Layer sparsity: OWL (m = {o['m']:g}, λ = {o['lam']:g}); per decoder block, sparsity "
                        "(outlier ratio on the dense model): " + ", ".join(
                            f"{i}: {s:.3f} ({d:.4f})" for i, (s, d) in
                            enumerate(zip(r["block_sparsity"], r["block_outlier_ratio"]))), ""]  # fmt: skip
    lines += [f"| {x['name']} | {x['shape'][0]}×{x['shape'][1]} | {x['sparsity']:.4f} | "
              f"{'—' if x['rel_error'] is None else format(x['rel_error'], '.4g')} | {x['seconds']:.2f} |"
              for x in r["layers"]]  # fmt: skip
    return "\n".join(lines) + "\n"
