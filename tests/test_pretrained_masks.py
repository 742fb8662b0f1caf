"""A pruned pretrained model keeps exactly its zeros as its static mask (sparsity.mask_from: weights):
through optimizer steps, a checkpoint and a resume, and into the export transformers reloads; the
run's log and the export report each layer's sparsity, equal to the input's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from scalesparse.config import SparsityConfig, config_from_dict
from scalesparse.data import prepare_data
from scalesparse.errors import ConfigError
from scalesparse.export import consolidate, export_checkpoint
from scalesparse.model.pretrained import resolve_pretrained
from scalesparse.sparsity import SPARSIFIERS, LayerView
from scalesparse.train import checkpoint as ckpt
from tests.model.test_families import hf_model
from tests.test_pretrained import run_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

MASKED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def prune(w: torch.Tensor, pattern: str) -> None:
    """Magnitude pruning in place: half of the weights, unstructured or 2 of every 4 inputs."""
    if pattern == "2:4":
        groups = w.view(w.shape[0], -1, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    else:
        w[w.abs() < w.abs().median()] = 0.0


def pruned_llama(folder, pattern: str) -> dict[str, torch.Tensor]:
    """A tiny random Llama with its attention and MLP projections pruned, saved as transformers does;
    returns our layer name → its zero pattern."""
    model = hf_model("llama")
    zeros = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for path in MASKED:
                w = layer.get_submodule(path).weight
                prune(w, pattern)
                zeros[f"layers.{i}.{path}"] = (w == 0).clone()
    model.save_pretrained(folder, safe_serialization=True)
    return zeros


def layer_fractions(zeros: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(z.float().mean()) for n, z in zeros.items()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_loaded_zeros_held_through_steps_resume_and_export(pattern, tmp_path, small_data):
    from scalesparse.train.single import train_in_process

    src = tmp_path / "src"
    zeros = pruned_llama(src, pattern)
    granularity = {"granularity": "nm", "n": 2, "m": 4} if pattern == "2:4" else {}
    raw = run_config(src, tmp_path / "run", small_data)
    raw["sparsity"] = {"method": "static", "mask_from": "weights", "sparsity": 0.9, **granularity}
    raw["checkpoint"] = {"every": 1, "keep": 5}
    raw = config_from_dict(raw)
    data = prepare_data(raw.data)
    cfg = resolve_pretrained(raw, data.vocab_size)
    rows = train_in_process(cfg, data)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # the mask is the input's zeros, layer by layer (not the configured 0.9 of a random mask)
    (masks,) = [r for r in rows if "layer_sparsity" in r]
    expected = layer_fractions(zeros)
    per_layer = {f"layer/{n}": s for n, s in expected.items()}
    assert masks["layer_sparsity"] == pytest.approx(per_layer, abs=1e-6)  # one weight is > 1e-4
    assert masks["sparsity"] == pytest.approx(0.5, abs=0.01)

    def held(folder) -> None:
        weights = consolidate(folder)
        for name, z in zeros.items():
            assert torch.equal(weights[f"{name}.weight"] == 0, z), name

    checkpoints = ckpt.complete_checkpoints(cfg.run_path / "checkpoints")
    assert len(checkpoints) == 2
    for folder in checkpoints:  # after step 1 and after step 2
        held(folder)
    last = checkpoints[-1]
    # training moved the surviving weights (a frozen model would keep its zeros vacuously)
    src_q = transformers.AutoModelForCausalLM.from_pretrained(src).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(consolidate(last)["layers.0.self_attn.q_proj.weight"], src_q)

    # resume from step 2 for one more step: the masks come back from the checkpoint
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3))
    rows = train_in_process(more, data, resume=last)
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    final = ckpt.latest_checkpoint(cfg.run_path / "checkpoints")
    assert final.name != last.name
    held(final)

    out = export_checkpoint(final, tmp_path / "export")
    report = json.loads((out / "scalesparse.json").read_text())["sparsity"]
    assert report["layers"] == pytest.approx(expected, abs=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, z in zeros.items():
        assert torch.equal(hf.get_submodule(f"model.{name}").weight == 0, z), name


def views_of(weights: dict[str, torch.Tensor]) -> list[LayerView]:
    return [LayerView(n, tuple(w.shape), 0, w.view(-1)) for n, w in weights.items()]


def sparsifier(weights: dict[str, torch.Tensor], **cfg):
    c = SparsityConfig(method=cfg.pop("method", "static"), mask_from="weights", **cfg)
    return SPARSIFIERS.get(c.method)(c, {n: tuple(w.shape) for n, w in weights.items()}, 10, 0)


def test_masks_from_weights_are_the_nonzeros_and_refuse_what_does_not_fit():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    prune(w, "2:4")
    sp = sparsifier({"a": w.clone()}, granularity="nm")
    sp.init_masks(views_of({"a": w.clone()}))
    assert torch.equal(sp.masks["a"], w != 0) and sp.mean_sparsity() == 0.5
    rigl = sparsifier({"a": w.clone()}, method="rigl")  # RigL starting from the loaded mask
    rigl.init_masks(views_of({"a": w.clone()}))
    assert torch.equal(rigl.masks["a"], w != 0)
    with pytest.raises(ConfigError, match="no zero weight"):
        sparsifier({"a": torch.ones(8, 16)}).init_masks(views_of({"a": torch.ones(8, 16)}))
    u = torch.randn(8, 16)
    prune(u, "unstructured")  # half zero, but not 2 of every 4
    with pytest.raises(ConfigError, match="not 2:4"):
        sparsifier({"a": u}, granularity="nm").init_masks(views_of({"a": u}))


@pytest.mark.parametrize(
    ("sparsity", "match"),
    [({"method": "snip", "mask_from": "weights"}, "mask_from: .weights.*needs sparsity.method static, set or rigl"),
     ({"method": "static", "mask_from": "weights", "granularity": "block"}, "not blocks"),
     ({"method": "static", "mask_from": "layers"}, "sparsity.mask_from")],
)  # fmt: skip
def test_mask_from_config_refused(sparsity, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"sparsity": sparsity})


def test_mask_from_weights_refused_before_workers(tmp_path):
    from scalesparse.model.pretrained import check_mask_source
    from tests.model.test_families import save_hf

    sparsity = {"method": "static", "mask_from": "weights"}
    with pytest.raises(ConfigError, match="needs starting weights: set model.from_pretrained"):
        check_mask_source(config_from_dict({"sparsity": sparsity}))
    save_hf("llama", tmp_path / "dense")
    cfg = resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(tmp_path / "dense"), "seq_len": 32},
                                               "sparsity": sparsity}))  # fmt: skip
    with pytest.raises(ConfigError, match="has a zero weight .*a dense model") as e:
        check_mask_source(cfg)
    assert "\n" not in str(e.value)
    pruned_llama(tmp_path / "pruned", "2:4")
    check_mask_source(
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, from_pretrained=str(tmp_path / "pruned")))
    )
