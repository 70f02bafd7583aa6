"""Visual-RFT's published few-shot classification sets (e.g. ViRFT_CLS_flower_4_shot), read from parquet.

Each row holds the image, the question and the answer, as the Hugging Face `datasets` library writes
them: `image` (a struct with `bytes` and `path`, or plain binary), `problem` (the question text) and
`solution` (`<answer>class name</answer>`). Files are read in batches with pyarrow; each image's bytes
are written once to a cache folder, named by their content hash, so samples are ordinary image paths.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from tasks.manifest import ClassificationDataset, DatasetError, Sample

REQUIRED_COLUMNS = ("image", "problem", "solution")
SPLIT_NAMES = ("train", "validation", "val", "test")
_BATCH_ROWS = 64  # rows per read: a few MB of image bytes at a time, not the whole file


@dataclass(frozen=True)
class RftRow:
    id: str
    image: Path
    problem: str
    label: str
    split: str


def parquet_files(path: str | Path) -> list[Path]:
    """A .parquet file, or every .parquet under a folder (the hub's data/ or default/<split>/ layouts)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            return files
        raise DatasetError(f"no .parquet files under {path} (expected Visual-RFT's data/train-*.parquet)")
    raise DatasetError(f"parquet file or folder not found: {path}")


def split_of(file: Path, default: str = "train") -> str:
    """'train-00000-of-00001.parquet' or '.../train/0000.parquet' -> 'train'; else `default`."""
    for name in (file.stem.split("-")[0], file.parent.name):
        if name.lower() in SPLIT_NAMES:
            return name.lower()
    return default


def answer_of(solution: str) -> str:
    """The text inside the first <answer></answer>, or the whole solution when it has no tags."""
    start = solution.find("<answer>")
    if start >= 0:
        end = solution.find("</answer>", start)
        return solution[start + 8:end if end >= 0 else None].strip()
    return solution.strip()


def _image_bytes(value: object) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) and value else None


def _cache_image(data: bytes, cache_dir: Path, where: str) -> Path:
    """Write the bytes once under their hash; the suffix comes from the decoded format."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt = (im.format or "png").lower()
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{where}: image bytes are not a readable image ({err})") from None
    out = cache_dir / f"{hashlib.sha256(data).hexdigest()[:20]}.{'jpg' if fmt == 'jpeg' else fmt}"
    if out.is_file():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)  # atomic: a concurrent reader never sees half a file
    return out


def _check_schema(file: Path) -> pa.Schema:
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{file}: not a readable parquet file ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DatasetError(f"{file}: missing column(s) {missing}; found {schema.names}; "
                           f"expected Visual-RFT's columns {list(REQUIRED_COLUMNS)}")
    image_type = schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        raise DatasetError(
            f"{file}: column 'image' is {image_type}; expected binary or a struct with 'bytes'"
        )
    return schema


def _rows(file: Path) -> Iterator[tuple[int, dict]]:
    schema = _check_schema(file)
    columns = list(REQUIRED_COLUMNS) + (["id"] if "id" in schema.names else [])
    index = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def read_rft_rows(path: str | Path | Sequence[str | Path], cache_dir: str | Path,
                  split: str | None = None) -> list[RftRow]:
    """Every row of the file(s), with its image cached to disk and its label taken from the solution."""
    files = [f for p in ([path] if isinstance(path, (str, Path)) else path) for f in parquet_files(p)]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[RftRow] = []
    seen: set[str] = set()
    for file in files:
        file_split = split or split_of(file)
        for index, row in _rows(file):
            where = f"{file}: row {index}"
            data = _image_bytes(row["image"])
            if data is None:
                raise DatasetError(
                    f"{where}: column 'image' holds no image bytes (got {type(row['image']).__name__})"
                )
            if not isinstance(row["solution"], str) or not answer_of(row["solution"]):
                raise DatasetError(f"{where}: column 'solution' has no answer "
                                   f"(expected '<answer>class</answer>', got {row['solution']!r})")
            if not isinstance(row["problem"], str):
                raise DatasetError(f"{where}: column 'problem' should be text, got {row['problem']!r}")
            if row.get("id") is not None:
                sid = f"{file_split}/{row['id']}"
            else:
                sid = f"{file_split}/{file.stem}/{index}"
            if sid in seen:
                raise DatasetError(f"{where}: duplicate sample id {sid!r}")
            seen.add(sid)
            image = _cache_image(data, cache, where)
            rows.append(RftRow(sid, image, row["problem"], answer_of(row["solution"]), file_split))
    return rows


def read_rft_parquet(path: str | Path | Sequence[str | Path], cache_dir: str | Path, name: str | None = None,
                     split: str | None = None) -> ClassificationDataset:
    """A Visual-RFT classification set as a ClassificationDataset; class names = the distinct answers,
    sorted."""
    rows = read_rft_rows(path, cache_dir, split)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    first = Path(path if isinstance(path, (str, Path)) else path[0])
    if first.is_dir():
        default_name = first.name
    elif first.parent.name == "data":  # the Hub layout: <set>/data/<split>.parquet
        default_name = first.parent.parent.name
    else:
        default_name = first.stem
    names = sorted({r.label for r in rows})
    samples = [Sample(r.id, r.image, r.label, r.split) for r in rows]
    return ClassificationDataset(name or default_name, names, samples)
