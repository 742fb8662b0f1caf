"""Training cases through the worker loop in one process (world size 1, no Ray): what the GPU tests
check, runnable on CPU too (tests/gpu/test_harness.py proves the harness there; the GPU rehearsal,
scripts/gpu_session.sh with REHEARSE=1, runs the whole matrix on the CPU).

    python -m tests.gpu.harness matrix [--device cuda|cpu] [--only SUBSTR | --exclude SUBSTR]
                                       [--results FILE.jsonl] [--case-timeout S] [--budget-s S]
    python -m tests.gpu.harness --preflight    # = matrix --device cpu, with a one-line verdict per case
    python -m tests.gpu.harness show FILE.jsonl   # the verdict per case of a results file (runs nothing)

A case is {"device": "cuda" | "cpu", "overrides": {section: {key: value}}, "resume_at": step or null,
"export": bool}. Its result: the per-step training losses, validation losses, the DST log (sparsity,
mask hashes), peak CUDA memory, and with resume_at the losses of a run resumed from that step's
checkpoint in a fresh run directory; with export, the exported model's validation loss recomputed
on the CPU beside the run's own final one. One failing case is reported, not fatal.

Results stream to a JSON-lines file, one line per finished case, as they finish: a run cut short
(a time budget, a hang, a crash) keeps every case it finished, and a later call with the same file
runs only the cases it lacks (so the GPU run's matrix runs once, whatever pytest selects). Each case
has a time limit: a case that exceeds it is killed with its process, recorded as an error, and the
remaining cases go on in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

STEPS, CHECKPOINT_EVERY = 8, 4
REPO = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 240  # a case is seconds on a GPU (DeepSpeed set-up, 8 tiny steps, maybe a resume)


def rehearsing() -> bool:
    """The GPU rehearsal (scripts/gpu_session.sh, REHEARSE=1): the GPU tests' cases run on the CPU."""
    return os.environ.get("SCALESPARSE_GPU_REHEARSAL") == "1"


def on_cpu(case: dict) -> dict:
    """A GPU case as the CPU can run it: fp32 (bf16 training needs a GPU; the case's resume, export
    and DST checks still run), marked so its result says what it was."""
    overrides = json.loads(json.dumps(case.get("overrides", {})))
    rehearsed_as = None
    if overrides.get("train", {}).get("dtype") == "bf16":
        overrides["train"]["dtype"] = rehearsed_as = "fp32"
    return {**case, "device": "cpu", "overrides": overrides, "rehearsed_as": rehearsed_as}


def device_of(case: dict) -> str:
    return case.get("device", "cuda")


def runnable_on_cpu(name: str) -> bool:
    return "megablocks" not in name  # MegaBlocks' kernels are CUDA-only


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
    import shutil

    from scalesparse.config import config_from_dict
    from scalesparse.train import checkpoint as ckpt
    from scalesparse.train.single import train_in_process

    shutil.rmtree(root, ignore_errors=True)  # a run left here would be resumed, not trained
    device = device_of(case)
    cfg_dict = merged(base_config(device, root / "run", str(root / "cache")), case.get("overrides", {}))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = train_in_process(config_from_dict(cfg_dict), data)
    out: dict[str, Any] = {
        "device": device,
        "rehearsed_as": case.get("rehearsed_as"),
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
    return json.loads(json.dumps(out))  # as it will be read back from the file (string step keys)


# --- the results file: one JSON object per line, {"case": name, "result": {...}} ------------------


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:  # one write of one line, flushed to disk: a kill loses at most this case
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> dict[str, dict]:
    """Finished cases in the file (a later line for the same case wins; a torn last line is ignored)."""
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "result" in record:
                out[record["case"]] = record["result"]
    return out


def child_main(spec_path: str) -> None:
    """The subprocess: run the spec's cases in order, one line per case appended to the results file."""
    from scalesparse.data import PreparedData

    spec = json.loads(Path(spec_path).read_text())
    data = PreparedData.from_dict(spec["data"])
    results = Path(spec["results"])
    for name, case in spec["cases"].items():
        print(f"case {name}: started", flush=True)
        t0 = time.perf_counter()
        try:
            result = run_case(case, data, Path(spec["root"]) / name)
        except Exception:
            result = {"device": device_of(case), "error": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        append_line(results, {"case": name, "result": result})
        print(f"case {name}: {'ERROR' if 'error' in result else 'done'} ({result['seconds']:.1f} s)", flush=True)


def child_env() -> dict[str, str]:
    """This process's environment with the repository *added* to PYTHONPATH: on the GPU machine
    DeepSpeed (and MegaBlocks) are importable only through the folders PYTHONPATH already names."""
    inherited = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), inherited) if p)}


def run_cases(cases: dict[str, dict], data, root: Path, results_file: Path | None = None,
              case_timeout: float = CASE_TIMEOUT_S, deadline: float | None = None,
              echo: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the cases that `results_file` (default root/results.jsonl) does not hold yet for their
    device, in a fresh process (its own torch.distributed group and CUDA context); their results, all of them.

    A case running longer than `case_timeout` seconds is killed with its process and recorded as an
    error; the rest go on in a new process. Past `deadline` (time.monotonic()), the running case is
    killed and the cases not started are recorded as not run. A crashed process is recorded against
    the case it was running, with the end of its output. `echo`: the children's lines on stdout."""
    root.mkdir(parents=True, exist_ok=True)
    results_file = Path(results_file or root / "results.jsonl")
    results_file.parent.mkdir(parents=True, exist_ok=True)

    def finished() -> dict[str, dict]:
        have = read_results(results_file)
        return {n: have[n] for n in cases if n in have and have[n].get("device") == device_of(cases[n])}

    spec_path, log_path = root / "cases.json", root / "harness.log"
    while True:
        todo = [n for n in cases if n not in finished()]
        if not todo:
            return finished()
        if deadline is not None and time.monotonic() >= deadline:
            for n in todo:
                error = "not run: the time budget ran out"
                append_line(results_file, {"case": n, "result": {"device": device_of(cases[n]), "error": error}})
            return finished()
        spec_path.write_text(json.dumps({"data": data.to_dict(), "root": str(root), "results": str(results_file),
                                         "cases": {n: cases[n] for n in todo}}))  # fmt: skip
        try:
            _run_child(spec_path, log_path, results_file, cases, todo, case_timeout, deadline, echo)
        except KeyboardInterrupt:  # the session's own limit (SIGINT): every case gets its line, then stop
            for n in cases:
                if n not in finished():
                    error = "not run: interrupted (the step's time limit)"
                    append_line(results_file, {"case": n, "result": {"device": device_of(cases[n]), "error": error}})
            raise


def _run_child(spec_path, log_path, results_file, cases, todo, case_timeout, deadline, echo) -> None:
    """One subprocess over `todo`, watched: the case it is on, and how long it has been on it."""
    with open(log_path, "ab") as log:
        log_start = log.tell()
        # (an interrupt of the session reaches the child too: the whole process group gets SIGINT)
        proc = subprocess.Popen([sys.executable, "-m", "tests.gpu.harness", "child", str(spec_path)], cwd=REPO,
                                env=child_env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    current, since, seen, why = None, time.monotonic(), log_start, None

    def scan() -> None:  # the child's new whole lines: echo them, note the case it started
        nonlocal current, since, seen
        raw = Path(log_path).read_bytes()
        end = raw.rfind(b"\n") + 1
        for line in raw[seen:end].decode(errors="replace").splitlines():
            if echo and line.startswith("case "):
                print(line, flush=True)
            if line.startswith("case ") and line.endswith(": started"):
                current, since = line[5:-9], time.monotonic()
        seen = max(seen, end)

    while proc.poll() is None:
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        scan()
        now = time.monotonic()
        if current is not None and now - since > case_timeout:
            why = f"timed out: still running after {case_timeout:.0f} s (the case's limit); its process was killed"
        elif deadline is not None and now >= deadline:
            why = "timed out: the time budget ran out while it ran; its process was killed"
        if why:
            proc.kill()
            proc.wait()
            break
    scan()
    tail = Path(log_path).read_bytes()[log_start:][-3000:].decode(errors="replace")
    done = read_results(results_file)
    if current is not None and done.get(current, {}).get("device") != device_of(cases[current]):
        error = why or f"the harness process exited {proc.returncode} while running this case"
        append_line(results_file, {"case": current, "result": {"device": device_of(cases[current]),
                                                               "error": f"{error}\n{tail}"}})  # fmt: skip
    elif current is None:  # died before its first case (an import, the data), or the budget ended first
        for n in todo:
            error = ("not run: the time budget ran out" if why else
                     f"the harness process exited {proc.returncode} before its first case:\n{tail}")  # fmt: skip
            append_line(results_file, {"case": n, "result": {"device": device_of(cases[n]), "error": error}})


# --- the command line: the matrix as the GPU session (and its rehearsal) runs it ------------------


def summary_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<28} ERROR {r['error'].strip().splitlines()[0][:160]}"
    loss = r["losses"]
    resumed = r.get("resumed_losses")
    same = "" if resumed is None else f" resumed==uninterrupted {all(resumed[s] == loss[s] for s in resumed)}"
    sparsity = f" sparsity {r['dst'][-1]['sparsity']:.4f}" if r["dst"] else ""
    export = "" if "exported_val_loss" not in r else \
        f" export val {r['exported_val_loss']:.5f} vs {r['final_val_loss']:.5f}"
    as_ = f" (as {r['rehearsed_as']})" if r.get("rehearsed_as") else ""
    return f"{name:<28} loss {loss['1']:.4f} -> {loss[str(STEPS)]:.4f}{sparsity}{same}{export}{as_} [{r['seconds']} s]"


def prepared_test_data():
    """The tests' data (tests/conftest.py small_data): $SCALESPARSE_TEST_CACHE when set (the GPU
    machine has no `datasets`: its cache is prepared here and carried), else a fresh temporary one."""
    import tempfile

    from scalesparse.config import DataConfig
    from scalesparse.data import prepare_data
    from tests.conftest import SHARED_TARBALL

    corpus = os.environ.get("SCALESPARSE_TEST_CORPUS") or (str(SHARED_TARBALL) if SHARED_TARBALL.is_file() else None)
    cache = os.environ.get("SCALESPARSE_TEST_CACHE") or tempfile.mkdtemp(prefix="scalesparse-cache-")
    return prepare_data(DataConfig(vocab_size=512, cache_dir=cache, path=corpus))


def matrix(args: argparse.Namespace) -> int:
    """Run tests/gpu/test_train_cuda.py's cases (the selected ones) into a results file; print a
    verdict per case. Exit 0 when every case ran without an error."""
    import tempfile

    from tests.gpu.test_train_cuda import CASES

    names = [n for n in CASES if (not args.only or args.only in n) and (not args.exclude or args.exclude not in n)]
    if args.device == "cpu":
        names = [n for n in names if runnable_on_cpu(n)]
    cases = {n: on_cpu(CASES[n]) if args.device == "cpu" else {**CASES[n], "device": "cuda"} for n in names}
    root = Path(args.root or tempfile.mkdtemp(prefix="scalesparse-gpu-cases-"))
    results_file = Path(args.results) if args.results else root / "results.jsonl"
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    try:
        results = run_cases(cases, prepared_test_data(), root, results_file, args.case_timeout, deadline, echo=True)
    except KeyboardInterrupt:
        print(f"harness: interrupted; every case has its line in {results_file} (those not run say so)")
        return 130
    for name in names:
        print(summary_line(name, results[name]))
    bad = [n for n in names if "error" in results[n]]
    print(f"harness: {len(names) - len(bad)} of {len(names)} cases ran ({args.device}); results in {results_file}")
    return 1 if bad else 0


def show(path: str) -> int:
    """The verdict per case of a results file, as it is: nothing prepared, nothing run."""
    results = read_results(Path(path))
    for name, r in results.items():
        print(summary_line(name, r))
    bad = [n for n, r in results.items() if "error" in r]
    print(f"{len(results) - len(bad)} of {len(results)} cases without an error")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        child_main(argv[1])
        return 0
    if argv[:1] == ["show"] and len(argv) == 2:
        return show(argv[1])
    if argv == ["--preflight"]:
        argv = ["matrix", "--device", "cpu"]
    ap = argparse.ArgumentParser(prog="python -m tests.gpu.harness", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matrix", help="run the GPU tests' training cases")
    m.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--only", help="only the cases whose name contains this")
    m.add_argument("--exclude", help="not the cases whose name contains this")
    m.add_argument("--results", help="JSON-lines results file (cases already in it are not run again)")
    m.add_argument("--root", help="folder for the runs (default: a temporary one)")
    m.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S, help="seconds one case may take")
    m.add_argument("--budget-s", type=float, help="seconds for all cases; those not started by then are not run")
    return matrix(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
