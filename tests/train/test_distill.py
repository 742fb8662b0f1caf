"""Distillation losses against their closed forms: zero when the student is the teacher, and gradients
equal to the hand-derived ones; the config and teacher refusals."""

from __future__ import annotations

import pytest
import torch

from scalesparse.config import config_from_dict
from scalesparse.errors import ConfigError
from scalesparse.train.distill import BlockOutputs, logits_kl, squarehead, teacher_config


def test_both_losses_are_exactly_zero_when_student_is_teacher():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(2, 5, 11, generator=g)
    for T in (1.0, 2.0, 0.5):
        assert logits_kl(z.clone(), z.clone(), T).item() == 0.0
    hs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    assert squarehead([h.clone() for h in hs], hs).item() == 0.0


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_logits_kl_value_and_gradient_match_the_closed_form(T):
    g = torch.Generator().manual_seed(1)
    zs = (2 * torch.randn(2, 3, 7, generator=g)).requires_grad_(True)
    zt = 2 * torch.randn(2, 3, 7, generator=g)
    loss = logits_kl(zs, zt, T)
    loss.backward()
    # reference in float64: T² · mean over the 6 tokens of Σ_v p_t (log p_t − log p_s)
    ps, pt = torch.softmax(zs.detach().double() / T, -1), torch.softmax(zt.double() / T, -1)
    ref = T**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # d/dz_s = T² · (1/N) · (p_s − p_t) / T = T · (p_s − p_t) / N
    n_tokens = 6
    torch.testing.assert_close(zs.grad.double(), T * (ps - pt) / n_tokens, rtol=1e-4, atol=1e-7)


def test_squarehead_value_and_gradient_match_the_closed_form():
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(2, 3, 4, generator=g) * s for s in (0.5, 1.0, 4.0)]  # blocks of different scales
    ss = [(t + 0.3 * torch.randn(t.shape, generator=g)).requires_grad_(True) for t in ts]
    loss = squarehead(ss, ts)
    loss.backward()
    L = len(ts)
    ref = sum(((s.detach().double() - t.double()) ** 2).sum() / (t.double() ** 2).sum() for s, t in zip(ss, ts)) / L
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for s, t in zip(ss, ts, strict=True):  # d/ds^l = 2 (s^l − t^l) / (L · Σ (t^l)²)
        expected = 2 * (s.detach().double() - t.double()) / (L * (t.double() ** 2).sum())
        torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-8)
    # a finite difference on one element agrees too (the formula above is not the only witness)
    eps, i = 0.05, (1, 1, 2, 3)  # block, sequence, token, feature; central: exact for a quadratic
    with torch.no_grad():
        plus = [s.detach().clone() for s in ss]
        minus = [s.detach().clone() for s in ss]
        plus[i[0]][i[1:]] += eps
        minus[i[0]][i[1:]] -= eps
        fd = (squarehead([p.double() for p in plus], ts) - squarehead([m.double() for m in minus], ts)) / (2 * eps)
    assert ss[i[0]].grad[i[1:]].item() == pytest.approx(fd.item(), rel=1e-4)


def test_block_outputs_are_kept_only_while_recording():
    blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
    rec = BlockOutputs(blocks)
    x = torch.randn(2, 3)
    blocks[0](x)  # outside recording: nothing kept (evaluation forwards must not pile up)
    with rec.recording() as outs:
        y = blocks[1](blocks[0](x))
    assert len(outs) == 2 and outs[1] is y
    blocks[0](x)
    assert rec.outputs is None and len(outs) == 2


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"kind": "squarehead"}, "train.distill.teacher: None is not allowed; must name the teacher folder"),
        ({"teacher": "t", "weight": 0}, "train.distill.weight: 0.0 is not allowed; must be in (0, 1]"),
        ({"teacher": "t", "weight": 1.5}, "train.distill.weight: 1.5 is not allowed; must be in (0, 1]"),
        ({"teacher": "t", "temperature": 0}, "train.distill.temperature: 0.0 is not allowed; must be > 0"),
        ({"teacher": "t", "kind": "squarehead", "temperature": 2}, "is used by kind logits only"),
        ({"teacher": "t", "kind": "hidden"}, "train.distill.kind: 'hidden' is not one of 'logits', 'squarehead'"),
    ],
)
def test_config_refusals(distill, message):
    with pytest.raises(ConfigError, match=None) as e:
        config_from_dict({"train": {"distill": distill}})
    assert message in str(e.value)


def test_teacher_path_is_made_absolute_and_off_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = config_from_dict({"train": {"distill": {"teacher": "dense"}}}).train.distill
    assert d.enabled and d.teacher == str(tmp_path / "dense")
    assert not config_from_dict({}).train.distill.enabled


def test_teacher_refusals(tmp_path):
    pytest.importorskip("transformers")
    from tests.model.test_families import VOCAB, T, save_hf

    save_hf("llama", tmp_path / "teacher")
    cfg = config_from_dict({"model": {"seq_len": T}, "train": {"distill": {"teacher": str(tmp_path / "teacher")}}})
    tcfg = teacher_config(cfg, VOCAB, 2, 64)
    assert (tcfg.model.n_layers, tcfg.model.d_model, tcfg.model.vocab_size) == (2, 64, VOCAB)
    with pytest.raises(ConfigError, match=r"train.distill.teacher: .* has 300 vocabulary rows, the student 257"):
        teacher_config(cfg, 257, 2, 64)
    teacher = str(tmp_path / "teacher")
    sq = config_from_dict({"model": {"seq_len": T}, "train": {"distill": {"teacher": teacher, "kind": "squarehead"}}})
    with pytest.raises(ConfigError, match="the teacher has 2 blocks of width 64, the student 3 of width 64"):
        teacher_config(sq, VOCAB, 3, 64)
    teacher_config(cfg, VOCAB, 3, 64)  # logits need no matching depth
    missing = config_from_dict({"model": {"seq_len": T}, "train": {"distill": {"teacher": str(tmp_path / "nope")}}})
    with pytest.raises(ConfigError, match=r"^train.distill.teacher: .*nope is not a folder"):
        teacher_config(missing, VOCAB, 2, 64)
    long = config_from_dict({"model": {"seq_len": 128}, "train": {"distill": {"teacher": str(tmp_path / "teacher")}}})
    with pytest.raises(ConfigError, match="longer than the 64 positions"):
        teacher_config(long, VOCAB, 2, 64)
