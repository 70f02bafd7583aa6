"""learner.deepspeed_setup.import_deepspeed: a learner process imports DeepSpeed without MLflow, without compiling
DeepSpeed's CPU shared-memory op (a minute of CPU for an all-reduce only DeepSpeed-inference uses), and compiles
any other op with this environment's own `ninja` (two ninja versions recompiled it in turn)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import json, shutil, sys
sys.path.insert(0, {root!r})
from learner.deepspeed_setup import import_deepspeed
import_deepspeed()
from deepspeed.comm.torch import build_shm_op  # what a CPU process group's start calls
print(json.dumps({{"mlflow": "mlflow" in sys.modules, "ninja": shutil.which("ninja"), "shm_op": build_shm_op()}}))
"""


def test_deepspeed_without_mlflow_or_the_shm_op_and_with_this_environments_ninja():
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # as a process started without activating the environment
    out = subprocess.run([sys.executable, "-c", CODE.format(root=str(ROOT))], env=env, capture_output=True,
                         text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"mlflow": False, "ninja": os.path.join(os.path.dirname(sys.executable), "ninja"), "shm_op": None}


STEP = """
import json, os, sys
sys.path.insert(0, {root!r})
from learner.deepspeed_setup import import_deepspeed
deepspeed = import_deepspeed()
import torch
from deepspeed.runtime import compiler
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
config = {{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {{"stage": 2}},
          "optimizer": {{"type": "AdamW", "params": {{"lr": 0.1, "torch_adam": True}}}}}}
model = torch.nn.Linear(4, 1)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
before = model.weight.detach().clone()
engine.backward(engine(torch.ones(2, 4)).sum())
engine.step()
print(json.dumps({{"inductor": "torch._inductor.compile_fx" in sys.modules, "stepped": not torch.equal(before,
    model.weight.detach()), "compile_restored": compiler.compile() is torch.compile}}))
"""


def test_a_zero_engine_starts_and_steps_without_loading_torch_compile():
    """DeepSpeed's ZeRO engines import its Muon optimizer, which applies torch.compile at import: about 1.8 s
    of CPU per learner rank for a compiler nothing here uses."""
    from weights.network import listen_port

    out = subprocess.run([sys.executable, "-c", STEP.format(root=str(ROOT)), str(listen_port("127.0.0.1"))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"inductor": False, "stepped": True, "compile_restored": True}
