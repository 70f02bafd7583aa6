"""vLLM's Qwen2-VL without torchvision (vLLM's CPU build, where torchvision has no working wheel).

vLLM's `qwen2_vl.py` imports `smart_resize` from transformers' `image_processing_qwen2_vl`, whose module
imports torchvision, and loads `Qwen2VLProcessor`, whose video processor is torchvision-only (vLLM reads
its `valid_kwargs`). Where torchvision is missing, this patch
- answers that import with transformers' PIL image processor module (same `smart_resize`), and
- gives vLLM's Qwen2-VL module an image-only processor whose video processor is a stand-in exposing
  `valid_kwargs` (clsrl never sends videos; the engine sets vLLM's video limit to 0).

vLLM starts processes of its own (the model-registry probe, EngineCore, workers) and Ray starts actors, so
the patch must be in effect at every interpreter start: `python -m actors.vllm_compat` writes a `.pth`
file into the environment's site-packages (the Makefile's vLLM environment does) that puts this checkout
on sys.path and calls `install()`. This module imports only the standard library at start-up.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
VLLM_QWEN2_VL = "vllm.model_executor.models.qwen2_vl"
PTH_NAME = "clsrl_vllm_compat.pth"


def _torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


class _AliasLoader(importlib.abc.Loader):
    """The torchvision image-processor module, served by the PIL one (its processor under both names)."""

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        pil = importlib.import_module(PIL_MODULE)
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil


class _PatchAfterLoader(importlib.abc.Loader):
    """Runs the real module, then swaps its processor class for the image-only one."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        self.real.exec_module(module)
        module.Qwen2VLProcessor = image_only_processor_class()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == TORCHVISION_MODULE:
            return importlib.util.spec_from_loader(name, _AliasLoader())
        if name == VLLM_QWEN2_VL:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _PatchAfterLoader(spec.loader)
                    return spec
        return None


def image_only_processor_class():
    """Qwen2VLProcessor for images only, with a video-processor stand-in that only answers valid_kwargs."""
    from transformers.processing_utils import VideosKwargs

    from vlm.processor import Qwen2VLImageOnlyProcessor

    class NoVideoProcessor:
        valid_kwargs = VideosKwargs

    class VLLMImageOnlyProcessor(Qwen2VLImageOnlyProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.video_processor = NoVideoProcessor()

    return VLLMImageOnlyProcessor


def install() -> bool:
    """Put the finder first on sys.meta_path (once) where torchvision is missing; True if it is there."""
    if not _torchvision_missing():
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True


def pth_text(repo: Path) -> str:
    # a .pth runs lines starting with `import`; a failure prints and start-up goes on
    return f"{repo}\nimport actors.vllm_compat as _clsrl_compat; _clsrl_compat.install()\n"


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Install the start-up hook into this interpreter's environment (or `site_packages`)."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(pth_text(Path(__file__).resolve().parent.parent))
    return target


if __name__ == "__main__":
    print(write_pth(sys.argv[1] if len(sys.argv) > 1 else None))
