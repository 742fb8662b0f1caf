"""The commit protocol of train/checkpoint.py, with real files and a real killed process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scalesparse.errors import CheckpointError
from scalesparse.train import checkpoint as ckpt


def save(root, step, payload=b"x" * 1000, keep=3):
    def write(folder):
        (folder / "shard_rank0.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "shard_rank1.bin").write_bytes(payload[::-1])

    return ckpt.Checkpointer(root, keep).save(step, write, {"step": step})


def test_save_commits_manifest_latest_and_retention(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save(root, step, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000030", "step_00000040"]
    assert ckpt.latest_checkpoint(root).name == "step_00000040"
    manifest = ckpt.verify(root / "step_00000040")
    assert set(manifest["files"]) == {"shard_rank0.bin", "sub/shard_rank1.bin", "trainer_state.json"}
    assert ckpt.read_state(root / "step_00000040") == {"step": 40}
    assert ckpt.resolve(tmp_path) == ckpt.resolve(root) == root / "step_00000040"  # run dir or root


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_verify_names_the_bad_file(tmp_path, damage):
    folder = save(tmp_path, 5)
    shard = folder / "sub" / "shard_rank1.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:500])
        match = "shard_rank1.bin: truncated or altered"
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[10] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = "shard_rank1.bin: checksum mismatch"
    elif damage == "delete":
        shard.unlink()
        match = "shard_rank1.bin: listed in the manifest but missing"
    else:
        (folder / "manifest.json").unlink()
        match = "manifest.json: missing"
    with pytest.raises(CheckpointError, match=match):
        ckpt.verify(folder)


def test_resolve_explains_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        ckpt.resolve(tmp_path)
    (tmp_path / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="points at 'step_00000099', which does not exist"):
        ckpt.resolve(tmp_path)


KILLED_SAVE = """
import sys, time
from pathlib import Path
from scalesparse.train import checkpoint as ckpt
root = Path(sys.argv[1])
def write(folder):
    (folder / "shard_rank0.bin").write_bytes(b"new" * 1000)
    (folder / "HALFWAY").touch()
    time.sleep(60)  # killed here, with half the shards written
    (folder / "shard_rank1.bin").write_bytes(b"never")
ckpt.Checkpointer(root, 3).save(20, write, {"step": 20})
"""


def test_a_save_killed_halfway_leaves_latest_on_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = save(root, 10)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(root)])
    halfway = root / "step_00000020.partial" / "HALFWAY"
    deadline = time.time() + 60
    while not halfway.exists():
        assert proc.poll() is None and time.time() < deadline, "the saving process never got halfway"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.latest_checkpoint(root) == good
    ckpt.verify(good)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000010"]
    assert ckpt.resolve(root) == good
    # the next save cleans the dead partial and commits normally
    save(root, 20)
    assert ckpt.latest_checkpoint(root).name == "step_00000020"
    assert not (root / "step_00000020.partial").exists()
    assert json.loads((root / "step_00000020" / "trainer_state.json").read_text()) == {"step": 20}
