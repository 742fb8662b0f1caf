"""What `scalesparse train` says around a run (issue 25's small things): the header of a sparse run,
an interrupt's last checkpoint, a resume with nothing left to do, no empty run folder left by a
refused resume, and the speed of the layout a resumed run ended on. The workers are not needed:
`run_elastic` (the part that starts Ray) is replaced where a test gets that far."""

from __future__ import annotations

import yaml

from scalesparse import cli, launch
from scalesparse.train import driver
from tests.conftest import tiny_config
from tests.test_bad_input import fake_checkpoint


def write(tmp_path, small_data, **sections) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(small_data, tmp_path / "run", **sections)))
    return str(path)


def test_the_header_of_a_sparse_run_and_an_interrupt_name_what_matters(tmp_path, small_data, monkeypatch, capsys):
    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_elastic", interrupted)
    stopped = []  # (the real one would stop this test session's Ray, if another test started it)
    monkeypatch.setattr(launch, "shutdown_ray", lambda: stopped.append(True))
    config = write(tmp_path, small_data, parallel={"workers": 1}, sparsity={"method": "rigl", "sparsity": 0.9})
    assert cli.main(["train", config]) == 130
    out = capsys.readouterr().out
    assert "sparse (rigl, 90% of the sparsified layers):" in out and "M nonzero" in out, out
    assert "| 1 worker, ZeRO-2" in out, out
    assert "interrupted: no checkpoint was written yet" in out, out
    assert stopped, "the workers are stopped before the latest checkpoint is named"


def test_a_resume_with_nothing_left_says_so_without_starting_ray(tmp_path, small_data, monkeypatch, capsys):
    fake_checkpoint(tmp_path / "run", small_data)  # a complete checkpoint at step 3
    (tmp_path / "run" / "summary.json").write_text('{"run_dir": "x", "final_val_loss": 5.0}')
    monkeypatch.setattr(driver, "run_elastic", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))
    assert cli.main(["train", write(tmp_path, small_data, train={"steps": 3}), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do:" in out and "is at step 3, train.steps is 3" in out and "done in" not in out, out


def test_a_refused_resume_leaves_no_empty_run_folder(tmp_path, small_data, capsys):
    assert cli.main(["train", write(tmp_path, small_data), "--resume", str(tmp_path / "nonexistent")]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_final_speed_is_the_last_segments():
    records = [{"step": 2, "tokens_per_s": 100.0}, {"step": 4, "tokens_per_s": 120.0},
               {"step": 4, "resume_from": "step_00000004"}, {"step": 6, "tokens_per_s": 10.0},
               {"step": 8, "tokens_per_s": 60.0}, {"step": 10, "tokens_per_s": 62.0}]  # fmt: skip
    assert driver.final_tokens_per_s(records) == 61.0  # after the resume, its first interval left out
    assert driver.final_tokens_per_s(records[:2]) == 120.0


def test_ray_train_still_has_the_sigint_hook_the_driver_overrides():
    """launch._interruptible replaces Ray Train's SIGINT handler (which exits 1 without a word) through
    this hook; a Ray that renamed it would bring that behaviour back silently (test_interrupt.py, a
    slow test, would fail too): say so here, in the quick subset."""
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None)), "Ray Train's SIGINT hook moved"
