"""`scalesparse sweep` and `scalesparse report` end to end: real runs as Ray tasks, resumability,
reported failures, aggregation over seeds, and an HTML page that Chromium renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from scalesparse import cli
from scalesparse.config import config_from_dict
from scalesparse.errors import ConfigError
from scalesparse.sweep import check_difference, load_sweep
from scalesparse.train.driver import model_summary
from tests.conftest import tiny_config


def write_sweep(tmp_path, small_data, **spec):
    base = tiny_config(small_data, tmp_path / "unused", parallel={"workers": 1, "zero_stage": 0},
                       sparsity={"method": "rigl", "sparsity": 0.8, "update_interval": 2})  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "mini", "base": "base.yaml", "out": str(tmp_path / "out"), **spec}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "sweep.yaml"


def test_runs_differ_from_the_base_only_in_their_own_keys(tmp_path, small_data):
    path = write_sweep(tmp_path, small_data, grid={"sparsity.method": ["static", "set"], "train.lr": [1e-3, 5e-3]},
                       baselines=["dense", "small_dense"], seeds=[0, 1, 2])  # fmt: skip
    sweep = load_sweep(path)
    assert list(sweep.points)[:2] == ["small_dense", "dense"]
    assert "method=set,lr=0.001" in sweep.points
    assert len(sweep.runs) == len(sweep.points) * 3
    base = config_from_dict(sweep.base)
    for r in sweep.runs:
        cfg = config_from_dict(r.config)
        assert check_difference(base, cfg, r.changes, r.point) == r.changes
        assert cfg.seed == r.seed and cfg.run_path == sweep.out / "runs" / r.run_id
    # small dense: the dense width whose parameters match the sparse model's nonzeros best
    small = config_from_dict(next(r.config for r in sweep.runs if r.point == "small_dense"))
    sparse = config_from_dict(next(r.config for r in sweep.runs if r.point.startswith("method=static")))
    want = model_summary(sparse, 512)["params_nonzero_non_embedding"]
    got = model_summary(small, 512)["params_non_embedding"]
    wider_cfg = {**small.to_dict(), "model": {**small.to_dict()["model"], "d_model": small.model.d_model + 8}}
    wider = model_summary(config_from_dict(wider_cfg), 512)["params_non_embedding"]
    assert small.model.d_model < sparse.model.d_model and abs(got - want) <= abs(wider - want)

    stray = config_from_dict({**sweep.runs[0].config, "train": {**sweep.runs[0].config["train"], "lr": 0.5}})
    with pytest.raises(ConfigError, match="differs from the base in train.lr, which it does not declare"):
        check_difference(base, stray, sweep.runs[0].changes, "x")


@pytest.mark.parametrize("spec, message", [
    ({"grids": {}}, "grids: unknown sweep key (did you mean 'grid'?)"),
    ({"grid": {"sparsity.method": "rigl"}}, "grid.sparsity.method: must be a non-empty list"),
    ({"grid": {"sparsity.methd": ["rigl"]}},  # named where the user wrote it, not as a point
     "grid (sparsity.methd: rigl): sparsity.methd: unknown key (did you mean 'method'?)"),
    ({"baselines": ["tiny"]}, "baselines: 'tiny' is not one of dense, small_dense"),
    ({"grid": {"sparsity.method": ["rigl"]}, "seeds": 3}, "seeds: must be a non-empty list of integers"),
])  # fmt: skip
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, small_data, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(write_sweep(tmp_path, small_data, **spec))


def test_tables_show_a_spread_only_where_there_is_one():
    from scalesparse.sweep import format_table

    def point(values):
        n = len(values)
        stat = {"mean": sum(values) / n, "std": 0.0 if n == 1 else 0.01, "n": n}
        return {"val_loss": stat, "val_ppl": stat, "tokens_per_s": {**stat, "mean": 11420.0}, "peak_mem_mb": stat,
                "params": 1e6, "params_nonzero": 1e5, "params_active": 1e6, "flops_per_token_train_sparse": 1e7,
                "position": "p"}  # fmt: skip

    table = format_table({"points": {"one": point([4.8]), "three": point([4.8, 4.81, 4.79])}})
    one, three = table.splitlines()[2:]
    assert "±" not in one and "4.800 (n=1)" in one  # a std of one seed is unknown, not 0.000
    assert "4.800 ± 0.010 (n=3)" in three and "11,420 ± 0" in three


def test_expert_load_of_a_run_with_one_log_step_draws_without_warnings(tmp_path):
    import json
    import warnings

    from scalesparse.report.curves import plot_expert_load

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "expert_load": [[0.5, 0.5], [0.25, 0.75]]}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_expert_load(tmp_path).is_file()


def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed for the report screenshot (`make test` installs it as root)"
    return found


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_runs_resumes_reports_failures_and_renders(tmp_path, small_data, ray_session, capsys):
    path = write_sweep(tmp_path, small_data, grid={"sparsity.method": ["static", "rigl"]}, baselines=["small_dense"],
                       points={"broken": {"data.path": str(tmp_path / "missing.tar.gz")}}, seeds=[0, 1],
                       max_concurrent=2)  # fmt: skip
    assert cli.main(["sweep", str(path)]) == 1  # a failed run fails the sweep
    out = capsys.readouterr().out
    assert "rigl-seed1                   differs from the base in: sparsity.method=rigl, seed=1" in out
    assert "warning: 2 seed(s); a fair comparison wants at least 3" in out
    assert "FAILED broken-seed0: " in out and "missing.tar.gz" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(f["run_id"] for f in results["failed"]) == ["broken-seed0", "broken-seed1"]
    for label in ("small_dense", "static", "rigl"):
        p = results["points"][label]
        assert p["val_loss"]["n"] == 2 and p["val_loss"]["std"] > 0  # seeds differ
        assert p["tokens_per_s"]["mean"] > 0 and p["peak_mem_mb"]["mean"] > 100
    assert results["points"]["rigl"]["position"] == "during training, sparse-to-sparse, dynamic mask, unstructured"
    assert results["points"]["static"]["params_nonzero"] < results["points"]["static"]["params"]
    assert (results["points"]["rigl"]["flops_per_token_train_sparse"]
            > results["points"]["static"]["flops_per_token_train_sparse"])  # RigL's periodic dense gradient

    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*/summary.json")}
    assert len(done) == 6
    assert cli.main(["sweep", str(path)]) == 1  # the broken point still fails...
    assert "6 already done, 2 to run" in capsys.readouterr().out  # ...and nothing else is redone
    assert {p: p.stat().st_mtime_ns for p in done} == done

    assert cli.main(["report", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out"
    for name in ("loss_curves", "ppl_vs_sparsity", "throughput_vs_sparsity", "layer_sparsity", "dst_dynamics"):
        assert (folder / f"{name}.png").stat().st_size > 10_000, name
    page = (folder / "report.html").read_text()
    assert page.count("<img") == 5 and "FAILED broken-seed0" in page and "small_dense" in page
    shot = tmp_path / "shot.png"
    subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2000", f"--screenshot={shot}", (folder / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05  # not a blank page: text, a table and figures were drawn


@pytest.mark.slow
@pytest.mark.distributed
def test_report_of_a_single_run(tmp_path, small_data, ray_session):
    from scalesparse.train.driver import run_training

    run = tmp_path / "run"
    run_training(config_from_dict(tiny_config(small_data, run, model={"mlp": "moe"}, parallel={"workers": 1},
                                              moe={"num_experts": 4, "top_k": 2})))  # fmt: skip
    assert cli.main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("<img") == 2 and "final_val_loss" in page  # loss curve + expert load
    assert (run / "expert_load.png").stat().st_size > 10_000
