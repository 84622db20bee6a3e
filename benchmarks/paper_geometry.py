"""An FFHQ-34-sized run through the real stages, timed stage by stage (issue 29 item 1).

FFHQ-34's geometry (the paper's main table): 20 train, 20 val and 20 test images at 256², 34 classes, the
paper's 256 model (``ddpm.preset: adm256``, 552.8M parameters; random weights here: nothing can be downloaded,
written by ``store_layouts.paper_checkpoint`` and checked against the paper's state-dict shapes), blocks
[5, 6, 7, 8, 12] at t = 50, 150, 250 (D = 8448), 10 members, ``features.layout: native`` (what docs/benchmarks.md
recommends at this scale; ``--layout pixels`` for the paper's). No real faces can be had offline: the images are
synthetic scenes of 33 object classes on a background, each class its own colour and stripe texture, so the
labels are learnable. Every stage runs through ``dvc repro -s <stage>`` in a scratch git + DVC copy of the
repository, so each stage's wall time, peak RSS (its process tree's) and disk are its own.

    python benchmarks/paper_geometry.py --work /tmp/paper_geometry --out benchmarks/results/paper_geometry.json

Per stage: wall seconds, peak RSS, bytes its outputs take on disk. Beside them, the RAM the paper's procedure
needs for the same images: its ``train_interpreter.py`` holds every training pixel's features in one float32
array, train images x 256² x D x 4 bytes (44.3 GB for 20 images), before any copy. Run it alone (both cores):
on this 2-core CPU, with ``--epochs 1``, it took 29 minutes (extract 14.0 s an image, 3 steps, native; one
epoch of 10 members 587 s; evaluate 249 s: benchmarks/results/paper_geometry.json). The fit recipe's own
epochs (at most 4) would take up to ~4x the fit's time.
``--train-images 2 --val-images 1 --test-images 1 --members 2 --epochs 1`` checks the script in ~5 minutes.
``--reuse`` keeps a previous invocation's scratch repository (same ``--work``) and its ``--out`` JSON: the stages
whose params did not change are skipped by DVC and keep that JSON's rows (marked ``"run": "previous"``), so e.g.
``--reuse`` without ``--epochs`` reruns only fit and evaluate with the recipe's own epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_layouts import commit_scratch, environment, folder_bytes, measured, paper_checkpoint, scratch_copy  # noqa: E402,E501

SIZE = 256
# pretrain_mae and pretrain_swav write the placeholders extract depends on (the DDPM's run trains neither)
STAGES = ("prepare", "pretrain", "pretrain_mae", "pretrain_swav", "extract", "fit", "evaluate")
OUTPUTS = {"prepare": ["data/prepared"], "pretrain": ["checkpoints/ddpm.pt"], "pretrain_mae": ["checkpoints/mae.pt"],
           "pretrain_swav": ["checkpoints/swav.pt"], "extract": ["features"],
           "fit": ["ensemble"], "evaluate": ["metrics", "predictions", "plots"]}


def scene_images(root: Path, counts: dict[str, int], classes: int, seed: int = 0) -> None:
    """Scenes of ``classes - 1`` object classes on a background (class 0), as real/<split>/<stem>.png|npy: each
    image holds 6-12 rectangles of random classes, each class a fixed colour and stripe period, with noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    periods = rng.integers(3, 17, size=classes)
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    for split, count in counts.items():
        folder = root / "real" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            mask = np.zeros((SIZE, SIZE), np.uint8)
            for _ in range(rng.integers(6, 13)):
                label = rng.integers(1, classes)
                top, left = rng.integers(0, SIZE - 32, size=2)
                height, width = rng.integers(24, 96, size=2)
                mask[top : top + height, left : left + width] = label
            stripes = ((rows + columns) // periods[mask]) % 2  # each class its own stripe period
            image = colours[mask] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{split}{index}.png")
            np.save(folder / f"{split}{index}.npy", mask)


def scratch_repository(args) -> Path:
    """A git + DVC copy of the repository's tracked files, with the dataset, the checkpoint and the params."""
    root = args.work / "repo"
    scratch_copy(root)
    counts = {"train": args.train_images, "val": args.val_images, "test": args.test_images}
    scene_images(root / "data" / "datasets" / "scenes", counts, args.classes)
    checkpoint = args.work / "adm256_random.pt"
    if not checkpoint.is_file():
        print(f"wrote {checkpoint}: {paper_checkpoint(checkpoint)} parameters", flush=True)
    os.link(checkpoint, root / "models" / "adm256_random.pt")  # a dep DVC hashes; the 2.2 GB are not copied
    with open(root / ".gitignore", "a") as ignore:
        ignore.write("/models/adm256_random.pt\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["t_steps"], params["blocks"] = [50, 150, 250], None  # null = the adm256 preset's [5, 6, 7, 8, 12]
    params["dataset"].update(name="scenes", root="data/datasets/scenes", image_size=SIZE, num_classes=args.classes,
                             train_images=args.train_images, val_images=args.val_images, test_images=args.test_images)
    params["ddpm"].update(preset="adm256", checkpoint="models/adm256_random.pt")
    params["features"]["layout"] = args.layout
    params["ensemble"].update(members=args.members, epochs=args.epochs)
    params["evaluate"]["overlays"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_scratch(root)
    return root


def reused_repository(args) -> Path:
    """The previous invocation's scratch repository with this invocation's fit settings."""
    root = args.work / "repo"
    if not (root / "dvc.lock").is_file() or not (args.out and args.out.is_file()):
        raise SystemExit(f"--reuse needs a finished previous run: {root / 'dvc.lock'} and --out's JSON")
    params = yaml.safe_load((root / "params.yaml").read_text())
    counts = {"train_images": args.train_images, "val_images": args.val_images, "test_images": args.test_images}
    if any(params["dataset"][key] != value for key, value in counts.items()) or params["features"]["layout"] != args.layout:
        raise SystemExit(f"--reuse: {root} holds another geometry ({params['dataset']}); run without --reuse")
    params["ensemble"].update(members=args.members, epochs=args.epochs)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/paper_geometry"))
    parser.add_argument("--train-images", type=int, default=20)
    parser.add_argument("--val-images", type=int, default=20)
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--classes", type=int, default=34)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="null: the fit recipe's (stopping on plateau)")
    parser.add_argument("--layout", choices=("native", "pixels"), default="native")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="rerun only the stages whose params changed (see above)")
    args = parser.parse_args()
    previous = json.loads(args.out.read_text()) if args.reuse else {}
    root = reused_repository(args) if args.reuse else scratch_repository(args)
    env, dvc = environment(), str(Path(sys.executable).parent / "dvc")
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = {}
    for name in STAGES:
        run = measured([dvc, "repro", "-s", name], root, env)
        if args.reuse and "didn't change, skipping" in run["output"]:
            stages[name] = dict(previous["stages"][name], run="previous", output=run["output"])
            print(f"{name}: unchanged, the previous run's row", flush=True)
            continue
        run["disk_bytes"] = sum(folder_bytes(root / path) if (root / path).is_dir() else
                                (root / path).stat().st_size for path in OUTPUTS[name] if (root / path).exists())
        stages[name] = run
        print(f"{name}: {run['seconds']} s, peak RSS {run['peak_rss_mb']} MB, {run['disk_bytes'] / 1e9:.2f} GB",
              flush=True)
    fitted = re.search(r"fit: \d+ pixels x (\d+) features(?s:.*)fit: (\d+) epochs \(", stages["fit"]["output"])
    dim, epochs = (int(fitted[1]), int(fitted[2])) if fitted else (previous["feature_dim"], previous.get("fit_epochs_run"))
    paper_bytes = args.train_images * SIZE * SIZE * dim * 4
    result = {
        "geometry": f"{SIZE}², {args.classes} classes, adm256 random weights, blocks [5, 6, 7, 8, 12], t 50/150/250",
        "images": {"train": args.train_images, "val": args.val_images, "test": args.test_images},
        "layout": args.layout, "members": args.members, "fit_epochs_run": epochs, "feature_dim": dim,
        "paper_procedure_ram_bytes": paper_bytes,
        "val_miou": json.loads((root / "metrics" / "val.json").read_text())["miou"] if args.val_images else None,
        "test_miou": json.loads((root / "metrics" / "eval.json").read_text())["miou"],
        "stages": {name: {k: v for k, v in run.items() if k != "output"} for name, run in stages.items()},
        "params": {"ensemble": params["ensemble"], "features": params["features"]},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['geometry']}; D = {dim}; {result['images']}; {args.members} members; layout {args.layout}")
    print("| stage | wall time | peak RSS | disk |\n|---|---|---|---|")
    for name, run in stages.items():
        print(f"| {name} | {run['seconds']:.0f} s | {run['peak_rss_mb'] / 1024:.1f} GB | {run['disk_bytes'] / 1e9:.2f} GB |")
    print(f"| the paper's procedure: its training features in RAM | | {paper_bytes / 1e9:.1f} GB | |")


if __name__ == "__main__":
    main()
