"""train.compile: the model compiled by torch.compile under DeepSpeed (engine.compile) trains the same
steps as the eager model (inductor on CPU here; the speed is for GPUs, benchmarks/ measure it there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    from scalesparse.config import config_from_dict
    from scalesparse.model import GPT
    from scalesparse.train.engine import build_engine

    def losses(compile):
        cfg = config_from_dict({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16},
                                "parallel": {"workers": 1, "zero_stage": 2},
                                "train": {"global_batch_size": 2, "micro_batch_size": 2, "compile": compile}})
        torch.manual_seed(0)
        engine = build_engine(GPT(cfg.model, 64, cfg.moe), cfg, 1)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(4):
            x = torch.randint(0, 64, (2, 16), generator=g)
            _, loss = engine(x, x)
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out, type(engine.module).__name__, getattr(engine, "is_compiled", None)

    print("RESULT " + json.dumps({"eager": losses(False), "compiled": losses(True)}))
""")


@pytest.mark.slow
def test_compiled_model_trains_the_same_steps_as_the_eager_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.split("RESULT ", 1)[1])
    (eager, _, eager_compiled), (compiled, _, is_compiled) = r["eager"], r["compiled"]
    assert is_compiled is True and not eager_compiled  # the switch did compile
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0)
