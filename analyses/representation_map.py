"""The paper's representation map: which decoder block at which diffusion step carries the semantics, for small
and for large classes (Baranchuk et al. 2022, Fig. 2), scored on val.

    python -m analyses.representation_map                  # every decoder block x t in 10 ... 800 on the digits
    python -m analyses.representation_map --steps 50 250 --blocks 2 5

For each step of ``--steps`` the extract stage writes one store holding every decoder block of the train and
val images (``--stores``, default ``analyses/stores/t{t}.zarr``; a rerun keeps the stores that are current, so
only new steps, a new checkpoint or changed code cost an extraction). Then, per cell (block, t), a light
classifier (the fit stage's ensemble MLP, ``--members`` members trained for ``--fit-steps`` optimizer steps
each, the same number in every cell) is fit on that one block's train pixels and scored on the **val**
pixels by the paper's protocol. The test split is never read.

Small and large classes are split as the paper's figure splits them, by their area: a class's mean share of
the pixels of the training masks (ignore label excluded); classes below the median share are small, the
others large (the background of the digits is large). Writes a JSON table (block, t, mIoU all / small /
large, per-class IoU, the split) and one heatmap per class group, read like the paper's figure: rows are
blocks from the deepest (0, lowest resolution) to the last, columns the steps.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from pipeline.atomic import write_json_atomic  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.diffusion.train import load_checkpoint  # noqa: E402
from pipeline.ensemble.evaluation import fit_and_score  # noqa: E402
from pipeline.features.record import params_record  # noqa: E402
from pipeline.features.store import lazy_matrix, open_store  # noqa: E402
from pipeline.outputs.figures import save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = (10, 50, 100, 150, 250, 400, 600, 800)
GROUPS = ("all", "small", "large")


def class_areas(labels: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """Each class's share of the labeled train pixels (the ignore label left out)."""
    labeled = labels[labels != ignore_label].astype(np.int64)
    return np.bincount(labeled, minlength=num_classes)[:num_classes] / max(labeled.size, 1)


def split_by_area(areas: np.ndarray, class_names: list[str]) -> dict[str, list[str]]:
    """Classes below the median area are small, the others large (classes absent from the train masks: neither)."""
    present = areas > 0
    median = float(np.median(areas[present]))
    return {"small": [n for n, a, p in zip(class_names, areas, present) if p and a < median],
            "large": [n for n, a, p in zip(class_names, areas, present) if p and a >= median]}


def group_miou(per_class: dict[str, float | None], names: list[str]) -> float | None:
    """Mean IoU over ``names`` (classes with no IoU, absent from val and never predicted, left out)."""
    values = [per_class[n] for n in names if per_class.get(n) is not None]
    return round(float(np.mean(values)), 6) if values else None


def extract_stores(params_path: Path, steps: list[int], stores: str, data: Path, checkpoint: Path) -> tuple[Path, str]:
    """The extract stage over ``steps`` with every decoder block stored, into ``stores`` (a pattern with {t});
    returns the params file it ran with (beside the stores) and what it printed."""
    params = yaml.safe_load(params_path.read_text())
    params["t_steps"] = list(steps)
    model, _, _ = load_checkpoint(checkpoint)
    every_block = list(range(model.num_decoder_blocks))
    params.setdefault("features", {}).update({"store_blocks": every_block, "layout": "pixels"})
    folder = Path(stores.format(t=0)).parent
    folder.mkdir(parents=True, exist_ok=True)
    run_params = folder / "params.yaml"
    run_params.write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "stages.extract", "--params", str(run_params), "--stores", stores,
               "--data", str(data), "--checkpoint", str(checkpoint)]
    result = subprocess.run(command, cwd=REPO, text=True, stdout=subprocess.PIPE)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(f"the extract stage failed ({result.returncode}): {' '.join(command)}")
    return run_params, result.stdout


def representation_map(run_params: Path, stores: str, steps: list[int], blocks: list[int] | None, *, members: int,
                       fit_steps: int, seed: int) -> dict:
    params = load_params(run_params)
    dataset = params.dataset
    class_names, ignore = list(dataset.class_names), dataset.ignore_label
    config = params.ensemble.model_copy(update={"members": members, "steps": fit_steps, "seed": seed,
                                                "train_images": None})
    opened = {t: open_store(stores.format(t=t), params_record(params, t)) for t in steps}
    stored = list(opened[steps[0]].record.blocks)
    blocks = stored if blocks is None else blocks
    missing = sorted(set(blocks) - set(stored))
    if missing:
        sys.exit(f"--blocks {missing} are not decoder blocks of this checkpoint (it has {stored})")
    _, train_labels = lazy_matrix([opened[steps[0]]], "train", [blocks[0]])
    train_labels = np.asarray(train_labels.compute())
    groups = split_by_area(class_areas(train_labels, len(class_names), ignore), class_names)
    groups["all"] = [n for n in class_names]
    cells = []
    for t in steps:
        for block in blocks:
            start = time.perf_counter()
            train = tuple(np.asarray(a.compute()) for a in lazy_matrix([opened[t]], "train", [block]))
            val = tuple(np.asarray(a.compute()) for a in lazy_matrix([opened[t]], "val", [block]))
            metrics = fit_and_score(train, val, config=config, class_names=class_names, ignore_label=ignore,
                                    chunk_rows=65536)
            cell = {"t": t, "block": block, "features": int(train[0].shape[1]),
                    **{f"miou_{g}": group_miou(metrics["per_class_iou"], groups[g]) for g in GROUPS},
                    "per_class_iou": metrics["per_class_iou"], "seconds": round(time.perf_counter() - start, 1)}
            cells.append(cell)
            print(f"t={t:4d} block {block}: val mIoU {cell['miou_all']:.3f} (small {cell['miou_small']}, "
                  f"large {cell['miou_large']}) in {cell['seconds']} s", flush=True)
    return {"split": "val", "checkpoint_sha256": opened[steps[0]].record.checkpoint_sha256, "steps": steps,
            "blocks": blocks, "classes": {g: groups[g] for g in ("small", "large")},
            "classifier": {"members": members, "optimizer_steps": fit_steps, "seed": seed,
                           "recipe": config.recipe.value},
            "train_images": len(opened[steps[0]].image_ids("train")),
            "val_images": len(opened[steps[0]].image_ids("val")), "cells": cells}


def plot_map(result: dict, path: Path) -> None:
    """One heatmap per class group: blocks down, steps across, val mIoU in each cell."""
    steps, blocks = result["steps"], result["blocks"]
    size = (2.8 + 0.75 * len(steps), len(GROUPS) * (1.0 + 0.38 * len(blocks)) + 0.6)
    figure, axes = plt.subplots(len(GROUPS), 1, figsize=size, squeeze=False)
    lookup = {(c["block"], c["t"]): c for c in result["cells"]}
    for axis, group in zip(axes[:, 0], GROUPS):
        grid = np.array([[np.nan if lookup[(b, t)][f"miou_{group}"] is None else lookup[(b, t)][f"miou_{group}"]
                          for t in steps] for b in blocks])
        top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
        image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=max(top, 1e-6), aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value < 0.6 * top else "black")
        axis.set_xticks(range(len(steps)), [str(t) for t in steps])
        axis.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        axis.set_xlabel("diffusion step t")
        axis.set_ylabel("decoder block")
        names = result["classes"].get(group)
        axis.set_title(f"{group} classes" + (f" ({len(names)}: {', '.join(n.removeprefix('digit_') for n in names)})"
                                              if names else ""), fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="val mIoU")
    figure.suptitle(f"One decoder block at one step: val mIoU\n({result['classifier']['members']}-member MLP, "
                    f"{result['classifier']['optimizer_steps']} steps, {result['train_images']} train images, "
                    f"{result['val_images']} val images)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)  # makes the folder, writes a temporary and renames
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ddpm.pt"))
    parser.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="default: every decoder block")
    parser.add_argument("--stores", default="analyses/stores/t{t}.zarr", help="store pattern with {t}")
    parser.add_argument("--members", type=int, default=2, help="MLPs per cell (the light classifier)")
    parser.add_argument("--fit-steps", type=int, default=300, help="optimizer steps per member, equal in every cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("analyses/results/representation_map.json"))
    parser.add_argument("--figure", type=Path, default=Path("analyses/results/representation_map.png"))
    args = parser.parse_args()
    if "{t}" not in args.stores:
        parser.error(f"--stores {args.stores!r} has no {{t}}")
    start = time.perf_counter()
    run_params, _ = extract_stores(args.params, args.steps, args.stores, args.data, args.checkpoint)
    result = representation_map(run_params, args.stores, args.steps, args.blocks, members=args.members,
                                fit_steps=args.fit_steps, seed=args.seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["command"] = " ".join(["python -m analyses.representation_map", *sys.argv[1:]])
    write_json_atomic(result, args.out)
    plot_map(result, args.figure)
    best = max(result["cells"], key=lambda c: c["miou_all"])
    print(f"{len(result['cells'])} cells in {result['seconds']} s; best: block {best['block']} at t={best['t']} "
          f"(val mIoU {best['miou_all']:.3f}) -> {args.out}, {args.figure}")


if __name__ == "__main__":
    main()
