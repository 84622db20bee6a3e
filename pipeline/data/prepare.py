"""prepare's work on a user's folder: select the splits' examples, read their masks in any label format once,
and write the prepared layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data.images import load_image
from pipeline.data.labels import CocoFile, coco_mask, read_coco, read_png_mask
from pipeline.data.layout import Example, Split, list_examples, list_images, split_dir, write_example
from pipeline.data.masks import drop_small_classes, fit_mask, load_mask
from pipeline.enums import LabelFormat
from pipeline.errors import DatasetError


def coco_path(config: DatasetConfig, root: Path, split: Split) -> Path:
    """The COCO file of a split: ``dataset.coco_file`` under ``root``, ``{split}`` replaced by the split's name."""
    return Path(root) / config.coco_file.replace("{split}", split.value)


def _source_examples(config: DatasetConfig, root: Path, split: Split) -> list[Example]:
    return list_examples(root, split, labels=config.labels,
                         coco_file=coco_path(config, root, split) if config.labels is LabelFormat.COCO else None)


def folder_demo(config: DatasetConfig, root: Path, out: Path) -> int:
    """The first ``config.demo_images`` images (sorted by name) of ``<root>/unlabeled``, if it has any, as
    prepare writes them (square, resized PNG) into ``out``: images no split scores. Returns the count."""
    unlabeled = root / "unlabeled"
    paths = (list_images(unlabeled) if unlabeled.is_dir() else [])[: config.demo_images]
    for path in paths:
        write_example(out, path.stem, load_image(path, config.image_size, config.non_square), None)
    return len(paths)


def select_examples(config: DatasetConfig, root: Path) -> dict[Split, list[Example]]:
    """Which source images make each split: the first ``train_images`` / ``test_images`` (sorted by name)
    of real/train and real/test; val is the first ``val_images`` of real/val when that folder exists,
    else the ``val_images`` train images that follow the training ones (held out, never trained on)."""
    train, test = _source_examples(config, root, Split.TRAIN), _source_examples(config, root, Split.TEST)
    has_val_folder = split_dir(root, Split.VAL).is_dir()
    val_source = _source_examples(config, root, Split.VAL) if has_val_folder else train[config.train_images :]
    wanted = {Split.TRAIN: (train, config.train_images, "dataset.train_images"),
              Split.TEST: (test, config.test_images, "dataset.test_images")}
    for split, (examples, count, key) in wanted.items():
        if len(examples) < count:
            raise DatasetError(f"{split_dir(root, split)} has {len(examples)} images but {key} asks for {count}; "
                               f"lower {key} or add images")
    if len(val_source) < config.val_images:
        where = (f"{split_dir(root, Split.VAL)} has {len(val_source)} images" if has_val_folder else
                 f"{split_dir(root, Split.TRAIN)} has {len(train)} images, {config.train_images} for training")
        raise DatasetError(f"{where}, but dataset.val_images asks for {config.val_images} validation images; lower "
                           f"dataset.val_images (or dataset.train_images) or add a real/val folder")
    return {Split.TRAIN: train[: config.train_images], Split.VAL: val_source[: config.val_images],
            Split.TEST: test[: config.test_images]}


def coco_files(config: DatasetConfig, root: Path) -> dict[Path, CocoFile]:
    """Each COCO file of the dataset's split folders, read once, checked against the folders it covers (one
    per split with ``{split}`` in ``dataset.coco_file``, else all): an image on disk without an entry, or an
    entry without an image on disk, is a ``DatasetError`` naming both."""
    folders: dict[Path, list[Path]] = {}
    for split in Split:
        if split_dir(root, split).is_dir():
            folders.setdefault(coco_path(config, root, split), []).append(split_dir(root, split))
    files = {}
    for path, covered in folders.items():
        coco = files[path] = read_coco(path, config.coco_categories)
        on_disk: dict[str, Path] = {}
        for image in (image for folder in covered for image in list_images(folder)):
            if image.name in on_disk:
                raise DatasetError(f"{on_disk[image.name]} and {image} share a file name, so one COCO file {path} "
                                   f"cannot tell them apart; rename one, or use a COCO file per split "
                                   f"(dataset.coco_file: real/{{split}}/annotations.json)")
            on_disk[image.name] = image
        missing = sorted(set(on_disk) - set(coco.images))
        if missing:
            raise DatasetError(f"image(s) {', '.join(str(on_disk[name]) for name in missing[:5])} have no entry in COCO "
                               f"file {path} ({len(missing)} in all); annotate them there or remove them from "
                               f"{', '.join(str(folder) for folder in covered)}")
        absent = sorted(set(coco.images) - set(on_disk))
        if absent:
            raise DatasetError(f"COCO file {path} lists image(s) {', '.join(coco.images[name].file_name for name in absent[:5])} "
                               f"({len(absent)} in all) that are not in {', '.join(str(folder) for folder in covered)}; "
                               f"add the images there, or use a COCO file (dataset.coco_file) of these images only")
    return files


def read_source_mask(config: DatasetConfig, example: Example, cocos: dict[Path, CocoFile]) -> np.ndarray:
    """The ``[image_size, image_size] uint8`` mask of a source image in any ``dataset.labels`` format, checked
    against its image as ``fit_mask`` checks it."""
    checks = (example.image_path, config.image_size, config.num_classes, config.ignore_label, config.non_square)
    if config.labels is LabelFormat.NPY:
        return load_mask(example.mask_path, *checks)
    if config.labels is LabelFormat.PNG:
        mask = read_png_mask(example.mask_path, config.class_colors, config.ignore_color, config.ignore_label)
        return fit_mask(mask, example.mask_path, *checks)
    name = example.image_path.name
    mask = coco_mask(cocos[example.mask_path], name, config.coco_categories, config.coco_background)
    return fit_mask(mask, f"{example.mask_path} (entry {cocos[example.mask_path].images[name].file_name})", *checks)


def prepare_folder(config: DatasetConfig, root: Path, out_root: Path) -> dict[str, int]:
    """Validate a dataset in the paper's layout and write the splits of ``select_examples`` and any
    unlabeled images to ``out_root`` in canonical form (square, resized PNG + uint8 ``.npy`` mask whatever
    ``dataset.labels`` the source has, small classes dropped to ignore in training masks when
    ``min_class_pixels`` > 0)."""
    if not root.is_dir():
        raise DatasetError(f"dataset.root {root} is not a folder; point it at a dataset in the paper's layout")
    counts = {}
    selected = select_examples(config, root)
    cocos = coco_files(config, root) if config.labels is LabelFormat.COCO else {}
    for split, examples in selected.items():
        split_dir(out_root, split).mkdir(parents=True, exist_ok=True)
        for example in examples:
            image = load_image(example.image_path, config.image_size, config.non_square)
            mask = read_source_mask(config, example, cocos)
            if split is Split.TRAIN:  # the paper filters training masks only; test masks are scored as given
                mask = drop_small_classes(mask, config.min_class_pixels, config.ignore_label)
            write_example(split_dir(out_root, split), example.stem, image, mask)
        counts[split.value] = len(examples)
    unlabeled = root / "unlabeled"
    paths = list_images(unlabeled) if unlabeled.is_dir() else []
    for path in paths:
        write_example(out_root / "unlabeled", path.stem, load_image(path, config.image_size, config.non_square), None)
    counts["unlabeled"] = len(paths)
    return counts
