"""Data-set readers, image loading and sampling: layouts, errors that name the bad input, reproducibility."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tasks.bundled import DIGIT_NAMES, ensure_bundled
from tasks.images import ImageLoadError, load_image, smart_size
from tasks.manifest import DatasetError, read_coop_split, read_dataset, read_image_folder, read_manifest
from tasks.sampling import base_new_split, k_shot


def _png(path, colour=(200, 10, 10), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _manifest(tmp_path, rows, classnames=("cat", "dog")):
    (tmp_path / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (tmp_path / "manifest.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return tmp_path / "manifest.jsonl"


def test_manifest_reads_samples(tmp_path):
    m = _manifest(tmp_path, [{"image": "a.png", "label": "cat", "split": "train", "id": "x"},
                             {"image": "b.png", "label": "dog", "split": "test"}])
    ds = read_manifest(m)
    assert ds.classnames == ["cat", "dog"] and ds.splits() == ["test", "train"]
    assert ds.split("train")[0].image == tmp_path / "a.png" and ds.split("train")[0].id == "x"


@pytest.mark.parametrize("row, needle", [
    ("{not json", "manifest.jsonl:2: not valid JSON"),
    ({"image": "b.png", "label": "cow", "split": "train"}, "manifest.jsonl:2: unknown label 'cow'"),
    ({"image": "b.png", "label": "dog"}, "missing keys ['split']"),
    ({"image": "b.png", "label": "dog", "split": "train", "lable": "x"}, "unknown keys ['lable']"),
])
def test_manifest_errors_name_file_and_line(tmp_path, row, needle):
    m = _manifest(tmp_path, [{"image": "a.png", "label": "cat", "split": "train"}, row])
    with pytest.raises(DatasetError, match=None) as err:
        read_manifest(m)
    assert needle in str(err.value)


def test_manifest_empty_class_is_named(tmp_path):
    m = _manifest(tmp_path, [{"image": "a.png", "label": "cat", "split": "train"}], classnames=("cat", "dog", "emu"))
    with pytest.raises(DatasetError, match=r"no images.*\['dog', 'emu'\]"):
        read_manifest(m)


def test_image_folder_layout(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "golden_retriever" / "1.png")
        _png(tmp_path / split / "tabby_cat" / "2.jpg")
    ds = read_dataset(tmp_path)
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert len(ds.split("train")) == 2 and len(ds.split("test")) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected an ImageFolder tree"):
        read_image_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir(parents=True)
    _png(tmp_path / "train" / "full" / "1.png")
    with pytest.raises(DatasetError, match=r"empty class folder.*train/empty"):
        read_image_folder(tmp_path)


def test_coop_split_reader(tmp_path):
    split = {"train": [["a/1.jpg", 0, "Abyssinian"], ["b/2.jpg", 1, "american_bulldog"]],
             "val": [], "test": [["a/3.jpg", 0, "Abyssinian"], ["b/4.jpg", 1, "american_bulldog"]]}
    (tmp_path / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    ds = read_coop_split(tmp_path / "split_zhou_OxfordPets.json", tmp_path / "images")
    assert ds.name == "OxfordPets" and ds.classnames == ["Abyssinian", "american bulldog"]
    assert ds.split("test")[1].image == tmp_path / "images" / "b/4.jpg"
    split["test"].append(["c.jpg", 1, "Bengal"])
    (tmp_path / "bad.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"test\[2\] label 1 is 'Bengal'"):
        read_coop_split(tmp_path / "bad.json", tmp_path)


def test_load_image_resizes_to_patch_grid(tmp_path):
    _png(tmp_path / "x.png", size=(300, 100))
    img = load_image(tmp_path / "x.png", 56 * 56, 112 * 112)
    assert img.mode == "RGB" and img.width % 28 == 0 and img.height % 28 == 0
    assert 56 * 56 <= img.width * img.height <= 112 * 112


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"not found: .*nope\.png"):
        load_image(tmp_path / "nope.png", 3136, 12544)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageLoadError, match=r"cannot read image .*bad\.png"):
        load_image(tmp_path / "bad.png", 3136, 12544)


def test_skip_bad_images_counts_them(tmp_path, tiny_policy):
    from tasks.examples import build_examples

    _, processor = tiny_policy
    _png(tmp_path / "train" / "cat" / "ok.png")
    _png(tmp_path / "train" / "dog" / "ok.png")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    ds = read_image_folder(tmp_path)
    with pytest.raises(ImageLoadError, match="broken.png"):
        build_examples(processor, ds, ds.samples, "no_think", 3136, 12544, seed=0)
    examples, skipped = build_examples(processor, ds, ds.samples, "no_think", 3136, 12544, seed=0, skip_bad_images=True)
    assert len(examples) == 2 and len(skipped) == 1 and "broken.png" in skipped[0]


@given(st.integers(1, 4000), st.integers(1, 4000))
def test_smart_size_stays_in_budget(h, w):
    if max(h, w) / min(h, w) > 200:
        return
    sh, sw = smart_size(h, w, 56 * 56, 28 * 28 * 64)
    assert sh % 28 == 0 and sw % 28 == 0 and sh * sw <= 28 * 28 * 64


def test_k_shot_is_seeded_and_order_independent(shapes_dataset):
    train = shapes_dataset.split("train")
    a = k_shot(train, 4, seed=7)
    b = k_shot(list(reversed(train)), 4, seed=7)
    c = k_shot(train, 4, seed=8)
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]
    assert all(sum(s.label == name for s in a) == 4 for name in shapes_dataset.classnames)
    with pytest.raises(DatasetError, match="class 'red' has 48 samples, fewer than k=1000"):
        k_shot(train, 1000, seed=0, classnames=shapes_dataset.classnames)


def test_base_new_split():
    names = [f"c{i}" for i in range(11)]
    base, new = base_new_split(names)
    assert base == names[:6] and new == names[6:]
    b1, n1 = base_new_split(names, seed=3)
    assert (b1, n1) == base_new_split(names, seed=3) and sorted(b1 + n1) == sorted(names) and len(b1) == 6


def test_bundled_data_sets():
    shapes = read_dataset(ensure_bundled("shapes"))
    assert shapes.classnames == ["red", "green", "blue", "yellow"]
    assert len(shapes.split("train")) == 4 * 48 and len(shapes.split("test")) == 4 * 24
    digits = read_dataset(ensure_bundled("digits"))
    assert digits.classnames == DIGIT_NAMES and len(digits.split("test")) == 160
    with pytest.raises(ValueError, match="available: \\['digits', 'shapes'\\]"):
        ensure_bundled("mnist")
