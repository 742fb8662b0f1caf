import subprocess
import sys
from pathlib import Path

import pytest

from scalesparse.config import Config, config_from_dict, load_config
from scalesparse.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def err(data, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    return str(e.value)


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.parent.name == "sweeps":  # (before prune-*: configs/sweeps/prune-recover.yaml is a sweep)
        from scalesparse.sweep import load_sweep

        assert load_sweep(path).runs  # every run's config validated
    elif path.name.startswith("prune-"):
        from scalesparse.config import PruneConfig, load_prune_config

        assert isinstance(load_prune_config(path), PruneConfig)
    else:
        assert isinstance(load_config(path), Config)


def test_defaults_round_trip_through_dict():
    cfg = config_from_dict({"train": {"lr": 3e-4}, "data": {"val_docs": ["lear"]}})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.data.val_docs == ("lear",)


def test_unknown_key_names_path_and_suggests():
    msg = err({"train": {"lrr": 1.0}})
    assert msg.startswith("train.lrr: unknown key (did you mean 'lr'?)")
    assert "allowed keys:" in msg and "warmup_steps" in msg
    assert "did you mean 'model'" in err({"modle": {}})


def test_wrong_type_and_literal_values():
    assert err({"model": {"d_model": "wide"}}) == "model.d_model: 'wide' is not an integer"
    assert err({"model": {"activation": "relu"}}) == "model.activation: 'relu' is not one of 'gelu', 'swiglu'"
    assert "is not true or false" in err({"model": {"bias": 1}})
    assert "model: 3 is not a mapping" in err({"model": 3})


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"lr": -0.1}}, "train.lr: -0.1 is not allowed; must be > 0"),
        ({"parallel": {"zero_stage": 4}}, "parallel.zero_stage: 4 is not allowed; must be one of 0, 1, 2, 3"),
        ({"parallel": {"workers": 0}}, "parallel.workers: 0 is not allowed; must be > 0"),
        ({"train": {"beta2": 1.0}}, "train.beta2: 1.0 is not allowed; must be in [0, 1)"),
        ({"model": {"d_model": 100, "n_heads": 3}}, "model.n_heads: 3 is not allowed; must divide d_model (100)"),
        ({"train": {"global_batch_size": 30, "micro_batch_size": 8}}, "train.global_batch_size: 30 is not allowed"),
        ({"train": {"dtype": "bf16"}}, "train.dtype: 'bf16' is not allowed; bf16 needs"),
        ({"model": {"mlp": "moe"}, "moe": {"top_k": 9}}, "moe.top_k: 9 is not allowed; must be <= moe.num_experts (8)"),
        ({"model": {"mlp": "moe"}, "moe": {"expert_parallel": 4}, "parallel": {"workers": 2}},
         "moe.expert_parallel: 4 is not allowed; must be 1 or parallel.workers (2)"),
        ({"model": {"mlp": "moe"}, "moe": {"expert_parallel": 2}, "parallel": {"workers": 2, "zero_stage": 3}},
         "moe.expert_parallel: 2 is not allowed; needs parallel.zero_stage <= 2"),
        ({"model": {"mlp": "moe"}, "moe": {"expert_parallel": 2, "capacity_factor": 1.0}, "parallel": {"workers": 2}},
         "moe.expert_parallel: 2 is not allowed; is dropless only"),
        ({"model": {"mlp": "moe"}, "moe": {"expert_parallel": 2, "backend": "loop"}, "parallel": {"workers": 2}},
         "moe.expert_parallel: 2 is not allowed; runs grouped or megablocks kernels; moe.backend loop cannot"),
        ({"sparsity": {"sparsity": 1.0}}, "sparsity.sparsity: 1.0 is not allowed; must be in [0, 1)"),
        ({"sparsity": {"granularity": "nm", "n": 4, "m": 4}}, "sparsity.n: 4 is not allowed; must satisfy 0 < N < M"),
    ],
)
def test_out_of_range_values(data, expected):
    assert err(data).startswith(expected)


def test_overrides_parse_yaml_values_and_floats_without_dot():
    cfg = config_from_dict({}, ["train.lr=3e-4", "parallel.zero_stage=3", "data.val_docs=[lear, othello]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.parallel.zero_stage == 3
    assert cfg.data.val_docs == ("lear", "othello")
    assert "train.nope: unknown key" in err({}, ["train.nope=1"])
    assert "expected KEY.PATH=VALUE" in err({}, ["train.lr"])
    assert "train.lr is 0.1, not a mapping" in err({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_n_of_m_patterns_stay_strings_not_base_60_integers(tmp_path):
    from scalesparse.config import load_prune_config

    assert load_prune_config(None, ["model=m", "pattern=2:4"]).nm == (2, 4)
    f = tmp_path / "p.yaml"
    f.write_text("model: m\npattern: 4:8\nsparsity: 0.5\n")
    assert load_prune_config(f).nm == (4, 8)
    assert config_from_dict({}, ["train.steps=0x10"]).train.steps == 16  # other integer forms still work


def test_n_of_m_groups_must_fit_sparsegpt_column_blocks():
    from scalesparse.config import load_prune_config

    with pytest.raises(ConfigError, match="blocksize: 12 is not allowed; must be a multiple of M = 8 with pattern 4:8"):
        load_prune_config(None, ["model=m", "pattern=4:8", "blocksize=12"])
    assert load_prune_config(None, ["model=m", "pattern=4:8", "blocksize=16"]).blocksize == 16


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_tags_are_never_constructed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(evil)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  stesp: 10\n")
    for argv in (["config", "show", str(bad)], ["train", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "scalesparse.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert lines == ["scalesparse: error: train.stesp: unknown key (did you mean 'steps'?); allowed keys: "
                         + ", ".join(f for f in Config.__dataclass_fields__["train"].default_factory()
                                     .__dataclass_fields__)]  # fmt: skip


def test_config_show_resolves_defaults_and_overrides(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scalesparse.cli", "config", "show", str(REPO / "configs/tiny.yaml"),
         "--set", "train.lr=3e-4"], capture_output=True, text=True, check=True)  # fmt: skip
    shown = config_from_dict(__import__("yaml").safe_load(proc.stdout))
    assert shown == load_config(REPO / "configs/tiny.yaml", ["train.lr=3e-4"])
    assert shown.train.lr == pytest.approx(3e-4)


def test_bf16_on_a_gpu_without_bfloat16_units_is_refused_in_one_line():
    from scalesparse.train.driver import check_bf16

    cfg = config_from_dict({"train": {"dtype": "bf16"}, "resources": {"gpus_per_worker": 1}})
    with pytest.raises(ConfigError, match=r"^train.dtype: bf16 needs a GPU with bfloat16 units .* Tesla V100"):
        check_bf16(cfg, supported=False, gpu="Tesla V100-SXM2-32GB")
    check_bf16(cfg, supported=True, gpu="NVIDIA H200")  # Ampere and later
    check_bf16(config_from_dict({"resources": {"gpus_per_worker": 1}}), supported=False, gpu="Tesla V100")  # fp32


def test_expert_parallelism_takes_the_megablocks_backend_on_gpus():
    cfg = config_from_dict({"model": {"mlp": "moe"}, "moe": {"expert_parallel": 2, "backend": "megablocks"},
                            "parallel": {"workers": 2}, "resources": {"gpus_per_worker": 1}})  # fmt: skip
    assert cfg.moe.backend == "megablocks"
