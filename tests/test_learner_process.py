"""learner.worker.import_deepspeed: a learner process imports DeepSpeed without MLflow, without compiling
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
from learner.worker import import_deepspeed
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
