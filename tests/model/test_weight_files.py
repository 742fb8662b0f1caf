"""Reading a folder's weights a byte range at a time: the same values as the safetensors library's own
reader for every dtype and range, exactly the bytes asked for, a clear error for a damaged file, and,
for every family, a parameter's flat layout laid out by flat_names as from_hf builds it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalesparse.errors import CheckpointError
from scalesparse.model.weight_files import SafetensorsShard, WeightFiles

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(7, 13, generator=g) * 50
        out[f"t{i}"] = (x > 0) if dtype is torch.bool else x.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_every_dtype_and_range_reads_as_the_library_does(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tensors(), str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    shard = SafetensorsShard(path)
    assert set(shard.keys()) == set(want)
    for name, t in want.items():
        assert shard.shape(name) == tuple(t.shape)
        got = shard.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
        flat = t.reshape(-1)
        for start, length in ((0, 1), (5, 17), (flat.numel() - 3, 3), (0, flat.numel())):
            if 0 <= start and start + length <= flat.numel():
                before = shard.bytes_read
                assert torch.equal(shard.read(name, start, length), flat[start : start + length]), (name, start)
                assert shard.bytes_read - before == length * t.element_size()  # only what was asked


def test_read_flat_spans_tensors_end_to_end(tmp_path):
    parts = {f"w{i}": torch.randn(3 + i, 5) for i in range(3)}
    save_file(parts, str(tmp_path / "a.safetensors"))
    files = WeightFiles(tmp_path)
    whole = torch.cat([parts[n].reshape(-1) for n in ("w2", "w0", "w1")])
    for start, length in ((0, whole.numel()), (10, 30), (24, 1), (whole.numel() - 7, 7)):
        got = files.read_flat(["w2", "w0", "w1"], start, torch.full((length,), float("nan")))
        assert torch.equal(got, whole[start : start + length])
        as_f64 = files.read_flat(["w2", "w0", "w1"], start, torch.empty(length, dtype=torch.float64))
        assert torch.equal(as_f64, whole[start : start + length].double())  # converted on the way
    with pytest.raises(CheckpointError, match="fewer than"):
        files.read_flat(["w0"], 10, torch.empty(100))


def test_a_damaged_file_names_itself(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # truncated inside the tensor
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor w's bytes do not match"):
        SafetensorsShard(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": "64x64"}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor w's header entry is malformed"):
        SafetensorsShard(path)
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SafetensorsShard(path)


def test_an_index_naming_a_missing_shard_says_which(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = WeightFiles(tmp_path)
    assert torch.equal(files.get("a"), torch.ones(2))
    with pytest.raises(CheckpointError, match=r"shard two\.safetensors \(holding b\) is missing"):
        files.get("b")


FLAT_CASES = ["llama", "llama-tied", "mistral", "qwen2", "mixtral", "upcycled"]


@pytest.mark.parametrize("case", FLAT_CASES)
def test_flat_names_lay_out_each_parameter_as_from_hf_builds_it(case, tmp_path):
    """What lets a ZeRO-3 rank read only its partition: for every parameter of every family, the
    named tensors flattened end to end are from_hf's result flattened."""
    pytest.importorskip("transformers")
    from scalesparse.config import config_from_dict
    from scalesparse.model import GPT
    from scalesparse.model.pretrained import adapter, family_of, read_hf_config, resolve_pretrained
    from scalesparse.model.weight_files import where_of
    from tests.model.test_families import save_hf

    upcycled = case == "upcycled"
    save_hf("llama" if upcycled else case, tmp_path)
    cfg = resolve_pretrained(config_from_dict({
        "model": {"from_pretrained": str(tmp_path), "seq_len": 32, **({"mlp": "moe"} if upcycled else {})},
        "moe": {"num_experts": 4, "top_k": 2} if upcycled else {}}))  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg.model, cfg.model.vocab_size, cfg.moe)
    family = adapter(family_of(read_hf_config(tmp_path), where_of(tmp_path)), model)
    files = WeightFiles(tmp_path)
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        hf_names = family.hf_names(name, shape)
        if not hf_names:  # only an upcycled router is not in the checkpoint
            assert upcycled and ".router." in name, name
            continue
        built = family.from_hf(name, [files.get(n) for n in hf_names]).reshape(-1)
        laid = files.read_flat(family.flat_names(name, shape), 0, torch.empty(math.prod(shape), dtype=built.dtype))
        assert torch.equal(laid, built), name
