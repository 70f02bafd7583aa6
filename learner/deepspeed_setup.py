"""DeepSpeed imported cheaply: what its import and its engines' start would otherwise cost every process."""
from __future__ import annotations

import importlib
import os
import sys


def import_deepspeed():
    """`import deepspeed` in a learner process or the driver, with four settings that keep it cheap:
    - no MLflow import by DeepSpeed's autotuner when MLflow is installed (about 1 s of CPU and 100 MiB per
      process): learners never log to MLflow, and a driver with the MLflow logger imports it on its own;
    - no shared-memory all-reduce op: DeepSpeed compiles it when a CPU process group starts (about a minute
      of CPU on each new machine, and a C++ compiler on every node) for DeepSpeed-inference's all-reduce,
      which a learner never calls; marked incompatible, DeepSpeed skips it (its own path for an op it cannot
      build) and any inference all-reduce falls back to torch.distributed;
    - this environment's `ninja` first on PATH, for the ops DeepSpeed still compiles: two versions (a system
      1.11, the 1.13 pip installs beside DeepSpeed) read each other's build log as a changed command, so each
      recompiled (about a minute of CPU) whenever the other had built last;
    - Muon's kernels left uncompiled: every ZeRO engine imports DeepSpeed's Muon optimizer to check the
      optimizer's type, and that module applies torch.compile at import, which loads inductor (about 1.8 s
      of CPU per rank, a third of a learner's start). The learners train with Adam; DeepSpeed runs Muon
      eager on a torch without compile the same way."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError inside DeepSpeed's import
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # ShareMemCommBuilder.NAME
    muon = "deepspeed.runtime.zero.muon.muon_optimizer"
    if muon not in sys.modules:
        from deepspeed.runtime import compiler

        compiling = compiler.compile
        compiler.compile = lambda: compiler.dummy_decorator  # what it returns where torch lacks compile
        try:
            importlib.import_module(muon)
        finally:
            compiler.compile = compiling
    return deepspeed
