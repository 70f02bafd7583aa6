"""Visual-RFT's parquet few-shot sets: image bytes cached once, labels from <answer>, schema errors named."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.manifest import DatasetError
from tasks.parquet import answer_of, read_rft_parquet, read_rft_rows, split_of
from tasks.prompts import visual_rft_cls_prompt

QUESTION = visual_rft_cls_prompt("flower", "species")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image_bytes(colour, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), colour).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, labels, fmt="PNG", image_type=IMAGE_TYPE, drop=(), extra=None):
    """A parquet file laid out as the hub's `datasets` writes Visual-RFT's sets."""
    images = [_image_bytes((40 * i % 256, 90, 200), fmt) for i in range(len(labels))]
    cols = {
        "image": pa.array([{"bytes": b, "path": None} for b in images] if pa.types.is_struct(image_type) else images,
                          type=image_type),
        "problem": pa.array([QUESTION] * len(labels)),
        "solution": pa.array([f"<answer>{c}</answer>" for c in labels]),
    }
    cols.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), path, row_group_size=3)
    return path, images


def test_reads_hub_layout_with_cached_images(tmp_path):
    labels = ["pink primrose", "hard-leaved pocket orchid", "pink primrose", "canterbury bells"] * 2
    root = tmp_path / "ViRFT_CLS_flower_4_shot"
    _, images = _write(root / "data" / "train-00000-of-00001.parquet", labels)
    ds = read_rft_parquet(root, tmp_path / "cache")
    assert ds.name == "ViRFT_CLS_flower_4_shot" and ds.splits() == ["train"]
    assert ds.classnames == sorted(set(labels))
    assert [s.label for s in ds.samples] == labels
    assert [s.id for s in ds.samples][:2] == ["train/train-00000-of-00001/0", "train/train-00000-of-00001/1"]
    for s, raw in zip(ds.samples, images):  # the cached file holds exactly the row's bytes
        assert s.image.parent == tmp_path / "cache" and s.image.suffix == ".png" and s.image.read_bytes() == raw


def test_images_are_written_once_and_rows_keep_the_question(tmp_path):
    file, _ = _write(tmp_path / "d" / "test-0.parquet", ["a", "b", "c"], fmt="JPEG")
    rows = read_rft_rows(file, tmp_path / "cache")
    assert [r.split for r in rows] == ["test"] * 3 and rows[0].problem == QUESTION
    assert all(r.image.suffix == ".jpg" for r in rows)
    stamps = {r.image: r.image.stat().st_mtime_ns for r in rows}
    rows_again = read_rft_rows(file, tmp_path / "cache")
    assert {r.image: r.image.stat().st_mtime_ns for r in rows_again} == stamps
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_plain_binary_image_column_and_id_column(tmp_path):
    file, _ = _write(tmp_path / "x.parquet", ["a", "b"], image_type=pa.binary(),
                     extra={"id": pa.array(["img7", "img9"])})
    ds = read_rft_parquet(file, tmp_path / "cache", name="flowers", split="train")
    assert ds.name == "flowers" and [s.id for s in ds.samples] == ["train/img7", "train/img9"]


@pytest.mark.parametrize("drop", ["solution", "image", "problem"])
def test_missing_column_names_file_and_column(tmp_path, drop):
    file, _ = _write(tmp_path / "train.parquet", ["a"], drop=(drop,))
    with pytest.raises(DatasetError) as err:
        read_rft_parquet(file, tmp_path / "cache")
    assert str(file) in str(err.value) and f"missing column(s) ['{drop}']" in str(err.value)


def test_bad_rows_and_files_are_named(tmp_path):
    file, _ = _write(tmp_path / "train.parquet", ["a", ""])
    with pytest.raises(DatasetError, match=r"train.parquet: row 1: column 'solution' has no answer"):
        read_rft_parquet(file, tmp_path / "cache")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"junk.parquet: not a readable parquet file"):
        read_rft_parquet(junk, tmp_path / "cache")
    bad_img = tmp_path / "bad_img.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": b"\x00\x01garbage", "path": "x.png"}], type=IMAGE_TYPE),
                             "problem": ["q"], "solution": ["<answer>a</answer>"]}), bad_img)
    with pytest.raises(DatasetError, match=r"bad_img.parquet: row 0: image bytes are not a readable image"):
        read_rft_parquet(bad_img, tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"no .parquet files under"):
        read_rft_parquet(tmp_path / "cache", tmp_path / "cache2")


def test_answer_and_split_helpers(tmp_path):
    assert answer_of("<think>hm</think> <answer> pink primrose </answer>") == "pink primrose"
    assert answer_of("  moon orchid ") == "moon orchid"
    assert split_of(tmp_path / "data" / "train-00000-of-00001.parquet") == "train"
    assert split_of(tmp_path / "default" / "test" / "0000.parquet") == "test"
    assert split_of(tmp_path / "whatever.parquet", default="train") == "train"
