"""Under ZeRO-3 the teacher is partitioned like the student (2 gloo processes): each rank holds about
half of every teacher weight, none of it whole outside a forward, and the distillation and task losses
equal those of the plain whole models on that rank's batch; a step trains."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.test_sparse_sync import free_port
from tests.model.test_families import T, ours_from, save_hf, tokens
from tests.test_pretrained_masks import pruned_llama

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
KINDS = ("logits", "squarehead")
W = 0.7


def config(student, teacher, kind: str):
    from scalesparse.config import config_from_dict
    from scalesparse.model.pretrained import resolve_pretrained

    return resolve_pretrained(config_from_dict({
        "model": {"from_pretrained": str(student), "seq_len": T},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
                  "distill": {"teacher": str(teacher), "kind": kind, "weight": W}},
        "parallel": {"workers": 2, "zero_stage": 3},
    }))  # fmt: skip


def _worker(rank: int, world: int, port: int, student: str, teacher: str, out: str) -> None:
    from scalesparse import comm
    from scalesparse.model import GPT
    from scalesparse.model.pretrained import load_pretrained
    from scalesparse.train.distill import Distiller
    from scalesparse.train.engine import build_engine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")  # fmt: skip
    comm.init_group("gloo", rank, world, "127.0.0.1", port)
    res = {}
    for kind in KINDS:
        cfg = config(student, teacher, kind)
        model = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
        load_pretrained(model, student)
        engine = build_engine(model, cfg, world)
        distiller = Distiller.build(cfg, engine, torch.device("cpu"), world)
        x, y = tokens(seed=rank), tokens(seed=10 + rank)
        loss = distiller.loss(engine, x, y)
        t = distiller.teacher
        held = {
            n: (p.ds_tensor.numel(), p.ds_numel, p.numel(), p.requires_grad) for n, p in t.module.named_parameters()
        }
        engine.backward(loss)
        engine.step()
        res[kind] = {"loss": loss.item(), "held": held, "type": type(t).__name__, **distiller.collect()}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_teacher_partitioned_like_the_student_under_zero3(tmp_path):
    from scalesparse.train.distill import logits_kl, squarehead

    save_hf("llama", tmp_path / "dense")
    pruned_llama(tmp_path / "pruned", "unstructured")
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path / "pruned"), str(tmp_path / "dense"), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    student, teacher = ours_from(tmp_path / "pruned"), ours_from(tmp_path / "dense")
    expected = []  # per rank: the plain whole models on that rank's batch
    for rank in range(world):
        x, y = tokens(seed=rank), tokens(seed=10 + rank)
        hs, ht = [], []
        hooks = [b.register_forward_hook(lambda m, a, o, keep=keep: keep.append(o))
                 for model, keep in ((student, hs), (teacher, ht)) for b in model.layers]  # fmt: skip
        with torch.no_grad():
            zs, task = student(x, y)
            zt, _ = teacher(x)
        for h in hooks:
            h.remove()
        expected.append(
            {"task": task.item(), "logits": logits_kl(zs, zt, 1.0).item(), "squarehead": squarehead(hs, ht).item()}
        )
    for kind in KINDS:
        for rank in range(world):
            r, e = got[rank][kind], expected[rank]
            assert r["type"] == "DeepSpeedEngine"
            for name, (local, numel, visible, grad) in r["held"].items():
                assert local <= math.ceil(numel / world), name  # this rank's partition only
                assert visible == 0 and not grad, name  # released after the forward; frozen
            assert r["loss"] == pytest.approx((1 - W) * e["task"] + W * e[kind], rel=1e-5)
            # the logged parts: means over the ranks
            assert r["task_loss"] == pytest.approx(sum(e["task"] for e in expected) / world, rel=1e-5)
            assert r["distill_loss"] == pytest.approx(sum(e[kind] for e in expected) / world, rel=1e-5)
