"""Sweeps that prune, then train (issue 23): every point of configs/sweeps/prune-recover.yaml for 2
steps through the real path (scalesparse's own model pretrained, exported, pruned once per job, runs
as Ray tasks with 1 worker); one-shot points evaluate without training under the same protocol; the
prune jobs are cached; bad prune keys are refused in one line before anything runs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from scalesparse.config import config_from_dict, load_config
from scalesparse.errors import ConfigError
from scalesparse.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs/sweeps/prune-recover.yaml"


def write_sweep(tmp_path, points, **spec) -> Path:
    base = {"model": {"from_pretrained": str(tmp_path / "model"), "seq_len": 32},
            "data": {"val_docs": ["hamlet"]}, "parallel": {"workers": 1}}  # fmt: skip
    spec = {"name": "p", "base": base, "points": points, "out": str(tmp_path / "out"), **spec}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "sweep.yaml"


@pytest.mark.parametrize("points, spec, message", [
    ({"a": {"prune": {"methd": "wanda"}}}, {},
     "points.a: prune.methd: unknown prune key (did you mean 'method'?); allowed keys: gguf_file, method, sparsity"),
    ({"a": {"prune.calibration.sampls": 4}}, {},
     "points.a: prune.calibration.sampls: unknown key (did you mean 'samples'?); allowed keys: docs, samples"),
    ({"a": {"prune": {}}}, {"prune": {"sparsity": 1.5}},
     "points.a: prune.sparsity: 1.5 is not allowed; must be in [0, 1)"),
    ({"a": {"prune": {"out": "x"}}}, {}, "points.a: prune.out: set by the sweep (<out>/pruned/<label>); remove it"),
    ({"a": {"prune": {"calibration": {"docs": ["hamlet"]}}}}, {},
     "points.a: prune.calibration.docs: 'hamlet' is held out for validation (data.val_docs: hamlet); "
     "calibrate on training documents"),
    ({"a": {"prune": {}, "model.from_pretrained": None}}, {},
     "points.a: prune: needs model.from_pretrained (the pretrained model folder to prune)"),
    ({"a": {"prune": {"pattern": "2:4"}, "sparsity.method": "rigl"}}, {},
     "points.a: sparsity.granularity: 'nm' is not allowed; rigl evolves unstructured or block masks"),
    ({"a": {"train.distill.teacher": "{model.from_pretraind}"}}, {},
     "points.a.train.distill.teacher: {model.from_pretraind}: the base config has no such key"),
])  # fmt: skip
def test_bad_prune_points_are_refused_before_anything_runs(tmp_path, points, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(write_sweep(tmp_path, points, **spec))


def test_prune_points_start_from_one_cached_job_per_distinct_spec(tmp_path):
    path = write_sweep(tmp_path, {
        "oneshot": {"prune": {"method": "wanda"}, "train.steps": 0},
        "recovered": {"prune.method": "wanda", "train.distill": {"teacher": "{model.from_pretrained}"}},
        "nm": {"prune": {"method": "wanda", "pattern": "2:4"}},
        "rigl": {"prune": {"method": "wanda"}, "sparsity.method": "rigl"},
    }, prune={"calibration": {"docs": ["tempest"], "samples": 4}})  # fmt: skip
    sweep = load_sweep(path, overrides=["prune.calibration.seq_len=16"], seeds=[3, 4])
    assert [r.run_id for r in sweep.runs][:2] == ["oneshot-seed3", "oneshot-seed4"]
    assert len(sweep.prunes) == 2  # unstructured, shared by three points and both seeds; 2:4
    flat = {r.point: r for r in sweep.runs}
    job = sweep.prunes[flat["oneshot"].prune]
    assert flat["recovered"].prune == flat["rigl"].prune == job.label and job.label.startswith("wanda-50-")
    assert job.folder == (tmp_path / "out" / "pruned" / job.label).resolve()
    assert job.config["calibration"] == {"docs": ["tempest"], "samples": 4, "seq_len": 16, "seed": 0}
    assert job.config["model"] == str(tmp_path / "model") and job.config["eval"]["tokens"] == 0
    cfg = config_from_dict(flat["oneshot"].config)
    assert cfg.train.steps == 0 and cfg.model.from_pretrained == str(job.folder)
    assert (cfg.sparsity.method, cfg.sparsity.mask_from) == ("static", "weights")
    assert config_from_dict(flat["rigl"].config).sparsity.method == "rigl"
    assert config_from_dict(flat["recovered"].config).train.distill.teacher == str(tmp_path / "model")
    nm = config_from_dict(flat["nm"].config).sparsity
    assert (nm.granularity, nm.n, nm.m) == ("nm", 2, 4)
    assert sweep.prunes[flat["nm"].prune].label.startswith("wanda-2of4-")


def test_every_shipped_prune_sweep_declares_its_points(tmp_path):
    for path in sorted(REPO.glob("configs/sweeps/prune-recover*.yaml")):
        sweep = load_sweep(path, out=tmp_path / path.stem)
        tokens = {r.config["train"]["steps"] * r.config["train"]["global_batch_size"] * r.config["model"]["seq_len"]
                  for r in sweep.runs if r.config["train"]["steps"]}  # fmt: skip
        assert len(tokens) == 1, f"{path.name}: every training point has the same token budget"
        if "smollm2" in path.name:
            assert tokens.pop() <= 150_000
        else:
            assert len(sweep.seeds) >= 3
        assert {"dense-finetuned", "sparsegpt-50-oneshot", "sparsegpt-2of4-recovered-squarehead", "gmp-50",
                "rigl-50-from-sparsegpt"} <= set(sweep.points)  # fmt: skip
        assert len(sweep.prunes) == 6  # 3 methods × (50%, 2:4)


def pretrain_and_export(tmp_path, small_data) -> Path:
    """The sweep's first two documented commands, small: train configs/pretrain-small.yaml, export it."""
    from scalesparse.export import export_checkpoint
    from scalesparse.train.driver import run_training

    data = [f"data.{k}={v}" for k, v in small_data.items()]
    cfg = load_config(REPO / "configs/pretrain-small.yaml", [
        "model.d_model=64", "model.n_layers=2", "model.seq_len=32", "train.steps=2", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.warmup_steps=1", "parallel.workers=1", "parallel.zero_stage=0",
        "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false", f"run_dir={tmp_path / 'pre'}",
        *data, "data.val_blocks=4"])  # fmt: skip
    run_training(cfg)
    return export_checkpoint(tmp_path / "pre", tmp_path / "export")


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_every_point_of_the_prune_recover_sweep_runs(tmp_path, small_data, ray_session, capsys):
    from scalesparse.report.html import write_report
    from scalesparse.sweep import format_table, run_sweep

    model = pretrain_and_export(tmp_path, small_data)
    data = [f"data.{k}={v}" for k, v in small_data.items()]
    overrides = [f"model.from_pretrained={model}", "model.seq_len=32", *data, "data.val_blocks=4", "train.steps=2",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_every=1",
                 "logging.log_every=1", "resources.cpus_per_worker=1", "prune.calibration.samples=4",
                 "prune.calibration.seq_len=32"]
    # two runs at a time (the file runs one, for its timings): on 2 cores a 1-worker run of this size
    # is mostly Ray's and DeepSpeed's start-up
    sweep = dataclasses.replace(load_sweep(SWEEP, overrides, seeds=[0], out=tmp_path / "out"), max_concurrent=2)
    steps = {r.point: r.config["train"]["steps"] for r in sweep.runs}
    assert set(steps.values()) == {0, 2} and steps["sparsegpt-2of4-oneshot"] == 0
    results = run_sweep(sweep)
    assert results["failed"] == []
    out = capsys.readouterr().out
    assert "6 prune jobs: 0 cached, 6 to run" in out
    points = results["points"]
    assert len(points) == len(sweep.points) == 20 and all(p["val_ppl"]["n"] == 1 for p in points.values())

    for label, p in points.items():
        rows = metrics(p["run_dirs"][0])
        if steps[label] == 0:  # one-shot: evaluated at step 0, nothing trained, nothing saved
            assert p["tokens"] == 0 and not any("loss" in r for r in rows)
            assert [r["step"] for r in rows if "val_loss" in r] == [0]
            assert not (Path(p["run_dirs"][0]) / "checkpoints").exists()
        else:
            assert p["tokens"] == 2 * 4 * 32 and [r["step"] for r in rows if "loss" in r] == [1, 2]
        if p.get("prune"):  # the pruned model's zeros, exactly: the job's sparsity
            assert p["sparsity_achieved"]["mean"] == pytest.approx(0.5, abs=0.01)
            assert p["wall_s"]["mean"] > p["prune"]["wall_s"] > 0
            assert p["prune"]["calibration_tokens"] == 4 * 32
    # one protocol: a recovered run's step-0 evaluation is its one-shot point's result
    first = [r for r in metrics(points["sparsegpt-2of4-recovered"]["run_dirs"][0]) if "val_loss" in r][0]
    assert first["step"] == 0
    assert first["val_loss"] == pytest.approx(points["sparsegpt-2of4-oneshot"]["val_loss"]["mean"])
    assert points["dense-finetuned"]["sparsity_achieved"]["mean"] == 0.0
    assert any("distill_loss" in r for r in metrics(points["sparsegpt-50-recovered-squarehead"]["run_dirs"][0]))
    assert {label: p["position"] for label, p in points.items() if "sparsegpt-50" in label or label in (
        "dense-pretrained", "dense-finetuned", "gmp-50", "rigl-50-from-sparsegpt", "wanda-2of4-recovered")} == {
        "dense-pretrained": "dense, not trained",
        "dense-finetuned": "dense",
        "sparsegpt-50-oneshot": "after training (one-shot), unstructured, sparsegpt mask",
        "sparsegpt-50-recovered": "after training + fine-tuning, unstructured, sparsegpt mask",
        "sparsegpt-50-recovered-logits":
            "after training + fine-tuning, unstructured, sparsegpt mask; distilled (logits)",
        "sparsegpt-50-recovered-squarehead":
            "after training + fine-tuning, unstructured, sparsegpt mask; distilled (squarehead)",
        "gmp-50": "during training, dense-to-sparse, dynamic mask, unstructured",
        "rigl-50-from-sparsegpt": "during training, sparse-to-sparse, dynamic mask, unstructured, sparsegpt mask",
        "wanda-2of4-recovered": "after training + fine-tuning, 2:4, wanda mask",
    }  # fmt: skip

    table = format_table(results)
    assert "| sparsegpt-2of4-oneshot | " in table and "| 0 (+128 calibration) |" in table
    page = write_report(tmp_path / "out").read_text()
    assert "sparsegpt-50-recovered-squarehead" in page and "Held-out perplexity: exp of the mean" in page
    assert (tmp_path / "out" / "ppl_by_point.png").stat().st_size > 10_000

    # the prune jobs are cached: a run to redo does not prune again
    job = sweep.prunes[next(r.prune for r in sweep.runs if r.point == "wanda-50-oneshot")]
    stamp = (job.folder / "report.json").stat().st_mtime_ns
    (Path(points["wanda-50-oneshot"]["run_dirs"][0]) / "summary.json").unlink()
    again = run_sweep(sweep)
    out = capsys.readouterr().out
    assert "19 already done, 1 to run" in out and "1 prune jobs: 1 cached, 0 to run" in out
    assert (job.folder / "report.json").stat().st_mtime_ns == stamp and "pruned " not in out
    assert again["points"]["wanda-50-oneshot"]["val_loss"]["mean"] == points["wanda-50-oneshot"]["val_loss"]["mean"]
