"""Loading the Qwen2-VL processor with or without torchvision.

transformers 5.x builds Qwen2VLProcessor with a mandatory video processor, and that one imports
torchvision, which has no CPU wheel on PyPI (the CUDA wheel fails to load beside the CPU torch). We only
feed images, so on such machines we use a subclass that skips the video half; everything else
(`__call__`, `apply_chat_template`, `batch_decode`) is inherited unchanged. Where torchvision works (GPU
clusters), the stock AutoProcessor is used.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def torchvision_usable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA wheel beside a CPU torch fails here
        return False
    return True


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The processor saved at `path`: stock AutoProcessor when torchvision works, else image-only."""
    if torchvision_usable():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Qwen2VLImageOnlyProcessor.from_pretrained(path)


def save_processor(processor, out_dir: str | Path) -> None:
    """Save and record the stock class name, so AutoProcessor (and vLLM) load it where torchvision exists."""
    processor.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "processor_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = "Qwen2VLProcessor"
        cfg_path.write_text(json.dumps(cfg, indent=2))
