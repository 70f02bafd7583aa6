"""CoOp's 11 data sets in CoOp's own layout: split JSONs, FGVC's txt files, ImageNet's folders; wrong layouts named."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from tasks.coop import COOP_DATASETS, coop_layout, read_coop
from tasks.manifest import DatasetError
from tasks.prompts import DEFAULT_PREFIX, question_prefix
from tasks.sampling import base_new_split, k_shot


def _img(path, colour=(10, 120, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def _json_layout(root, key, classes=("Annual_Crop", "Forest")):
    """A CoOp split-JSON data set with 2 images per class per split, written where CoOp puts them."""
    lay = COOP_DATASETS[key]
    ddir = root / lay.folder
    image_dir = ddir / lay.images if lay.images else ddir
    split = {}
    for s in ("train", "val", "test"):
        rows = []
        for i, c in enumerate(classes):
            for j in range(2):
                rel = f"{c}/{s}_{j}.jpg"
                _img(image_dir / rel)
                rows.append([rel, i, c])
        split[s] = rows
    (ddir / lay.split_file).write_text(json.dumps(split))
    return ddir


@pytest.mark.parametrize("key", [k for k, v in COOP_DATASETS.items() if v.split_file])
def test_every_split_json_dataset_reads_in_coop_layout(tmp_path, key):
    _json_layout(tmp_path, key)
    ds = read_coop(tmp_path, key)
    lay = COOP_DATASETS[key]
    assert ds.name == lay.display
    assert ds.classnames == ["Annual Crop", "Forest"]  # CoOp's '_' read as a space, label-index order
    assert ds.splits() == ["test", "train", "val"]
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [4, 4, 4]
    first = ds.split("train")[0]
    assert first.image.is_file() and first.label == "Annual Crop"
    assert first.image.parent.parent == (tmp_path / lay.folder / lay.images if lay.images else tmp_path / lay.folder)


def test_display_names_drive_the_prompt_prefixes():
    prefixes = {k: question_prefix(v.display) for k, v in COOP_DATASETS.items()}
    assert prefixes["eurosat"] == "What type of object is in the centered satellite photo?"
    assert prefixes["ucf101"] == "What actions is the person performing in the photo?"
    assert prefixes["dtd"] == "What type of texture is in the photo?"
    assert prefixes["fgvc_aircraft"] == "What type of aircraft is in the photo?"
    others = {k for k, p in prefixes.items() if p == DEFAULT_PREFIX}
    assert others == {"imagenet", "caltech101", "food101", "oxford_flowers", "oxford_pets", "stanford_cars", "sun397"}


def test_names_and_aliases_resolve():
    assert coop_layout("Flowers102").key == "oxford_flowers"
    assert coop_layout("FGVC Aircraft").key == "fgvc_aircraft"
    assert coop_layout("pets37").key == "oxford_pets"
    for lay in COOP_DATASETS.values():  # a data set's own name maps back to it
        assert coop_layout(lay.display) is lay
    with pytest.raises(DatasetError, match=r"unknown CoOp data set 'mnist'.*'caltech101'"):
        coop_layout("mnist")


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    ddir = _json_layout(tmp_path, "dtd")
    assert read_coop(ddir, "dtd").name == "DTD"


def test_missing_split_file_names_file_and_layout(tmp_path):
    ddir = _json_layout(tmp_path, "oxford_flowers")
    (ddir / "split_zhou_OxfordFlowers.json").unlink()
    with pytest.raises(DatasetError) as err:
        read_coop(tmp_path, "oxford_flowers")
    msg = str(err.value)
    assert "split_zhou_OxfordFlowers.json" in msg and "oxford_flowers/jpg/" in msg and str(ddir) in msg


def test_missing_dataset_folder_and_image_folder_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"caltech-101.*101_ObjectCategories.*split_zhou_Caltech101.json"):
        read_coop(tmp_path, "caltech101")
    ddir = _json_layout(tmp_path, "eurosat")
    (ddir / "2750").rename(ddir / "images")  # a wrong image folder name
    with pytest.raises(DatasetError, match=r"folder not found: .*eurosat/2750"):
        read_coop(tmp_path, "eurosat")


def test_split_file_over_wrong_images_fails_on_first_image(tmp_path):
    ddir = _json_layout(tmp_path, "food101")
    for p in (ddir / "images" / "Forest").iterdir():
        p.unlink()
    split = json.loads((ddir / "split_zhou_Food101.json").read_text())
    split["train"] = split["train"][::-1]  # the first train row now points at a deleted Forest image
    (ddir / "split_zhou_Food101.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"image not found: .*Forest/train_1.jpg \(first train image of food101"):
        read_coop(tmp_path, "food101")


def _fgvc(root, variants=("707-320", "A340-500", "Cessna 172")):
    ddir = root / "fgvc_aircraft"
    ddir.mkdir(parents=True)
    (ddir / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for v in variants:
            for _ in range(2):
                n += 1
                image_id = f"{1000000 + n}"
                _img(ddir / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
        (ddir / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return ddir


def test_fgvc_aircraft_own_layout(tmp_path):
    _fgvc(tmp_path)
    ds = read_coop(tmp_path, "fgvc_aircraft")
    assert ds.name == "FGVC Aircraft" and ds.classnames == ["707-320", "A340-500", "Cessna 172"]
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [6, 6, 6]
    cessna = [s for s in ds.split("test") if s.label == "Cessna 172"]  # variant names with spaces survive
    assert len(cessna) == 2 and all(s.image.parent.name == "images" and s.image.is_file() for s in cessna)
    assert cessna[0].id == f"test/{cessna[0].image.stem}"
    assert len(k_shot(ds.split("train"), 2, seed=0, classnames=ds.classnames)) == 6


def test_fgvc_errors_name_the_file_and_line(tmp_path):
    ddir = _fgvc(tmp_path)
    with (ddir / "images_variant_val.txt").open("a") as fh:
        fh.write("1999999 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:7: variant 'Boeing 999' is not in .*variants.txt"):
        read_coop(tmp_path, "fgvc_aircraft")
    (ddir / "images_variant_test.txt").unlink()
    (ddir / "images_variant_val.txt").write_text("")
    with pytest.raises(DatasetError, match=r"file not found: .*images_variant_test.txt.*variants.txt"):
        read_coop(tmp_path, "fgvc_aircraft")


def _imagenet(root, classes=(("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"))):
    ddir = root / "imagenet"
    ddir.mkdir(parents=True)
    (ddir / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in classes))
    for folder in ("train", "val"):
        for w, _ in classes:
            for j in range(3 if folder == "train" else 1):
                _img(ddir / "images" / folder / w / f"{w}_{j}.JPEG")
    return ddir


def test_imagenet_layout_val_is_test(tmp_path):
    _imagenet(tmp_path)
    ds = read_coop(tmp_path, "imagenet")
    assert ds.name == "ImageNet" and ds.classnames == ["tench", "goldfish", "great white shark"]
    assert ds.splits() == ["test", "train"] and len(ds.split("train")) == 9 and len(ds.split("test")) == 3
    assert {s.label for s in ds.split("test")} == set(ds.classnames)
    assert all(s.image.parent.parent.name == "val" for s in ds.split("test"))
    base, new = base_new_split(ds.classnames)
    assert base == ["tench", "goldfish"] and new == ["great white shark"]


def test_imagenet_unlisted_folder_and_missing_val_are_named(tmp_path):
    ddir = _imagenet(tmp_path)
    _img(ddir / "images" / "train" / "n09999999" / "x.JPEG")
    with pytest.raises(DatasetError, match=r"class folder .*n09999999 is not listed in .*classnames.txt"):
        read_coop(tmp_path, "imagenet")
    (ddir / "images" / "train" / "n09999999" / "x.JPEG").unlink()
    (ddir / "images" / "train" / "n09999999").rmdir()
    (ddir / "images" / "val").rename(ddir / "images" / "validation")
    with pytest.raises(DatasetError, match=r"folder not found: .*imagenet/images/val .*images/val/<wnid>/"):
        read_coop(tmp_path, "imagenet")


def test_a_run_config_reads_coop_layout_into_prompts(tmp_path):
    """data.format: coop through the run's data loading: EuroSAT's own question prefix, prompt ids per data set."""
    from protocol.config import ExperimentConfig
    from protocol.overrides import ConfigError, load_config
    from tasks.data import load_run_data

    _json_layout(tmp_path, "eurosat")
    cfg = load_config(ExperimentConfig, None, [f"data.root={tmp_path}", "data.format=coop", "data.coop=eurosat",
                                               "task.prompt=cls_rl"])
    data = load_run_data(cfg)
    assert list(data.tasks) == ["EuroSAT"] and len(data.train_examples) == 4 and len(data.test_examples) == 4
    assert "centered satellite photo" in data.train_examples[0].text
    assert data.train_examples[0].id.startswith("EuroSAT/")
    with pytest.raises(ConfigError, match="needs data.coop"):
        load_config(ExperimentConfig, None, [f"data.root={tmp_path}", "data.format=coop"])
