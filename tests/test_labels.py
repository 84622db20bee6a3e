"""dataset.labels: png and coco masks prepare to the same .npy masks as the npy route, and bad ones are refused
naming the file and the value (pipeline/data/labels.py, pipeline/data/prepare.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import ConfigError, DatasetConfig, LabelFormat, params_from_dict
from pipeline.data.labels import CocoFile, CocoImage, coco_mask
from pipeline.data.prepare import prepare_folder
from pipeline.errors import DatasetError

IGNORE = 255
COLOURS = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC's first three
IGNORE_COLOUR = [224, 224, 192]  # VOC's border colour


def _rect(top: int, left: int, bottom: int, right: int) -> list[float]:
    """A rectangle polygon on pixel edges: it covers rows [top, bottom) and columns [left, right)."""
    return [left, top, right, top, right, bottom, left, bottom]


def _masks() -> dict[tuple[str, str], np.ndarray]:
    """Hand-made 8x8 masks, each drawable as the COCO annotations of ``_coco`` below."""
    a = np.zeros((8, 8), np.uint8)
    a[1:4, 1:5] = 1
    a[2:3, 2:4] = 2  # inside the larger class-1 rectangle
    b = np.zeros((8, 8), np.uint8)
    b[2:7, 1] = 1  # uncompressed RLE: column-major pixels 10..14
    b[6, 6] = b[7, 7] = b[6, 7] = IGNORE  # compressed RLE, ignore category
    c = np.zeros((8, 8), np.uint8)
    c[4:8, 0:8] = 2
    d = np.full((8, 8), 1, np.uint8)
    return {("train", "a"): a, ("train", "b"): b, ("test", "c"): c, ("test", "d"): d}


def _write_images(root):
    for index, (split, stem) in enumerate(_masks()):
        (root / "real" / split).mkdir(parents=True, exist_ok=True)
        image = np.stack([np.full((8, 8), 40 * index, np.uint8), np.full((8, 8), 90, np.uint8),
                          np.arange(64, dtype=np.uint8).reshape(8, 8)], -1)
        Image.fromarray(image).save(root / "real" / split / f"{stem}.png")  # a .png image: its mask must live apart
    return root


def _write_npy(root):
    _write_images(root)
    for (split, stem), mask in _masks().items():
        np.save(root / "real" / split / f"{stem}.npy", mask)
    return root


def _png_path(root, split, stem):
    folder = root / "real" / split / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}.png"


def _write_png(root, mode):
    _write_images(root)
    palette = [value for colour in COLOURS for value in colour] + [0] * (256 - len(COLOURS)) * 3
    palette[IGNORE * 3 : IGNORE * 3 + 3] = IGNORE_COLOUR
    for (split, stem), mask in _masks().items():
        if mode == "RGB":
            table = np.zeros((256, 3), np.uint8)
            table[: len(COLOURS)], table[IGNORE] = COLOURS, IGNORE_COLOUR
            image = Image.fromarray(table[mask], "RGB")
        else:
            image = Image.fromarray(mask, "L")
            if mode == "P":
                image = image.convert("P")
                image.putpalette(palette)
        image.save(_png_path(root, split, stem))
    return root


def _rle_counts_of(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _coco(split_names: list[str]) -> dict:
    """COCO annotations drawing ``_masks()`` of the given splits: polygons (the larger rectangle listed after the
    smaller, so 'later wins' would differ from 'smaller wins'), uncompressed RLE, compressed RLE."""
    masks = _masks()
    ignore_region = (masks[("train", "b")] == IGNORE)
    shapes = {"a": [(2, _rect(2, 2, 3, 4)), (1, _rect(1, 1, 4, 5))],
              "b": [(1, {"size": [8, 8], "counts": [10, 5, 49]}), (9, {"size": [8, 8], "counts": _rle_counts_of(ignore_region)})],
              "c": [(2, [_rect(4, 0, 6, 8), _rect(6, 0, 8, 8)])],  # one annotation of two polygons
              "d": [(1, _rect(0, 0, 8, 8))]}
    images, annotations = [], []
    for index, (split, stem) in enumerate(key for key in masks if key[0] in split_names):
        images.append({"id": 100 + index, "file_name": f"images/{stem}.png", "height": 8, "width": 8})
        for category, segmentation in shapes[stem]:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + index, "category_id": category,
                                "segmentation": segmentation if isinstance(segmentation, dict) or
                                isinstance(segmentation[0], list) else [segmentation], "iscrowd": 0})
    categories = [{"id": 1, "name": "wall"}, {"id": 2, "name": "window"}, {"id": 9, "name": "unsure"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_coco(root, per_split=True):
    _write_images(root)
    if per_split:
        for split in ("train", "test"):
            (root / "real" / split / "annotations.json").write_text(json.dumps(_coco([split])))
    else:
        (root / "labels.json").write_text(json.dumps(_coco(["train", "test"])))
    return root


def config(**overrides) -> DatasetConfig:
    base = dict(name="custom", image_size=8, num_classes=3, train_images=2, test_images=2)
    return DatasetConfig(**(base | overrides)).resolved()


COCO = dict(labels=LabelFormat.COCO, coco_categories={1: 1, 2: 2, 9: IGNORE})


def _prepared(out) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


@pytest.fixture
def npy_route(tmp_path):
    out = tmp_path / "from_npy"
    prepare_folder(config(), _write_npy(tmp_path / "npy"), out)
    assert np.array_equal(np.load(out / "real" / "train" / "a.npy"), _masks()[("train", "a")])
    return _prepared(out)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_indexed_and_greyscale_png_masks_prepare_as_the_npy_route(tmp_path, npy_route, mode):
    out = tmp_path / "from_png"
    prepare_folder(config(labels=LabelFormat.PNG), _write_png(tmp_path / "png", mode), out)
    assert _prepared(out) == npy_route


def test_colour_png_masks_prepare_as_the_npy_route_through_class_colors(tmp_path, npy_route):
    out = tmp_path / "from_rgb"
    settings = config(labels=LabelFormat.PNG, class_colors=COLOURS, ignore_color=IGNORE_COLOUR)
    prepare_folder(settings, _write_png(tmp_path / "rgb", "RGB"), out)
    assert _prepared(out) == npy_route
    # a palette PNG read by colour gives the same classes (its palette holds the same colours)
    prepare_folder(settings, _write_png(tmp_path / "p", "P"), tmp_path / "from_p")
    assert _prepared(tmp_path / "from_p") == npy_route


@pytest.mark.parametrize("per_split, coco_file", [(True, "real/{split}/annotations.json"), (False, "labels.json")])
def test_coco_polygons_and_rle_prepare_as_the_npy_route(tmp_path, npy_route, per_split, coco_file):
    out = tmp_path / "from_coco"
    prepare_folder(config(**COCO, coco_file=coco_file), _write_coco(tmp_path / "coco", per_split), out)
    assert _prepared(out) == npy_route


def test_coco_overlaps_the_smaller_annotation_wins_and_ties_go_to_the_later():
    square = lambda top, left: [_rect(top, left, top + 3, left + 3)]  # noqa: E731 - 9 pixels each
    annotations = ({"id": 1, "category_id": 1, "segmentation": square(0, 0)},
                   {"id": 2, "category_id": 2, "segmentation": square(1, 1)},  # same size, later: wins the overlap
                   {"id": 3, "category_id": 3, "segmentation": [_rect(0, 0, 6, 6)]})  # larger, latest: loses
    coco = CocoFile(path=None, images={"x.png": CocoImage("x.png", 6, 6, annotations)}, category_names={})
    mask = coco_mask(coco, "x.png", {1: 1, 2: 2, 3: 3}, background=0)
    expected = np.full((6, 6), 3, np.uint8)
    expected[0:3, 0:3] = 1
    expected[1:4, 1:4] = 2
    assert np.array_equal(mask, expected)


# --------------------------------------------------------------------------------------------- refusals
def test_an_unknown_colour_names_the_file_the_colour_and_its_pixel_count(tmp_path):
    root = _write_png(tmp_path / "rgb", "RGB")
    rgb = np.asarray(Image.open(root / "real/train/masks/b.png")).copy()
    rgb[0, 0:3] = [10, 20, 30]
    Image.fromarray(rgb).save(root / "real/train/masks/b.png")
    with pytest.raises(DatasetError, match=r"mask .*real/train/masks/b.png holds colour\(s\) \[10, 20, 30\] \(3 pixels\)"
                                           r" that dataset.class_colors does not list"):
        prepare_folder(config(labels=LabelFormat.PNG, class_colors=COLOURS, ignore_color=IGNORE_COLOUR), root,
                       tmp_path / "out")
    with pytest.raises(DatasetError, match=r"\[224, 224, 192\] \(3 pixels\)"):  # the border, without ignore_color
        prepare_folder(config(labels=LabelFormat.PNG, class_colors=COLOURS), root, tmp_path / "out")


def test_png_refusals_name_the_file(tmp_path):
    root = _write_png(tmp_path / "png", "RGB")
    with pytest.raises(DatasetError, match=r"masks/a.png is a colour \(RGB\) PNG; set dataset.class_colors"):
        prepare_folder(config(labels=LabelFormat.PNG), root, tmp_path / "out")
    root = _write_png(tmp_path / "index", "P")
    Image.fromarray(np.full((8, 8), 7, np.uint8), "L").save(root / "real/test/masks/d.png")
    with pytest.raises(DatasetError, match=r"masks/d.png holds value\(s\) \[7\] that are neither a class in \[0, 3\)"):
        prepare_folder(config(labels=LabelFormat.PNG), root, tmp_path / "out")
    Image.fromarray(np.zeros((4, 8), np.uint8), "L").save(root / "real/test/masks/d.png")
    with pytest.raises(DatasetError, match=r"masks/d.png is 8x4 but its image d.png is 8x8"):
        prepare_folder(config(labels=LabelFormat.PNG), root, tmp_path / "out")
    (root / "real/test/masks/d.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*real/test/d.png has no mask masks/d.png"):
        prepare_folder(config(labels=LabelFormat.PNG), root, tmp_path / "out")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "real/test/masks/d.png", format="JPEG")
    with pytest.raises(DatasetError, match=r"masks/d.png is a JPEG file, not a PNG"):
        prepare_folder(config(labels=LabelFormat.PNG), root, tmp_path / "out")


def test_coco_refuses_an_unmapped_category_naming_file_id_and_name(tmp_path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"real/train/annotations.json uses category id\(s\) 9 \('unsure', 1 "
                                           r"annotations\) that dataset.coco_categories does not map"):
        prepare_folder(config(**(COCO | {"coco_categories": {1: 1, 2: 2}})), root, tmp_path / "out")


def test_coco_refuses_images_missing_on_either_side_naming_both(tmp_path):
    root = _write_coco(tmp_path / "coco")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "real/train/extra.png")
    with pytest.raises(DatasetError, match=r"image\(s\) .*real/train/extra.png have no entry in COCO file "
                                           r".*real/train/annotations.json"):
        prepare_folder(config(**COCO), root, tmp_path / "out")
    (root / "real/train/extra.png").unlink()
    (root / "real/test/d.png").unlink()
    with pytest.raises(DatasetError, match=r"COCO file .*real/test/annotations.json lists image\(s\) images/d.png "
                                           r"\(1 in all\) that are not in .*real/test"):
        prepare_folder(config(**COCO, test_images=1), root, tmp_path / "out")


def test_coco_refuses_an_entry_of_another_size_than_its_image(tmp_path):
    root = _write_coco(tmp_path / "coco")
    data = json.loads((root / "real/test/annotations.json").read_text())
    data["images"][1].update(height=6, width=7)
    (root / "real/test/annotations.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"mask .*annotations.json \(entry images/d.png\) is 7x6 but its image d.png "
                                           r"is 8x8"):
        prepare_folder(config(**COCO), root, tmp_path / "out")


@pytest.mark.parametrize("dataset, message", [
    ({"class_colors": COLOURS[:2]}, r"dataset.class_colors has 2 colours but dataset.num_classes is 3"),
    ({"class_colors": [[0, 0, 0], [1, 1, 1], [0, 0, 0]]}, r"gives colour\(s\) \[0, 0, 0\] to more than one class"),
    ({"class_colors": [[0, 0, 0], [1, 1, 1], [2, 2, 256]]}, r"dataset.class_colors\[2\]\[2\] must be <= 255"),
    ({"labels": "coco"}, r"dataset.labels is coco but dataset.coco_categories is null"),
    ({"labels": "coco", "coco_categories": {1: 5}}, r"maps category id\(s\) \{1: 5\} outside the classes \[0, 3\)"),
    ({"labels": "coco", "coco_categories": {1: 1}, "coco_file": "../x.json"}, r"must be a path inside dataset.root"),
    ({"labels": "tiff"}, r"dataset.labels='tiff' is not one of \['npy', 'png', 'coco'\]"),
])
def test_label_params_are_checked_against_the_classes(dataset, message):
    base = {"name": "custom", "root": "x", "image_size": 32, "num_classes": 3, "train_images": 1, "test_images": 1}
    with pytest.raises(ConfigError, match=message):
        params_from_dict({"dataset": base | dataset})


def test_the_prepare_stage_reads_coco_from_params_yaml_and_refuses_an_unmapped_category(tmp_path, monkeypatch, capsys):
    from stages.prepare import main
    from tests.helpers import exit_code_2_stderr, write_params

    root = _write_coco(tmp_path / "coco")
    settings = {"dataset.name": "mine", "dataset.root": str(root), "dataset.image_size": 8, "dataset.num_classes": 3,
                "dataset.train_images": 2, "dataset.val_images": 0, "dataset.test_images": 2,
                "dataset.labels": "coco", "dataset.coco_categories": {1: 1, 2: 2, 9: IGNORE},
                "ddpm.model.channel_mult": [1, 2]}
    params = write_params(tmp_path / "params.yaml", settings)
    assert "coco_categories:\n    1: 1\n" in params.read_text()  # a YAML mapping with integer keys
    monkeypatch.setattr("sys.argv", ["prepare", "--params", str(params), "--out", str(tmp_path / "prepared")])
    main()
    assert np.array_equal(np.load(tmp_path / "prepared/real/train/a.npy"), _masks()[("train", "a")])
    params = write_params(tmp_path / "bad.yaml", settings | {"dataset.coco_categories": {1: 1, 2: 2}})
    err = exit_code_2_stderr(main, ["prepare", "--params", params, "--out", tmp_path / "again"], monkeypatch, capsys)
    assert "uses category id(s) 9 ('unsure', 1 annotations) that dataset.coco_categories does not map" in err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("breaker, message", [
    (lambda path: path.unlink(), r"COCO file .*real/train/annotations.json does not exist; put it there or set "
                                 r"dataset.coco_file"),
    (lambda path: path.write_text("{not json"), r"COCO file .*annotations.json is not readable JSON"),
    (lambda path: path.write_text(json.dumps({"images": [{"id": 3, "file_name": "a.png", "width": 8}],
                                              "annotations": []})),
     r"COCO file .*annotations.json: image a.png has no valid 'height' \(got None\); it does not follow the COCO format"),
])
def test_a_coco_file_that_is_missing_or_not_coco_is_named(tmp_path, breaker, message):
    root = _write_coco(tmp_path / "coco")
    breaker(root / "real/train/annotations.json")
    with pytest.raises(DatasetError, match=message):
        prepare_folder(config(**COCO), root, tmp_path / "out")


def test_one_coco_file_for_all_splits_refuses_a_file_name_in_two_splits(tmp_path):
    root = _write_coco(tmp_path / "coco", per_split=False)
    Image.open(root / "real/train/a.png").save(root / "real/test/a.png")
    with pytest.raises(DatasetError, match=r"real/train/a.png and .*real/test/a.png share a file name, so one COCO file "
                                           r".*labels.json cannot tell them apart"):
        prepare_folder(config(**COCO, coco_file="labels.json"), root, tmp_path / "out")
