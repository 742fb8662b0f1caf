"""Training cases through the worker loop in one process (world size 1, no Ray): what the GPU tests
check, runnable on CPU too (tests/gpu/test_harness.py proves the harness there).

    python -m tests.gpu.harness CASES.json OUT.json
    python -m tests.gpu.harness --preflight   # the GPU tests' cases that CPU can run, on the CPU

CASES.json: {"data": PreparedData dict, "root": folder, "cases": {name: case}}, a case being
{"device": "cuda" | "cpu", "overrides": {section: {key: value}}, "resume_at": step or null,
"export": bool}. OUT.json gets, per case: the per-step training losses, validation losses, the DST
log (sparsity, mask hashes), peak CUDA memory, and with resume_at the losses of a run resumed from
that step's checkpoint in a fresh run directory; with export, the exported model's validation loss
recomputed on the CPU beside the run's own final one. One failing case is reported, not fatal.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

STEPS, CHECKPOINT_EVERY = 8, 4


def base_config(device: str, run_dir: Path, data_dir: str) -> dict[str, Any]:
    return {
        "name": "gpu-case",
        "run_dir": str(run_dir),
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 32},
        "data": {"cache_dir": data_dir, "vocab_size": 512, "val_blocks": 8},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4, "warmup_steps": 2,
                  "eval_every": CHECKPOINT_EVERY, "lr": 3e-3, "deterministic": device == "cuda"},
        "parallel": {"workers": 1, "zero_stage": 2},
        "resources": {"gpus_per_worker": 1 if device == "cuda" else 0, "cpus_per_worker": 2},
        "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 4},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False},
    }  # fmt: skip


def merged(base: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def exported_val_loss(checkpoint: Path, out: Path, data, seq_len: int, n_blocks: int) -> float:
    """Export the checkpoint, load it as a plain fp32 model on the CPU, and recompute the validation
    loss over the blocks the trainer evaluates."""
    from scalesparse.data import TokenBlocks
    from scalesparse.export import export_checkpoint, load_exported

    export_checkpoint(checkpoint, out)
    model = load_exported(out).float().eval()
    blocks = TokenBlocks(data.val_path, seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(min(n_blocks, len(blocks))):
            x, y = blocks.get([i])
            _, loss = model(x, y)
            total, count = total + float(loss) * y.numel(), count + y.numel()
    return total / count


def run_case(case: dict, data, root: Path) -> dict[str, Any]:
    from scalesparse.config import config_from_dict
    from scalesparse.train import checkpoint as ckpt
    from scalesparse.train.single import train_in_process

    device = case.get("device", "cuda")
    cfg_dict = merged(base_config(device, root / "run", str(root / "cache")), case.get("overrides", {}))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = train_in_process(config_from_dict(cfg_dict), data)
    out: dict[str, Any] = {
        "losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
        "val": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
        "dst": [r for r in rows if "mask_hash" in r],
        "moe_load": next((r["expert_load"] for r in reversed(rows) if "expert_load" in r), None),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    checkpoints = root / "run" / "checkpoints"
    if case.get("resume_at"):
        again = {**cfg_dict, "run_dir": str(root / "resumed")}
        rows = train_in_process(config_from_dict(again), data, resume=checkpoints / ckpt.tag_for(case["resume_at"]))
        out["resumed_losses"] = {r["step"]: r["loss"] for r in rows if "loss" in r}
        out["resumed_dst"] = [r for r in rows if "mask_hash" in r]
    if case.get("export"):
        final = ckpt.latest_checkpoint(checkpoints)
        out["exported_val_loss"] = exported_val_loss(final, root / "exported", data, cfg_dict["model"]["seq_len"],
                                                     cfg_dict["data"]["val_blocks"])  # fmt: skip
        out["final_val_loss"] = out["val"][max(out["val"])]
    return out


def main(cases_path: str, out_path: str) -> None:
    from scalesparse.data import PreparedData

    spec = json.loads(Path(cases_path).read_text())
    data = PreparedData.from_dict(spec["data"])
    results: dict[str, Any] = {}
    for name, case in spec["cases"].items():
        try:
            results[name] = run_case(case, data, Path(spec["root"]) / name)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-4000:]}
        print(f"case {name}: {'error' if 'error' in results[name] else 'done'}", flush=True)
        Path(out_path).write_text(json.dumps(results, indent=1))  # after every case: a crash keeps the rest


def preflight() -> None:
    """Run tests/gpu/test_train_cuda.py's cases on the CPU (all but bf16 and megablocks, which need a
    GPU): a check of the cases' configs and expectations before device time is spent on them."""
    import os
    import tempfile

    from scalesparse.config import DataConfig
    from scalesparse.data import prepare_data
    from tests.conftest import SHARED_TARBALL
    from tests.gpu.test_train_cuda import CASES

    corpus = os.environ.get("SCALESPARSE_TEST_CORPUS") or (str(SHARED_TARBALL) if SHARED_TARBALL.is_file() else None)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(DataConfig(vocab_size=512, cache_dir=os.environ.get("SCALESPARSE_TEST_CACHE", tmp),
                                       path=corpus))  # fmt: skip
        cases = {n: {**c, "device": "cpu"} for n, c in CASES.items() if "bf16" not in n and "megablocks" not in n}
        results = run_cases(cases, data, Path(tmp) / "preflight")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<28} ERROR {r['error'].splitlines()[-1]}")
            continue
        loss = r["losses"]
        resumed = r.get("resumed_losses")
        same = "" if resumed is None else f" resumed==uninterrupted {all(resumed[s] == loss[s] for s in resumed)}"
        sparsity = f" sparsity {r['dst'][-1]['sparsity']:.4f}" if r["dst"] else ""
        export = "" if "exported_val_loss" not in r else \
            f" export val {r['exported_val_loss']:.5f} vs {r['final_val_loss']:.5f}"
        print(f"{name:<28} loss {loss['1']:.4f} -> {loss[str(STEPS)]:.4f}{sparsity}{same}{export}")




def run_cases(cases: dict[str, dict], data, root: Path, timeout: int = 1800) -> dict[str, Any]:
    """Run the cases in a fresh process (its own process group and CUDA context); their results."""
    import os
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    spec, out = root / "cases.json", root / "results.json"
    spec.write_text(json.dumps({"data": data.to_dict(), "root": str(root), "cases": cases}))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.harness", str(spec), str(out)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"harness exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


if __name__ == "__main__":
    if sys.argv[1:] == ["--preflight"]:
        preflight()
    else:
        main(*sys.argv[1:3])
