"""Does labeling the images the ensemble is least sure of pay? Active learning against random picks, on val.

    python -m analyses.active_learning            # after `dvc repro` (it reads the run's feature stores)

A simulated annotator: the train split's images are the pool whose labels are held back until picked. Each
seed starts both strategies from the same ``--start`` images drawn at random, then for ``--rounds`` rounds fits
the ensemble (the fit stage's, ``--members`` members trained for ``--fit-steps`` optimizer steps each: the
same number at every round, so the curve varies only the labels) on the labeled images, scores it on the
**val** split by the paper's protocol, and labels ``--add`` more images: the ones whose top-decile
Jensen-Shannon disagreement (the suggest stage's ``suggest.score``: ``pipeline.analysis.suggest``) is highest,
or ``--add`` drawn at random. The test split is never read. It is one sequential process, not queued DVC
experiments, because each round's picks depend on the previous round's model; it reads the stores of the
finished run (``features/t{t}.zarr``) and changes nothing in it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask.array as da
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline.analysis.suggest import image_score  # noqa: E402
from pipeline.atomic import write_json_atomic  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.ensemble.evaluation import score  # noqa: E402
from pipeline.ensemble.fit import fit_ensemble, image_rows  # noqa: E402
from pipeline.ensemble.predict import vote  # noqa: E402
from pipeline.features.store import lazy_matrix, open_step_stores  # noqa: E402
from pipeline.outputs.figures import save_figure  # noqa: E402

STRATEGIES = ("uncertainty", "random")
CHUNK_ROWS = 65536  # rows per chunk handed to fit_ensemble and vote


def pick_uncertain(disagreement: np.ndarray, candidates: list[int], count: int, pixels: int, how) -> list[int]:
    """The ``count`` candidates whose images score highest (``image_score``); ties to the lower index."""
    scores = [image_score(disagreement[k * pixels:(k + 1) * pixels], how) for k in range(len(candidates))]
    order = sorted(range(len(candidates)), key=lambda k: (-scores[k], candidates[k]))
    return sorted(candidates[k] for k in order[:count])


def run(params, stores_pattern: str, *, start: int, add: int, rounds: int, seeds: list[int], members: int,
        fit_steps: int) -> dict:
    torch.set_num_threads(1)  # the ensemble's arithmetic as in fit and evaluate: results do not depend on cores
    stores = open_step_stores(stores_pattern, params)
    pixels = stores[0].pixels_per_image("train")
    # Streamed from the stores as fit streams them (flat memory at any image size); only the val labels are read.
    train, train_labels = lazy_matrix(stores, "train", params.blocks)
    val, val_labels = lazy_matrix(stores, "val", params.blocks)
    val, val_labels = val.rechunk((CHUNK_ROWS, -1)), np.asarray(val_labels.compute())
    images = len(stores[0].image_ids("train"))
    if start + add * rounds > images:
        raise SystemExit(f"--start {start} + --add {add} x --rounds {rounds} needs {start + add * rounds} train "
                         f"images; the stores hold {images}")
    config = params.ensemble.model_copy(update={"members": members, "steps": fit_steps, "train_images": None})
    names, ignore = params.dataset.names(), params.dataset.ignore_label
    device = torch.device("cpu")

    def rows(chosen: list[int]) -> tuple[da.Array, da.Array]:  # the chosen images' rows, in CHUNK_ROWS chunks
        matrix, labels = image_rows(train, train_labels, chosen, pixels)
        return matrix.rechunk((CHUNK_ROWS, -1)), labels.rechunk(CHUNK_ROWS)

    curves = []
    for seed in seeds:
        initial = sorted(int(i) for i in np.random.default_rng(seed).permutation(images)[:start])
        for strategy in STRATEGIES:
            labeled, rng = list(initial), np.random.default_rng([seed, 1])
            for round_ in range(rounds + 1):
                begin = time.perf_counter()
                model, _ = fit_ensemble(*rows(labeled), num_classes=len(names), ignore_label=ignore,
                                        config=config.model_copy(update={"seed": seed}), device=device)
                precision = config.resolved().autocast
                prediction, _ = vote(model, val, batch_pixels=16384, device=device, precision=precision)
                miou = score(val_labels, prediction, names, ignore)["miou"]
                curves.append({"seed": seed, "strategy": strategy, "round": round_, "labeled": len(labeled),
                               "val_miou": miou, "images": list(labeled),
                               "seconds": round(time.perf_counter() - begin, 1)})
                print(f"seed {seed} {strategy:11s} round {round_}: {len(labeled):2d} labeled images, val mIoU "
                      f"{miou:.3f}", flush=True)
                if round_ == rounds:
                    break
                pool = [i for i in range(images) if i not in labeled]
                if strategy == "random":
                    new = sorted(int(i) for i in rng.choice(pool, size=add, replace=False))
                else:
                    _, disagreement = vote(model, rows(pool)[0], batch_pixels=16384, device=device,
                                           precision=precision)
                    new = pick_uncertain(disagreement, pool, add, pixels, params.suggest.score)
                labeled = sorted(labeled + new)
    return {"split": "val", "checkpoint_sha256": stores[0].record.checkpoint_sha256, "start": start, "add": add,
            "rounds": rounds, "seeds": seeds,
            "fit": {"members": members, "optimizer_steps": fit_steps, "recipe": config.recipe.value},
            "score": params.suggest.score.value, "pool_images": images, "curves": curves}


def summary(record: dict) -> pd.DataFrame:
    """Mean and std of val mIoU over the seeds, per strategy and number of labeled images."""
    frame = pd.DataFrame(record["curves"])
    table = frame.groupby(["strategy", "labeled"])["val_miou"].agg(["mean", "std", "count"]).reset_index()
    return table.rename(columns={"mean": "val_mean", "std": "val_std", "count": "seeds"})


def plot(record: dict, path: Path) -> None:
    table = summary(record)
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for strategy, marker in zip(STRATEGIES, ("o", "s")):
        part = table[table["strategy"] == strategy]
        axis.errorbar(part["labeled"], part["val_mean"], yerr=part["val_std"].fillna(0), marker=marker, capsize=3,
                      label=f"{strategy} ({int(part['seeds'].max())} seeds)")
    axis.set_xlabel("labeled images")
    axis.set_ylabel("val mIoU (paper protocol)")
    axis.set_title(f"Active learning: +{record['add']} images a round, {record['fit']['members']} members x "
                   f"{record['fit']['optimizer_steps']} steps each round", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)  # makes the folder, writes a temporary and renames
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--stores", default="features/t{t}.zarr")
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--add", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=4, help="ensemble members (two or more: disagreement)")
    parser.add_argument("--fit-steps", type=int, default=400, help="optimizer steps per member, every round")
    parser.add_argument("--out", type=Path, default=Path("analyses/results/active_learning.json"))
    parser.add_argument("--figure", type=Path, default=Path("analyses/results/active_learning.png"))
    args = parser.parse_args()
    if args.members < 2:
        parser.error("--members must be 2 or more: uncertainty is the members' disagreement")
    begin = time.perf_counter()
    record = run(load_params(args.params), args.stores, start=args.start, add=args.add, rounds=args.rounds,
                 seeds=args.seeds, members=args.members, fit_steps=args.fit_steps)
    record["seconds"] = round(time.perf_counter() - begin, 1)
    record["command"] = " ".join(["python -m analyses.active_learning", *__import__("sys").argv[1:]])
    write_json_atomic(record, args.out)
    plot(record, args.figure)
    print(summary(record).to_string(index=False))
    print(f"{record['seconds']} s -> {args.out}, {args.figure}")


if __name__ == "__main__":
    main()
