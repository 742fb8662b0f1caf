"""Distillation through the worker loop (in this process, no Ray): a pruned student (its zeros held as
the mask, sparsity.mask_from: weights) learns from the dense teacher it came from; metrics.jsonl logs
the task and distillation losses beside the combined loss; a student equal to its teacher starts at a
distillation loss of exactly 0; the teacher is frozen and outside the optimizer."""

from __future__ import annotations

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.data import prepare_data
from scalesparse.model.pretrained import resolve_pretrained
from scalesparse.train import checkpoint as ckpt
from tests.model.test_families import save_hf
from tests.test_pretrained import run_config
from tests.test_pretrained_masks import pruned_llama

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
W = 0.7


def train(student, teacher, run_dir, small_data, kind: str, sparsity: dict | None = None) -> list[dict]:
    from scalesparse.train.single import train_in_process

    raw = run_config(student, run_dir, small_data)
    raw["train"]["distill"] = {"teacher": str(teacher), "kind": kind, "weight": W,
                               **({"temperature": 2.0} if kind == "logits" else {})}  # fmt: skip
    if sparsity:
        raw["sparsity"] = sparsity
    raw = config_from_dict(raw)
    data = prepare_data(raw.data)
    rows = train_in_process(resolve_pretrained(raw, data.vocab_size), data)
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("kind", ["logits", "squarehead"])
def test_pruned_student_learns_from_its_dense_teacher(kind, tmp_path, small_data):
    save_hf("llama", tmp_path / "dense")  # the same random Llama pruned_llama prunes
    zeros = pruned_llama(tmp_path / "pruned", "unstructured")
    rows = train(tmp_path / "pruned", tmp_path / "dense", tmp_path / "run", small_data, kind,
                 {"method": "static", "mask_from": "weights"})  # fmt: skip
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the logged loss is the combined objective, its parts beside it
        assert r["loss"] == pytest.approx((1 - W) * r["task_loss"] + W * r["distill_loss"], rel=1e-6)
        assert r["distill_loss"] > 1e-3  # half the weights gone: the student is not the teacher
    from scalesparse.export import consolidate

    weights = consolidate(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    for name, z in zeros.items():  # the distillation gradient too is masked: the zeros held
        assert torch.equal(weights[f"{name}.weight"] == 0, z), name


def test_student_equal_to_teacher_starts_at_zero_distillation(tmp_path, small_data):
    save_hf("llama", tmp_path / "dense")
    rows = train(tmp_path / "dense", tmp_path / "dense", tmp_path / "run", small_data, "squarehead")
    first, second = rows
    assert first["distill_loss"] == 0.0  # step 1 logs the forwards before the first update
    assert first["loss"] == pytest.approx((1 - W) * first["task_loss"])
    assert second["distill_loss"] > 0.0  # the task loss moved the student off the teacher


def test_teacher_is_frozen_in_the_workers_dtype(tmp_path):
    from scalesparse.train.distill import build_teacher
    from tests.model.test_families import T, ours_from

    save_hf("llama", tmp_path / "dense")
    student = ours_from(tmp_path / "dense")
    cfg = config_from_dict({"model": {"seq_len": T}, "parallel": {"zero_stage": 2},
                            "train": {"distill": {"teacher": str(tmp_path / "dense")}}})  # fmt: skip
    teacher = build_teacher(cfg, student, torch.device("cpu"), 1)
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in teacher.parameters())
    for (name, p), q in zip(teacher.named_parameters(), student.parameters(), strict=True):
        assert torch.equal(p, q), name  # the same folder: the same weights
