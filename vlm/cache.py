"""Build-once folders in the local cache, safe against concurrent builders (tests, Ray workers)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLSRL_CACHE", Path.home() / ".cache" / "clsrl"))


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """Where built models go: `cache_dir` if given, else the cache's models folder."""
    return Path(cache_dir) if cache_dir else default_cache_dir() / "models"


def build_key(*parts) -> str:
    """16 hex digits of SHA-256 over `parts` as JSON: a folder name that changes with any of them."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:16]


def build_once(out: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return `out`, first running `build(tmp_dir)` under a file lock and renaming tmp_dir into place.

    `marker` is a file the finished folder always holds; a half-written build is never visible at `out`.
    """
    if (out / marker).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / marker).exists():
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
        try:
            build(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
