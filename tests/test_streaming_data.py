"""The streaming data path: the driver holds image references (scanned, not decoded); workers encode the
prompts they get; a bad image is named before step 1, or skipped and counted when it fails later."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.driver import train
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import load_config
from protocol.rollout import RolloutRequest
from tasks.data import load_run_data
from tasks.examples import encode_requests
from tasks.images import ImageLoadError
from vlm.processor import load_processor


def _pets(root, truncated=False, header_corrupt=False):
    """An ImageFolder of small PNGs; optionally a JPEG cut after its header (the scan passes, decoding
    fails) and one whose header is garbage (the scan fails)."""
    for split in ("train", "test"):
        for i, (name, colour) in enumerate((("cat", (200, 10, 10)), ("dog", (10, 10, 200)))):
            for j in range(2):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40 + j, 30), colour).save(root / split / name / f"{i}{j}.png")
    if truncated:
        noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "train" / "dog" / "late.jpg", quality=90)
        data = (root / "train" / "dog" / "late.jpg").read_bytes()
        (root / "train" / "dog" / "late.jpg").write_bytes(data[:len(data) // 2])
    if header_corrupt:
        (root / "train" / "cat" / "early.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return root


def _cfg(root, model_dir, *extra):
    return load_config(ExperimentConfig, DEFAULT_CONFIG, [f"data.root={root}", f"model.path={model_dir}",
                                                          "data.eval_limit=null", *extra])


def test_driver_holds_references_and_workers_encode_them(tmp_path, tiny_model_dir):
    root = _pets(tmp_path / "pets", truncated=True)
    data = load_run_data(_cfg(root, tiny_model_dir))
    examples = data.train_examples + data.test_examples
    assert len(data.train_examples) == 5 and len(data.test_examples) == 4
    assert all(e.inputs is None and e.source is not None for e in examples)  # no pixels at the driver
    late = next(e for e in examples if e.source.image.endswith("late.jpg"))  # its header read fine
    assert late.source.dataset == "pets" and late.source.text == late.text
    requests = [RolloutRequest(e.id, e.inputs, e.solution, {"dataset": e.dataset}, e.source) for e in examples]
    processor = load_processor(tiny_model_dir)
    with pytest.raises(ImageLoadError, match=r"data set 'pets': cannot read image .*late\.jpg: image file is "
                                             r"truncated.*data\.skip_bad_images=true skips"):
        encode_requests(processor, requests)
    for r in requests:
        r.source.skip_bad_images = True
    ready, skipped = encode_requests(processor, requests)
    assert [r.prompt_id for r, _ in skipped] == [late.id] and "late.jpg" in skipped[0][1]
    assert len(ready) == len(requests) - 1
    for r in ready:  # encoded where used: the resized 8-bit image and its grid
        assert r.inputs.image.dtype == torch.uint8 and r.inputs.image.shape[0] % 28 == 0
        assert int(r.inputs.image_grid_thw.prod()) // 4 == int((r.inputs.input_ids == processor.image_token_id).sum())


def test_a_bad_header_is_named_before_step_one_or_skipped_and_counted(tmp_path, tiny_model_dir, capsys):
    root = _pets(tmp_path / "pets", header_corrupt=True)
    with pytest.raises(ImageLoadError, match=r"data set 'pets': cannot read image .*early\.jpg"):
        load_run_data(_cfg(root, tiny_model_dir))
    data = load_run_data(_cfg(root, tiny_model_dir, "data.skip_bad_images=true"))
    assert len(data.train_examples) == 4 and not any("early" in e.source.image for e in data.train_examples)
    assert "pets: skipped 1 unreadable images; first: cannot read image" in capsys.readouterr().out


@pytest.mark.slow
def test_an_image_that_fails_in_the_worker_is_skipped_counted_and_the_run_goes_on(ray_local, tmp_path,
                                                                                  tiny_model_dir):
    root = _pets(tmp_path / "pets", truncated=True)
    run = tmp_path / "run"
    cfg = _cfg(root, tiny_model_dir, "data.skip_bad_images=true", "train.steps=3", "train.prompts_per_step=4",
               "train.eval_every=3", "train.save_every=0", "train.warm_start_steps=0", "sampling.n=4",
               "learner.micro_batch_size=4", "algorithm.dynamic_sampling=false", "weight_sync.timeout_s=15",
               "cluster.rollout_workers=1", "cluster.learner_ranks=1")
    train(cfg, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # the run went on
    # 5 train prompts, 4 a step: 'late.jpg' is drawn in the first two epochs, each time skipped and counted
    assert sum(r.get("dropped/filtered", 0) for r in rows) >= 2
    log = (run / "driver.log").read_text()
    assert "skipped an unreadable image" in log and "late.jpg" in log and "data set 'pets'" in log
