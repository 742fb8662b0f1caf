"""Bad input across train, submit, export, prune and config show: each exits non-zero with one readable line
naming the culprit, no traceback, fast, and without touching existing checkpoints.

Run with `-s` to print the table (id | message) that the README's error section quotes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from scalesparse import cli
from scalesparse.config import config_from_dict
from scalesparse.train import checkpoint as ckpt
from tests.conftest import tiny_config
from tests.data.helpers import data_config, own_data_config


def fake_checkpoint(run_dir: Path, small_data: dict, **model) -> Path:
    """A complete checkpoint (manifest and all) as the driver sees it; shards are never read before the checks."""
    folder = run_dir / "checkpoints" / ckpt.tag_for(3)
    folder.mkdir(parents=True)
    cfg = config_from_dict(tiny_config(small_data, run_dir, model=model)).to_dict()
    state = {"step": 3, "samples_seen": 24, "config": cfg, "vocab_size": 512, "world_size": 2, "zero_stage": 2}
    (folder / ckpt.STATE).write_text(json.dumps(state))
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 4096)
    ckpt.write_manifest(folder, 3)
    (run_dir / "checkpoints" / ckpt.LATEST).write_text(folder.name)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Case:
    def __init__(self, tmp: Path, small_data: dict) -> None:
        self.tmp, self.data = tmp, small_data

    def config(self, name="run.yaml", text=None, run_dir=None, **sections) -> str:
        path = self.tmp / name
        if text is None:
            text = yaml.safe_dump(tiny_config(self.data, run_dir or self.tmp / "run", **sections))
        path.write_text(text)
        return str(path)

    def model_folder(self, files: dict[str, str]) -> str:
        folder = self.tmp / "model"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        return str(folder)


# a model folder that passes the cheap checks (nothing reads the files' contents before them)
MODEL_FILES = {"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"}

# id → (build argv from a Case, text the message must contain)
CASES = {
    "train: malformed YAML": (lambda c: ["train", c.config(text="model: {d_model: 64\n")], "malformed YAML"),
    "train: unknown key": (lambda c: ["train", c.config(train={"lrr": 1e-3})],
                           "train.lrr: unknown key (did you mean 'lr'?)"),
    "train: wrong type": (lambda c: ["train", c.config(train={"steps": "ten"})], "train.steps"),
    "train: negative LR": (lambda c: ["train", c.config(train={"lr": -0.1})], "train.lr: -0.1"),
    "train: sparsity >= 1": (lambda c: ["train", c.config(sparsity={"method": "rigl", "sparsity": 1.0})],
                             "sparsity.sparsity: 1.0"),
    "train: top_k > num_experts": (lambda c: ["train", c.config(model={"mlp": "moe"},
                                                                 moe={"num_experts": 4, "top_k": 5})], "top_k"),
    "train: ZeRO stage 4": (lambda c: ["train", c.config(parallel={"zero_stage": 4})], "parallel.zero_stage: 4"),
    "train: workers 0": (lambda c: ["train", c.config(parallel={"workers": 0})], "parallel.workers: 0"),
    "train: megablocks on CPU": (lambda c: ["train", c.config(model={"mlp": "moe"}, moe={"backend": "megablocks"})],
                                 "megablocks needs CUDA"),
    "train: bad --set": (lambda c: ["train", c.config(), "--set", "train.lr"], "train.lr"),
    "train: missing config": (lambda c: ["train", str(c.tmp / "nope.yaml")], "nope.yaml: config file not found"),
    "train: unreachable Ray": (lambda c: ["train", c.config(), "--address", "127.0.0.1:9"],
                               "cannot reach 127.0.0.1:9"),
    "train: run_dir not writable": (lambda c: ["train", c.config(run_dir=Path(c.config("a_file")) / "sub")],
                                    "run_dir: cannot write to"),
    "train: run exists, no --resume": (lambda c: (fake_checkpoint(c.tmp / "run", c.data), ["train", c.config()])[1],
                                       "already holds checkpoints; pass --resume auto"),
    "train: truncated checkpoint": (
        lambda c: (fake_checkpoint(c.tmp / "run", c.data) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
            b"\0" * 100) and ["train", c.config(), "--resume", "auto"],
        "zero_pp_rank_0_mp_rank_00_optim_states.pt: truncated"),
    "train: checkpoint of another shape": (
        lambda c: (fake_checkpoint(c.tmp / "run", c.data, d_model=128), ["train", c.config(), "--resume", "auto"])[1],
        "another model shape (model.d_model = 128 there, 64 here)"),
    "train: old checkpoint, other layout": (
        lambda c: (fake_checkpoint(c.tmp / "run", c.data), ["train", c.config(parallel={"workers": 1}), "--resume",
                                                            "auto"])[1],  # fmt: skip
        "train.init_from=DIR"),
    "train: init_from not an export": (lambda c: ["train", c.config(train={"init_from": str(c.tmp)})],
                                       "not an exported model"),
    "submit: unreachable address": (lambda c: ["submit", c.config(), "--address", "http://127.0.0.1:9"],
                                    "cannot reach 127.0.0.1:9"),
    "submit: ray:// address": (lambda c: ["submit", c.config(), "--address", "ray://127.0.0.1:10001"],
                               "give the dashboard's http://HOST:8265 address"),
    "submit: unknown key": (lambda c: ["submit", c.config(model={"d_modle": 64})],
                            "model.d_modle: unknown key (did you mean 'd_model'?)"),
    "export: missing checkpoint": (lambda c: ["export", str(c.tmp / "nothing"), "--out", str(c.tmp / "o")],
                                   "nothing: no checkpoint here"),
    "export: altered shard": (
        lambda c: (fake_checkpoint(c.tmp / "run", c.data) / ckpt.STATE).write_text("{}") and
        ["export", str(c.tmp / "run"), "--out", str(c.tmp / "o")], "trainer_state.json: truncated or altered"),
    "prune: sparsity 1": (lambda c: ["prune", "--model", str(c.tmp), "--sparsity", "1", "--out", str(c.tmp / "o")],
                          "sparsity: 1.0"),
    "prune: N >= M": (lambda c: ["prune", "--model", str(c.tmp), "--pattern", "4:4", "--out", str(c.tmp / "o")],
                      "pattern"),
    "prune: unknown method": (lambda c: ["prune", "--model", str(c.tmp), "--method", "obs", "--out",
                                         str(c.tmp / "o")], "method: 'obs'"),  # fmt: skip
    "prune: no weights": (lambda c: ["prune", "--model", c.model_folder({"config.json": "{}"}), "--out",
                                     str(c.tmp / "o")], "has no weights"),  # fmt: skip
    "prune: pickle refused": (lambda c: ["prune", "--model", c.model_folder({"config.json": "{}",
                                         "pytorch_model.bin": "x"}), "--out", str(c.tmp / "o")],
                              "is a pickle, which can run code"),  # fmt: skip
    "prune: out not empty": (lambda c: ["prune", "--model", c.model_folder(MODEL_FILES),
                                        "--out", c.config()], "exists and is not an empty folder"),
    "prune: no Ray there": (lambda c: ["prune", "--model", c.model_folder(MODEL_FILES),
                                          "--workers", "2", "--address", "127.0.0.1:9", "--out", str(c.tmp / "o")],
                               "--address 127.0.0.1:9: cannot reach"),  # fmt: skip
    "prune: config.json not JSON": (lambda c: ["prune", "--model", c.model_folder({**MODEL_FILES, "config.json": "{x"}),
                                               "--out", str(c.tmp / "o")], "config.json is not valid JSON (line 1"),
    "prune: no tokenizer": (lambda c: ["prune", "--model", c.model_folder({"config.json": "{}", "m.safetensors": ""}),
                                       "--out", str(c.tmp / "o")], "has no tokenizer (looked for tokenizer.json"),
    "prune: window past the context": (
        lambda c: ["prune", "--model", c.model_folder({**MODEL_FILES,
                                                       "config.json": '{"max_position_embeddings": 256}'}),
                   "--out", str(c.tmp / "o")],  # fmt: skip
        "eval.window: 512 is longer than the model's context (max_position_embeddings = 256"),
    "prune: calibration past the context": (
        lambda c: ["prune", "--model", c.model_folder({**MODEL_FILES, "config.json": '{"n_positions": 128}'}),
                   "--out", str(c.tmp / "o")],
        "calibration.seq_len: 256 is longer than the model's context (n_positions"),
    "prune: unknown device": (lambda c: ["prune", "--model", str(c.tmp), "--device", "gpu", "--out", str(c.tmp / "o")],
                              "device: 'gpu' is not allowed; must be cpu, cuda or cuda:N"),
    "train: GPUs this machine lacks": (lambda c: ["train", c.config(resources={"gpus_per_worker": 8})],
                                       "resources.gpus_per_worker: 2 workers × 8 GPU need 16 GPUs; this machine has"),
    "train: empty config": (lambda c: ["train", c.config(text="# only a comment\n")], "the config file is empty"),
    "config show: empty config": (lambda c: ["config", "show", c.config(text="")], "the config file is empty"),
    "prune: cpus_per_worker 0": (lambda c: ["prune", "--model", str(c.tmp), "--set", "cpus_per_worker=0", "--out",
                                            str(c.tmp / "o")], "cpus_per_worker: 0"),  # fmt: skip
    "train: data path matches nothing": (lambda c: ["train", own_data_config(c, {}, pattern="nowhere/*.jsonl")],
                                         "nowhere/*.jsonl matches no file"),
    "train: empty data file": (lambda c: ["train", own_data_config(c, {"a.jsonl": b""})], "a.jsonl is empty"),
    "train: JSONL without the text field": (
        lambda c: ["train", own_data_config(c, {"a.jsonl": b'{"body": "x", "id": 1}\n'})],
        "has no field 'text' (fields: body, id); set data.sources[0].text_field"),
    "train: JSONL line not JSON": (lambda c: ["train", own_data_config(c, {"a.jsonl": b'{"text": "ok"}\n{"text": \n'})],
                                   "a.jsonl: line 2 is not JSON"),
    "train: non-UTF-8 text": (lambda c: ["train", own_data_config(c, {"a.txt": b"caf\xe9 au lait", "b.txt": b"ok"})],
                              "a.txt: not UTF-8 at byte 3; fix the file or set data.encoding_errors: replace"),
    "train: tokenizer folder without tokenizer": (
        lambda c: ["train", own_data_config(c, {"a.jsonl": b'{"text": "x"}\n'}, tokenizer="hf",
                                            tokenizer_path=str(Path(c.config("README.md", text="")).parent))],
        "has no tokenizer files (looked for tokenizer.json"),
    "train: tokenizer larger than the embedding": (
        lambda c: ["train", own_data_config(c, {"a.jsonl": b'{"text": "x"}\n'}), "--set", "model.vocab_size=200"],
        "model.vocab_size: 200 embedding rows cannot hold the tokenizer's 257 tokens"),
    "train: hub dataset offline": (
        lambda c: ["train", data_config(c, sources=[{"hub": "someone/corpus"}], val_fraction=0.1)],
        "point data.sources[0].path at the local files"),
    "train: mask_from weights without starting weights": (
        lambda c: ["train", c.config(sparsity={"method": "static", "mask_from": "weights"})],
        "sparsity.mask_from: weights needs starting weights: set model.from_pretrained"),
    "train: mask_from weights with a method that makes its own mask": (
        lambda c: ["train", c.config(sparsity={"method": "gmp", "mask_from": "weights"})],
        "sparsity.mask_from: 'weights' is not allowed; it needs sparsity.method static, set or rigl (not gmp)"),
    "prune: owl with an N:M pattern": (lambda c: ["prune", "--model", str(c.tmp), "--pattern", "2:4", "--set",
                                                  "layer_sparsity=owl", "--out", str(c.tmp / "o")],
                                       "owl sets a sparsity per block"),  # fmt: skip
    "prune: owl spread past [0, 1]": (lambda c: ["prune", "--model", str(c.tmp), "--sparsity", "0.05", "--set",
                                                 "layer_sparsity=owl", "--out", str(c.tmp / "o")],
                                      "would take some block beyond [0, 1] around sparsity 0.05"),  # fmt: skip
    "config show: a folder": (lambda c: ["config", "show", str(c.tmp)], "is a folder; name a YAML config file"),
}


@pytest.fixture(scope="module")
def warm_data(small_data):
    """The corpus prepared once before the cases are timed: a check that comes after data preparation
    (a checkpoint's, which needs the vocabulary) must be fast on a warm cache, which the 15 s bound
    measures; preparing a cold cache (~15 s on 2 busy cores) is not the check's cost."""
    from scalesparse.config import DataConfig
    from scalesparse.data import prepare_data

    prepare_data(DataConfig(**small_data))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_in_one_line_naming_the_culprit(case, tmp_path, small_data, warm_data, capsys):
    make_argv, expected = CASES[case]
    argv = make_argv(Case(tmp_path, small_data))
    before = snapshot(tmp_path / "run" / "checkpoints") if (tmp_path / "run" / "checkpoints").exists() else {}
    t0 = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    with capsys.disabled():
        print(f"\n| {case} | `{err}` |")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("scalesparse: error: "), err
    assert "Traceback" not in err
    assert expected in err, err
    assert elapsed < 15, f"took {elapsed:.1f} s: the check must come before expensive work"
    if before:
        assert snapshot(tmp_path / "run" / "checkpoints") == before  # existing checkpoints untouched


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lrr: 1}\n")
    from scalesparse.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lrr"):
        cli.main(["--debug", "train", str(path)])


def test_there_are_at_least_twenty_cases_over_every_command():
    assert len(CASES) >= 20
    assert {case.split(":")[0] for case in CASES} == {"train", "submit", "export", "prune", "config show"}


def test_debug_works_after_the_subcommand_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lrr: 1}\n")
    from scalesparse.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lrr"):
        cli.main(["train", str(path), "--debug"])
    with pytest.raises(ConfigError, match="is a folder; name a YAML config file"):
        cli.main(["config", "show", str(tmp_path), "--debug"])
    assert cli.main(["config", "show", str(tmp_path)]) == 2  # without --debug: the one-line error


def test_every_case_has_its_row_in_the_doc():
    """docs/bad-input.md is generated from these cases (python -m tests.write_bad_input_doc)."""
    from tests.write_bad_input_doc import DOC

    rows = {line.split(" | ")[0].removeprefix("| ") for line in DOC.read_text().splitlines() if line.startswith("| ")}
    missing = [case for case in CASES if case not in rows]
    assert not missing, f"no row in {DOC.name} for {missing}: run python -m tests.write_bad_input_doc"


def test_one_worker_one_gpu_is_said_in_the_singular():
    from scalesparse import launch
    from scalesparse.errors import ScalesparseError

    with pytest.raises(ScalesparseError, match="^resources.gpus_per_worker: 1 worker × 1 GPU needs 1 GPU; this"):
        launch.check_gpus(1, 1, None, visible=0)
