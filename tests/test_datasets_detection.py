"""COCO-format detection: category subsets, 0-1000 boxes (numerically), negatives, k-shot, real det_* rewards."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from rewards.registry import get_reward
from tasks.boxes import coco_box_to_frame
from tasks.detection import k_shot_detection, k_shot_images, read_coco, read_coco_dir
from tasks.manifest import DatasetError
from tasks.prompts import detection_prompt

SIZES = {1: (640, 480), 2: (200, 100), 3: (200, 100), 4: (640, 480), 5: (640, 480), 6: (320, 240), 7: (320, 240),
         8: (320, 240)}
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 17, "name": "cat", "supercategory": "animal"},
              {"id": 18, "name": "dog", "supercategory": "animal"}]
# (image, category id, [x, y, w, h], iscrowd)
ANNOTATIONS = [(1, 18, [64, 48, 320, 240], 0), (1, 17, [0, 0, 64, 48], 0),
               (2, 18, [10.38, 0, 5.2, 3.37], 0), (2, 18, [190, 90, 20, 20], 0),  # the second runs past the border
               (3, 17, [100, 50, 0.05, 0.05], 0),  # rounds to zero size: kept as one unit
               (4, 1, [1, 1, 10, 10], 0),
               (5, 18, [0, 0, 300, 200], 1), (5, 17, [320, 240, 320, 240], 0),  # crowd dog: ambiguous
               (6, 18, [0, 0, 160, 120], 0), (7, 18, [160, 120, 160, 120], 0), (8, 18, [32, 24, 32, 24], 0),
               (8, 17, [0, 0, 320, 240], 0)]


def _coco(root, subset="train2017", annotations=ANNOTATIONS, mutate=None):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in SIZES.items()]
    for i, (w, h) in SIZES.items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (i * 20, 60, 90)).save(root / subset / f"{i:012d}.jpg")
    data = {"images": images, "categories": CATEGORIES,
            "annotations": [{"id": 100 + k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": z,
                             "area": b[2] * b[3]} for k, (i, c, b, z) in enumerate(annotations)]}
    if mutate:
        mutate(data)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{subset}.json"
    path.write_text(json.dumps(data))
    return path


def test_boxes_convert_into_the_0_1000_frame(tmp_path):
    ds = read_coco_dir(_coco(tmp_path).parent.parent, categories=["dog", "cat"])
    by_id = {im.id: im for im in ds.images}
    assert by_id["1"].boxes == {"dog": ((100, 100, 600, 600),), "cat": ((0, 0, 100, 100),)}
    # 200x100 image: x 10.38 -> 51.9 -> 52, x+w 15.58 -> 77.9 -> 78, y+h 3.37 -> 33.7 -> 34 (nearest, not floor);
    # the second box is clipped at 1000
    assert by_id["2"].boxes["dog"] == ((52, 0, 78, 34), (950, 900, 1000, 1000))
    assert by_id["3"].boxes["cat"] == ((500, 500, 501, 501),)
    assert coco_box_to_frame([0, 0, 640, 480], 640, 480) == (0, 0, 1000, 1000)
    assert by_id["5"].ambiguous == frozenset({"dog"}) and "dog" not in by_id["5"].boxes
    assert by_id["1"].path == tmp_path / "train2017" / "000000000001.jpg" and by_id["1"].path.is_file()


def test_samples_positives_negatives_and_crowd(tmp_path):
    ds = read_coco(_coco(tmp_path), tmp_path / "train2017", categories=["dog", "cat"], split="train")
    assert ds.categories == ["dog", "cat"] and ds.name == "train2017"
    samples = ds.samples()
    ids = [s.id for s in samples]
    assert len(ids) == len(set(ids)) == 8 * 2 - 1  # every (image, category) but the crowd one
    assert "train/5/dog" not in ids and "train/5/cat" in ids
    neg = {s.id for s in samples if not s.boxes}
    assert neg == {"train/2/cat", "train/3/dog", "train/4/dog", "train/4/cat", "train/6/cat", "train/7/cat"}
    assert {s.id for s in ds.samples(negatives=False)} == set(ids) - neg
    assert all(s.split == "train" for s in samples)


def test_solutions_are_what_the_detection_rewards_read(tmp_path):
    ds = read_coco(_coco(tmp_path), tmp_path / "train2017", categories=["dog", "cat"])
    det_iou, det_conf = get_reward("det_iou"), get_reward("det_confidence")
    by_id = {s.id: s for s in ds.samples()}
    pos, neg = by_id["train/2/dog"], by_id["train/4/dog"]
    assert pos.solution() == [[52, 0, 78, 34], [950, 900, 1000, 1000]] and neg.solution() == []
    exact = "<answer>[" + ", ".join(f"{{'Position': {b}, 'Confidence': 1.0}}" for b in pos.solution()) + "]</answer>"
    none = "<think>no dog</think><answer>No Objects</answer>"
    assert det_iou([exact, none], [pos.solution(), pos.solution()]) == [1.0, 0.0]
    assert det_iou([none, exact], [neg.solution(), neg.solution()]) == [1.0, 0.0]
    assert det_conf([exact, none], [pos.solution(), neg.solution()]) == [1.0, 1.0]
    assert "'dog'" in detection_prompt(pos.category)


def test_k_shot_counts_an_image_for_every_category_it_holds(tmp_path):
    ds = read_coco(_coco(tmp_path), tmp_path / "train2017", categories=["dog", "cat"])
    chosen = k_shot_images(ds, k=2, seed=3)
    assert chosen == k_shot_images(ds, k=2, seed=3)  # reproducible
    for c in ("dog", "cat"):
        assert sum(1 for im in chosen if c in im.boxes) >= 2
    assert len(chosen) <= 4
    # k=4 for dog takes 4 of its 5 images; cat then only tops up what those already hold
    chosen4 = k_shot_images(ds, k=4, seed=0)
    assert sum(1 for im in chosen4 if "dog" in im.boxes) >= 4 and sum(1 for im in chosen4 if "cat" in im.boxes) >= 4
    assert len({tuple(im.id for im in k_shot_images(ds, k=2, seed=s)) for s in range(12)}) > 1  # the seed matters
    n_negatives = 0
    for seed in range(12):
        chosen = k_shot_images(ds, k=2, seed=seed)
        samples = k_shot_detection(ds, k=2, seed=seed)
        assert {s.id.split("/")[1] for s in samples} == {im.id for im in chosen}
        # every chosen image is asked about every category it does not hold (bar crowd-only ones)
        expected = {f"train/{im.id}/{c}" for im in chosen for c in ds.categories
                    if c not in im.boxes and c not in im.ambiguous}
        assert {s.id for s in samples if not s.boxes} == expected
        assert all(s.boxes for s in k_shot_detection(ds, 2, seed, negatives=False))
        n_negatives += len(expected)
    assert n_negatives > 0
    with pytest.raises(DatasetError, match=r"category 'cat' is in 4 image\(s\) of train2017, fewer than k=5"):
        k_shot_images(ds, k=5, seed=0)


def test_unknown_category_and_wrong_layouts_are_named(tmp_path):
    ann = _coco(tmp_path)
    with pytest.raises(DatasetError, match=r"instances_train2017.json: unknown categor\(ies\) \['zebra'\]; the file has"):
        read_coco(ann, tmp_path / "train2017", categories=["dog", "zebra"])
    with pytest.raises(DatasetError, match=r"image folder not found: .*val2017"):
        read_coco(ann, tmp_path / "val2017")
    with pytest.raises(DatasetError, match=r"COCO annotation file not found: .*instances_val2017.json"):
        read_coco_dir(tmp_path, "val2017")
    (tmp_path / "train2017" / "000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image not found: .*000000000001.jpg \('file_name' of image 1"):
        read_coco(ann, tmp_path / "train2017")


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("annotations"), "not a COCO instances file: missing list(s) ['annotations']"),
    (lambda d: d["images"][0].pop("width"), "images[0] needs an integer 'id', a 'file_name' and positive"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotations[0] (id 100): image_id 99 is not in 'images'"),
    (lambda d: d["annotations"][1].update(bbox=[0, 0, 0, 5]), "annotations[1] (id 101): box must have x1 < x2"),
    (lambda d: d["annotations"][1].update(bbox=[0, 0, 5]), "annotations[1] (id 101): bbox must be [x, y, w, h]"),
])
def test_malformed_coco_is_named(tmp_path, mutate, needle):
    ann = _coco(tmp_path, mutate=mutate)
    with pytest.raises(DatasetError) as err:
        read_coco(ann, tmp_path / "train2017")
    assert str(ann) in str(err.value) and needle in str(err.value)
