"""Loading images once, resized to the model's pixel budget, with errors that name the file."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

PATCH_FACTOR = 28  # Qwen2-VL: 14-px patches merged 2x2 into one LLM token


class ImageLoadError(ValueError):
    """A missing, unreadable or corrupt image; the message names the file."""


def smart_size(height: int, width: int, min_pixels: int, max_pixels: int,
               factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """Nearest (h, w) in multiples of `factor`, aspect kept, with min_pixels <= h*w <= max_pixels."""
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h * w > max_pixels:  # a thin image whose short side was raised to one patch: trim the long side
        if h >= w:
            h = max(factor, max_pixels // w // factor * factor)
        else:
            w = max(factor, max_pixels // h // factor * factor)
    return h, w


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image file opened lazily; a missing file, or one PIL cannot read (here or while the caller reads
    it), is an ImageLoadError naming the file."""
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def _grid_size(path: Path, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    try:
        return smart_size(height, width, min_pixels, max_pixels)
    except ValueError as err:
        raise ImageLoadError(f"unusable image {path}: {err}") from err


def check_image(path: str | Path, min_pixels: int, max_pixels: int) -> None:
    """The start-up scan: the file exists and its header opens as an image of usable size, without decoding
    the pixels (what `load_image` then does where the prompt is used)."""
    path = Path(path)
    with _opened(path) as img:  # lazy: reads the header only
        width, height = img.size
    _grid_size(path, height, width, min_pixels, max_pixels)


def load_image(path: str | Path, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB image resized once to the model's grid, so rollout and learner get the same pixels."""
    path = Path(path)
    with _opened(path) as img:
        img.load()
        rgb = img.convert("RGB")
    h, w = _grid_size(path, rgb.height, rgb.width, min_pixels, max_pixels)
    return rgb if (h, w) == (rgb.height, rgb.width) else rgb.resize((w, h), Image.Resampling.BICUBIC)
