"""`scalesparse prune` end to end on a scalesparse-exported model (transformers Llama format)."""

import json

import pytest
import torch

from scalesparse.cli import main
from scalesparse.config import ModelConfig, config_from_dict
from scalesparse.data import prepare_data
from scalesparse.export import write_model
from scalesparse.model import GPT


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_data):
    data = config_from_dict({"data": small_data}).data
    prepared = prepare_data(data)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, seq_len=64)
    torch.manual_seed(0)
    model = GPT(cfg, prepared.vocab_size)
    out = tmp_path_factory.mktemp("export")
    write_model({n: p.detach() for n, p in model.named_parameters()}, cfg, prepared.vocab_size, out,
                prepared.tokenizer_path)  # fmt: skip
    return out


def data_args(small_data):
    args = [f"data.cache_dir={small_data['cache_dir']}"] + ([f"data.path={small_data['path']}"] if "path" in small_data
                                                             else [])  # fmt: skip
    small = ["calibration.samples=4", "calibration.seq_len=32", "eval.tokens=320", "eval.window=64",
             "eval.stride=32", "eval.offset=0"]  # fmt: skip
    return [x for a in args + small for x in ("--set", a)]


@pytest.mark.parametrize("method, pattern", [("sparsegpt", None), ("wanda", "2:4")])
def test_prune_cli_saves_a_sparse_transformers_model_and_a_report(exported, small_data, tmp_path, method, pattern):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(exported), "--method", method, "--sparsity", "0.5", "--out", str(out),
            *(["--pattern", pattern] if pattern else []), *data_args(small_data)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ppl_before"] > 1 and report["ppl_after"] > 1
    assert report["eval"]["tokens_scored"] == 319 and len(report["layers"]) == 14
    assert "sliding windows of 64 tokens with stride 32" in (out / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # zeros survive the round trip
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert int((proj.weight == 0).sum()) == proj.weight.numel() // 2
    assert int((model.lm_head.weight == 0).sum()) == 0


def test_bad_inputs_fail_before_work(exported, small_data, tmp_path, capsys):
    def err(*argv):
        assert main(["prune", *data_args(small_data), *argv]) == 2  # argv last: its --set wins
        return capsys.readouterr().err.strip()

    assert "has no config.json" in err("--model", str(tmp_path), "--out", str(tmp_path / "o1"))
    assert not (tmp_path / "o1").exists()  # nothing created for a bad model path
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    assert "is a pickle" in err("--model", str(pickled), "--out", str(tmp_path / "o2"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "exists and is not an empty folder" in err("--model", str(exported), "--out", str(busy))
    assert (busy / "keep.txt").read_text() == "mine"
    assert "calibration.seq_len: 100000000 is longer than the model's context (max_position_embeddings = 64" in err(
        "--model", str(exported), "--out", str(tmp_path / "o3"), "--set", "calibration.seq_len=100000000")
    assert "sparsity: 1.0 is not allowed" in err("--model", str(exported), "--sparsity", "1.0")
    assert "pattern: '4:4' is not allowed; must satisfy 0 < N < M" in err("--model", str(exported), "--pattern", "4:4")
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert "has no weights" in err("--model", str(empty), "--out", str(tmp_path / "o4"))


def test_the_driver_checks_and_hands_over_without_importing_torch(exported, tmp_path):
    """With workers > 1 the `prune` process only checks and hands the work to Ray: it must not pay for
    torch (or transformers). Run in a fresh interpreter up to the Ray connection (no Ray at :9)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from scalesparse.cli import main\n"
        f"rc = main(['prune', '--model', {str(exported)!r}, '--workers', '2', '--address', '127.0.0.1:9',"
        f" '--out', {str(tmp_path / 'o')!r}, '--set', 'calibration.seq_len=32', '--set', 'eval.window=64',"
        " '--set', 'eval.stride=32'])\n"
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "cannot reach 127.0.0.1:9" in r.stderr  # it got as far as the hand-over
    assert r.stdout.split() == ["2", "False", "False"]


def test_a_tokenizer_that_yields_no_tokens_is_named_before_the_model_loads(exported, small_data, tmp_path, capsys):
    """A BPE without an unknown token drops every character it lacks: no calibration tokens at all."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    tok = Tokenizer(models.BPE(vocab={"§": 0}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the check comes first
    assert main(["prune", *data_args(small_data), "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "turns the calibration text (" in err and "into no tokens" in err, err


def test_the_report_of_a_run_without_evaluation_states_no_protocol():
    from scalesparse.pruning.job import _markdown

    r = {"method": "wanda", "pattern": None, "sparsity": 0.5, "model": "m", "ppl_before": None, "ppl_after": None,
         "prune_seconds": 1.0, "layers": [], "pruned_fraction_of_pruned_layers": 0.5,
         "eval": {"docs": ["hamlet"], "offset": 0, "tokens": 0, "window": 512,
         "stride": 256}, "calibration": {"samples": 4, "seq_len": 32, "docs": ["tempest"], "seed": 0}}  # fmt: skip
    text = _markdown(r)
    assert "Perplexity not evaluated (eval.tokens = 0)" in text and "sliding windows" not in text


def test_prune_with_owl_reports_each_blocks_sparsity(exported, small_data, tmp_path):
    out = tmp_path / "owl"
    argv = ["prune", "--model", str(exported), "--method", "wanda", "--sparsity", "0.5", "--out", str(out),
            *data_args(small_data), "--set", "layer_sparsity=owl", "--set", "eval.tokens=0"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["block_sparsity"]) == 2 and sum(report["block_sparsity"]) / 2 == pytest.approx(0.5)
    assert report["pruned_fraction_of_pruned_layers"] == pytest.approx(0.5, abs=0.01)
    assert "Layer sparsity: OWL (m = 5, λ = 0.08)" in (out / "report.md").read_text()


def test_a_failed_attempts_log_does_not_block_the_next(tmp_path):
    """`prune --workers N` logs into OUT/prune.log as it runs: a failed attempt leaves that file alone
    there, and the corrected command must still be accepted (anything else in OUT is refused)."""
    from scalesparse.errors import ConfigError
    from scalesparse.pruning.job import LOG, _check_out

    out = tmp_path / "out"
    out.mkdir()
    (out / LOG).write_text("attempt 1\n")
    _check_out(out)
    (out / "model.safetensors").write_text("")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        _check_out(out)
