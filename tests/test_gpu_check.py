"""`make gpu-check` (bench/gpu_check.py): the parts a machine without a GPU can run. The checks themselves
need CUDA (and vLLM for two of them); here: the refusal to write a report without CUDA, the argument
handling, a check that skips with its reason, and the report built from results."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu-validation.md"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert not out.exists() and "no CUDA device here" in capsys.readouterr().err


def test_unknown_check_names_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "hf_engine,nccl"])
    assert "unknown check(s) ['nccl']" in capsys.readouterr().err
    assert gpu_check.parse_args(["--only", "deepspeed, colocated"]).only == ["deepspeed", "colocated"]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="two GPUs: the broadcast would run")
def test_a_check_the_machine_cannot_run_is_reported_skipped_with_its_reason():
    results = gpu_check.run_checks(["nccl_broadcast"])
    assert results["nccl_broadcast"]["status"] == "skipped"
    assert "NCCL needs one device per rank" in results["nccl_broadcast"]["reason"]


def test_report_lists_the_machine_and_every_check_as_it_ran():
    info = {"torch": "2.13.0", "GPUs": "1 x NVIDIA H100"}
    md = gpu_check.render(info, {
        "hf_engine": {"status": "ok", "values": {"completion tokens/s": 812.5}, "seconds": 9.1},
        "vllm_engine": {"status": "skipped", "reason": "vLLM is not installed", "seconds": 0.0},
        "colocated": {"status": "FAILED", "reason": "RuntimeError: boom", "seconds": 3.0}})
    assert "| GPUs | 1 x NVIDIA H100 |" in md
    assert "| hf_engine | ok | completion tokens/s: 812.5 |" in md
    assert "| vllm_engine | skipped | vLLM is not installed |" in md
    assert "| colocated | FAILED | RuntimeError: boom |" in md
    info = gpu_check.machine()
    assert info["torch"] == torch.__version__ and "deepspeed" in info
