"""The streamed fit against the paper's own fitting procedure, on the same feature stores, scored on val.

(a) reference: ddpm-segmentation's train_interpreter.py, written from its definitions. All labeled
    train features in RAM as float32 (ignore rows dropped), a DataLoader with a global shuffle, batch 64,
    Adam lr 1e-3, CrossEntropy, the pixel_classifier MLP (D->128->ReLU->BN->32->ReLU->BN->C, 256/128 for
    >= 30 classes, Linear weights N(0, 0.02), biases 0), members trained one after another, each stopped
    by the paper's rule (from 0-based epoch > 3 on, a batch whose loss does not beat the best batch loss
    increments a counter, a better one resets it; stop when the counter exceeds 50; at most 100 epochs).
    As the paper's setup_seed, the run seeds torch once; its members then draw from that generator.
(b) streamed: pipeline.ensemble.fit.fit_ensemble with the shipped defaults (EnsembleConfig(), the same
    values as params.yaml's ensemble section), ``--set key=value`` overriding them.
    ``--also 'name:key=value,...'`` adds another streamed fit with those overrides to the same
    interleaved run (e.g. ``--also 'bf16:autocast=bfloat16'``), one more row per geometry.

Both are scored on the **val** split with the paper's protocol: majority vote of the members
(pipeline.ensemble.metrics.majority_vote), then evaluate's metrics (pipeline.ensemble.evaluation.score: the paper's mIoU).
Every (procedure, seed) run is its own subprocess, reporting its own peak RSS (VmHWM) and its
fit seconds (from opening the stores to a trained ensemble, the paper's loading into RAM included;
val prediction excluded). Runs are interleaved a, b, b, a, a, b, ... so that load from other jobs on
the machine falls on both alike.

Geometries:
- digits: the default run's stores (``--digits-stores .../features/t{t}.zarr``, t = 50, 150, 250),
  50 train / 50 val canvases of 32 x 32, D = 576, 10 members.
- paper-like: synthetic stores written here (``--work``): 128 x 128 canvases, each 16 digit canvases of
  32 x 32 composed as pipeline/data/digits.py composes them (digit 24 px) tiled 4 x 4; train canvases from the
  digits' train pool, val canvases from the unlabeled pool (never from test). Features: the default
  run's DDPM (``--checkpoint``) applied convolutionally at 128 x 128, all 9 decoder blocks at
  t = 50, 150, 250, 350 (D = 1920), 1024-pixel chunks (16 per image, 131,072 train pixels for 8 images:
  the default 1024 MiB pool holds 279,620 rows of D = 1920, so (b) reads them once; ``--also
  'rows65536:buffer_rows=65536'`` streams them as the earlier 65,536-row default did). Fewer members than the paper's 10, for
  both procedures, keep it within minutes (``--paper-like-members``).
- paper256: the stores of benchmarks/paper_geometry.py's FFHQ-34-sized run (``--paper256-stores
  /tmp/paper_geometry/repo/features/t{t}.zarr``): 256² scenes, 34 classes, the adm256 UNet's blocks
  [5, 6, 7, 8, 12] at t = 50, 150, 250 (D = 8448), native layout. (a) holds every train pixel's features
  in RAM as float32 and then the labeled rows (a copy, as the paper's prepare_data), 2 x 256² x 8448 x 4
  bytes = 4.4 GB an image at its peak, so only the first ``--paper256-train`` train images (4: ~18 GB)
  fit this machine; both procedures fit those, and are scored on the first ``--paper256-val`` val images.
  ``--also 'global:buffer_rows=N'`` with N = the train rows gives (b) one global shuffle (every BatchNorm
  batch drawn from all images) to hold the default pool (a few images' strips) against.

    python benchmarks/fit_vs_paper.py --work /tmp/fitbench \\
        --digits-stores /tmp/fitbench/repo/features/t{t}.zarr --checkpoint /tmp/fitbench/repo/checkpoints/ddpm.pt \\
        --out benchmarks/results/fit_vs_paper.json

``--select`` instead runs streamed-fit variants (``--variant 'name:key=value,key=value'``) on the
digits val split and stores them under ``selection`` in the same JSON; that is how the defaults were
chosen (see its ``notes``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIGITS_T_STEPS = (50, 150, 250)
PAPER_LIKE = {"size": 128, "tile": 32, "digit_size": 24, "t_steps": (50, 150, 250, 350), "blocks": tuple(range(9)),
              "chunk_pixels": 1024}


# ---------------------------------------------------------------------------------------------
# (a) the paper's procedure
# ---------------------------------------------------------------------------------------------
def paper_classifier(dim: int, num_classes: int):
    """ddpm-segmentation's pixel_classifier, initialised as its init_weights('normal', 0.02)."""
    from torch import nn

    hidden = (128, 32) if num_classes < 30 else (256, 128)
    model = nn.Sequential(
        nn.Linear(dim, hidden[0]), nn.ReLU(), nn.BatchNorm1d(hidden[0]),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.BatchNorm1d(hidden[1]),
        nn.Linear(hidden[1], num_classes),
    )
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias)
    return model


def reference_fit(matrix, labels, *, num_classes: int, ignore_label: int, members: int, seed: int,
                  batch_size: int = 64, lr: float = 1e-3, max_epochs: int = 100, patience: int = 50,
                  warmup: int = 3) -> tuple[list, dict]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    np.random.seed(seed)
    start = time.perf_counter()
    # As prepare_data: every train pixel's features in RAM as float32, then the labeled rows (a copy).
    features = torch.from_numpy(np.asarray(matrix.compute(scheduler="synchronous"))).float()
    targets = torch.from_numpy(np.asarray(labels.compute(scheduler="synchronous")).astype(np.int64))
    keep = targets != ignore_label
    features, targets = features[keep], targets[keep]
    load_seconds = time.perf_counter() - start
    # The paper's loader keeps a last batch of 1, which BatchNorm refuses in training; drop only that one.
    loader = DataLoader(TensorDataset(features, targets), batch_size=batch_size, shuffle=True,
                        drop_last=len(targets) % batch_size == 1)
    models, epochs = [], []
    for _ in range(members):
        classifier = paper_classifier(features.shape[1], num_classes)
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        classifier.train()
        best_loss, break_count, stop = 10_000_000.0, 0, False
        for epoch in range(max_epochs):
            for x_batch, y_batch in loader:
                optimizer.zero_grad()
                loss = criterion(classifier(x_batch), y_batch)
                loss.backward()
                optimizer.step()
                if epoch > warmup:
                    if loss.item() < best_loss:
                        best_loss, break_count = loss.item(), 0
                    else:
                        break_count += 1
                    if break_count > patience:
                        stop = True
                        break
            if stop:
                break
        epochs.append(epoch + 1)
        models.append(classifier.eval())
    return models, {"load_seconds": load_seconds, "epochs_per_member": epochs}


# ---------------------------------------------------------------------------------------------
# One run (child process)
# ---------------------------------------------------------------------------------------------
def score_val(predict, matrix, labels, num_classes: int, ignore_label: int) -> float:
    """Paper mIoU of the majority vote; ``predict`` maps ``[R, D] float32`` rows to ``[M, R]`` classes."""
    import dask
    import torch

    from pipeline.ensemble.evaluation import score
    from pipeline.ensemble.metrics import majority_vote

    if matrix.numblocks[1] != 1:
        matrix = matrix.rechunk({1: -1})
    labels = labels.rechunk((matrix.chunks[0],))
    votes, truths = [], []
    with torch.no_grad():
        for block in range(matrix.numblocks[0]):
            rows, truth = dask.compute(matrix.blocks[block], labels.blocks[block], scheduler="synchronous")
            votes.append(majority_vote(predict(torch.from_numpy(rows.astype(np.float32))), num_classes).numpy())
            truths.append(truth)
    # evaluate's metrics (pipeline.ensemble.evaluation.score); the vote is here because the paper's members are not
    # an EnsembleMLP that pipeline.ensemble.predict.vote could run.
    return score(np.concatenate(truths), np.concatenate(votes), [str(c) for c in range(num_classes)], ignore_label)["miou"]


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over exec from the forked parent, so a
    child of a parent that built stores would report the parent's peak (VmHWM starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(spec: dict) -> dict:
    import torch

    from pipeline.config import EnsembleConfig, Stopping
    from pipeline.ensemble.fit import image_rows
    from pipeline.features.store import lazy_matrix, open_store

    stores = [open_store(spec["stores"].format(t=t), {"t": t}) for t in spec["t_steps"]]
    train_x, train_y = lazy_matrix(stores, "train")
    val_x, val_y = lazy_matrix(stores, "val")
    # The first images of a split only (paper256: what the paper's procedure can hold in this machine's RAM)
    if spec.get("train_images"):
        train_x, train_y = image_rows(train_x, train_y, range(spec["train_images"]), stores[0].pixels_per_image("train"))
    if spec.get("val_images"):
        val_x, val_y = image_rows(val_x, val_y, range(spec["val_images"]), stores[0].pixels_per_image("val"))
    classes, ignore = spec["num_classes"], spec["ignore_label"]
    result = {"pixels": int(train_x.shape[0]), "dim": int(train_x.shape[1])}
    if spec["procedure"] == "paper":
        torch.set_num_threads(spec["threads"])
        start = time.perf_counter()
        models, details = reference_fit(train_x, train_y, num_classes=classes, ignore_label=ignore,
                                        members=spec["members"], seed=spec["seed"])
        result["fit_seconds"] = time.perf_counter() - start
        result.update(details)
        result["threads"] = spec["threads"]
        predict = lambda rows: torch.stack([m(rows).argmax(-1) for m in models])  # noqa: E731
    else:
        from pipeline.ensemble.fit import fit_ensemble

        overrides = dict(spec.get("set", {}))
        if "stopping" in overrides:
            overrides["stopping"] = Stopping(overrides["stopping"])
        # Member i is seeded seed + i, so seeds are spaced by the member count: each seed's ensemble
        # shares no member with another's (seeds 0 and 1 would otherwise share 9 of 10 members).
        config = EnsembleConfig(**{**overrides, "members": spec["members"], "seed": spec["seed"] * spec["members"]})
        torch.set_num_threads(1)  # as the fit stage computes: one thread per pass
        on_epoch = None
        if spec.get("curve"):
            # Selection only: score val after every epoch (an observer: eval mode, no gradients, no RNG),
            # with the scoring time kept out of the fit seconds.
            import pipeline.ensemble.fit as ensemble

            built, curve, paused = [], [], [0.0]

            class Recorded(ensemble.EnsembleMLP):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    built.append(self)

            ensemble.EnsembleMLP = Recorded

            def on_epoch(stats):
                pause = time.perf_counter()
                member_model = built[-1].eval()
                miou = score_val(lambda rows: member_model(rows).argmax(-1), val_x, val_y, classes, ignore)
                curve.append({"epoch": stats.epoch, "seconds": pause - start - paused[0], "val_miou": miou,
                              "loss": stats.loss, "stopped": stats.stopped})
                paused[0] += time.perf_counter() - pause
        start = time.perf_counter()
        model, history = fit_ensemble(train_x, train_y, num_classes=classes, ignore_label=ignore, config=config,
                                      device=torch.device("cpu"), on_epoch=on_epoch)
        result["fit_seconds"] = time.perf_counter() - start - (paused[0] if on_epoch else 0.0)
        if on_epoch:
            result["curve"] = curve
        result["epochs"] = len(history)
        result["threads"] = 1
        result["config"] = config.resolved().model_dump(mode="json")  # the values the fit used, recipe keys filled
        predict = lambda rows: model(rows).argmax(-1)  # noqa: E731
    result["val_miou"] = score_val(predict, val_x, val_y, classes, ignore)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def in_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {spec['geometry']:>10} {spec.get('label', spec['procedure']):>12} seed {spec['seed']}: "
          f"val mIoU {result['val_miou']:.4f}, {result['fit_seconds']:.1f} s, {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Paper-like synthetic stores
# ---------------------------------------------------------------------------------------------
def tiled_canvases(pool: np.ndarray, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from pipeline.data.digits import compose_digit_split, load_mnist_5k

    digits, labels = load_mnist_5k()
    tile, per_side = PAPER_LIKE["tile"], PAPER_LIKE["size"] // PAPER_LIKE["tile"]
    tiles = compose_digit_split(digits, labels, pool, count * per_side**2, tile, PAPER_LIKE["digit_size"], seed)

    def grid(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.concatenate(parts[r * per_side : (r + 1) * per_side], axis=1) for r in range(per_side)])

    canvases = []
    for index in range(count):
        mine = tiles[index * per_side**2 : (index + 1) * per_side**2]
        canvases.append((grid([image for image, _ in mine]), grid([mask for _, mask in mine])))
    return canvases


def build_paper_like(work: Path, checkpoint: Path, train_images: int, val_images: int) -> str:
    from pipeline.config import FeaturesConfig
    from pipeline.data.digits import split_digit_pools
    from pipeline.diffusion.train import load_checkpoint
    from pipeline.features.activations import feature_dim
    from pipeline.features.compute import features_for_images
    from pipeline.features.record import StoreRecord
    from pipeline.features.store import create_or_resume
    from pipeline.hashing import file_sha256

    folder = work / f"paper_like_{train_images}_{val_images}"
    pattern = str(folder / "t{t}.zarr")
    if all(Path(pattern.format(t=t)).exists() for t in PAPER_LIKE["t_steps"]):
        return pattern
    model, diffusion, _ = load_checkpoint(checkpoint)
    # The digits UNet (convolutional) runs at the paper-like size: the feature path draws noise at the images' size.
    dim = feature_dim(model, PAPER_LIKE["blocks"])
    pools = split_digit_pools(5000, 0)
    # val digits come from the digits' unlabeled pool: disjoint from the train pool, never from test.
    splits = {"train": tiled_canvases(pools["train"], train_images, 1), "val": tiled_canvases(pools["unlabeled"], val_images, 2)}
    size, sha = PAPER_LIKE["size"], file_sha256(checkpoint)
    options = FeaturesConfig(batch_size=4)  # noise seed 0, bilinear: the extract stage's defaults
    for t in PAPER_LIKE["t_steps"]:
        record = StoreRecord(t=t, blocks=PAPER_LIKE["blocks"], upsample="bilinear", noise_seed=0, stochastic_noise=False,
                             checkpoint_sha256=sha, image_size=size, feature_dim=dim)
        ids = {split: [f"{split}_{i:03d}" for i in range(len(items))] for split, items in splits.items()}
        writer = create_or_resume(pattern.format(t=t), record, ids, chunk_pixels=PAPER_LIKE["chunk_pixels"],
                                  codec="zstd", clevel=3)
        for split, items in splits.items():
            for index, rows in features_for_images(model, diffusion, [image for image, _ in items], options=options,
                                                   t_steps=[t], blocks=PAPER_LIKE["blocks"], split=split):
                writer.write(split, index, rows.numpy(), items[index][1].reshape(-1))
        writer.finish()
    return pattern


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    mious = [r["val_miou"] for r in runs]
    seconds = [r["fit_seconds"] for r in runs]
    return {"seeds": [r["seed"] for r in runs], "val_miou": mious, "val_miou_mean": statistics.mean(mious),
            "val_miou_spread": [min(mious), max(mious)], "val_miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
            "fit_seconds": seconds, "fit_seconds_mean": statistics.mean(seconds),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "threads": runs[0]["threads"]}


def table(results: dict) -> str:
    lines = ["| geometry | procedure | members | seeds | val mIoU mean | min-max | fit s (mean) | peak RSS MB | "
             "time (a) / time (b) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, geometry in results["geometries"].items():
        paper = geometry["paper"]
        extra = [(key, f"(b) {key}") for key in results.get("also", {})]
        for key, label in (("paper", "(a) paper"), ("streamed", "(b) streamed"), *extra):
            s = geometry[key]
            ratio = paper["fit_seconds_mean"] / s["fit_seconds_mean"]
            lines.append(f"| {name} (D={geometry['dim']}, {geometry['train_pixels']} px) | {label}, {s['threads']} thr | "
                         f"{geometry['members']} | {len(s['seeds'])} | {s['val_miou_mean']:.4f} | "
                         f"{s['val_miou_spread'][0]:.4f}-{s['val_miou_spread'][1]:.4f} | {s['fit_seconds_mean']:.1f} | "
                         f"{s['peak_rss_mb_max']:.0f} | {'1.00' if key == 'paper' else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn" else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fitbench"))
    parser.add_argument("--digits-stores", help="pattern with {t} of the default run's stores (holding a val split)")
    parser.add_argument("--checkpoint", type=Path, help="the default run's DDPM (checkpoints/ddpm.pt), for paper_like")
    parser.add_argument("--geometries", nargs="+", default=["digits", "paper_like"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--digits-members", type=int, default=10)
    parser.add_argument("--paper-like-members", type=int, default=3)
    parser.add_argument("--paper-like-train", type=int, default=8)
    parser.add_argument("--paper-like-val", type=int, default=8)
    parser.add_argument("--paper256-stores", help="pattern with {t} of benchmarks/paper_geometry.py's stores")
    parser.add_argument("--paper256-train", type=int, default=4, help="paper256: its first N train images")
    parser.add_argument("--paper256-val", type=int, default=4, help="paper256: its first N val images")
    parser.add_argument("--paper256-members", type=int, default=2)
    parser.add_argument("--paper256-classes", type=int, default=34)
    parser.add_argument("--reference-threads", type=int, default=1,
                        help="CPU threads of (a); the shipped (b) computes on one thread per pass, as the fit stage")
    parser.add_argument("--set", nargs="*", default=[], help="EnsembleConfig overrides for (b), key=value")
    parser.add_argument("--also", action="append", default=[],
                        help="name:key=value,...: another streamed fit in the same interleaved run, (b) with these overrides")
    parser.add_argument("--select", action="store_true", help="run --variant streamed fits on digits val")
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,key=value")
    parser.add_argument("--curve", action="store_true", help="with --select: val mIoU after every epoch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_vs_paper.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return

    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    base = {"num_classes": 11, "ignore_label": 255}
    if args.select:
        spec = {**base, "geometry": "digits", "stores": args.digits_stores, "t_steps": list(DIGITS_T_STEPS),
                "members": args.digits_members, "procedure": "streamed"}
        selection = previous.get("selection", {})
        for variant in args.variant:
            name, _, assignments = variant.partition(":")
            overrides = parse_set([a for a in assignments.split(",") if a])
            runs = [dict(in_subprocess({**spec, "set": overrides, "seed": seed, "label": name, "curve": args.curve}),
                         seed=seed) for seed in args.seeds]
            selection[name] = {"set": overrides, **summarise(runs), "epochs": [r["epochs"] for r in runs],
                               "curves": [r.get("curve") for r in runs]}
            for run in runs:
                for point in run.get("curve") or []:
                    print(f"    seed {run['seed']} epoch {point['epoch']}: val mIoU {point['val_miou']:.4f} "
                          f"at {point['seconds']:.1f} s (stopped {point['stopped']})")
        previous["selection"] = selection
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous, indent=2) + "\n")
        for name, s in selection.items():
            print(f"| {name} | {s['set']} | {s['val_miou_mean']:.4f} | {s['val_miou_spread'][0]:.4f}-"
                  f"{s['val_miou_spread'][1]:.4f} | {s['fit_seconds_mean']:.1f} s | epochs {s['epochs']} |")
        return

    geometries = {}
    for name in args.geometries:
        if name == "digits":
            geometries[name] = {**base, "stores": args.digits_stores, "t_steps": list(DIGITS_T_STEPS),
                                "members": args.digits_members}
        elif name == "paper256":
            geometries[name] = {"num_classes": args.paper256_classes, "ignore_label": 255, "stores": args.paper256_stores,
                                "t_steps": list(DIGITS_T_STEPS), "members": args.paper256_members,
                                "train_images": args.paper256_train, "val_images": args.paper256_val}
        else:
            pattern = build_paper_like(args.work, args.checkpoint, args.paper_like_train, args.paper_like_val)
            geometries[name] = {**base, "stores": pattern, "t_steps": list(PAPER_LIKE["t_steps"]),
                                "members": args.paper_like_members}
    results = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "overrides_b": parse_set(args.set),
               "geometries": {}}
    also = {}
    for item in args.also:
        label, _, assignments = item.partition(":")
        if label in ("paper", "streamed"):
            parser.error(f"--also {item!r}: the name {label!r} is one of the two procedures' own rows; name it otherwise")
        also[label] = {**parse_set(args.set), **parse_set([a for a in assignments.split(",") if a])}
    results["also"] = also
    for name, geometry in geometries.items():
        sets = {"paper": parse_set(args.set), "streamed": parse_set(args.set), **also}
        runs = {key: [] for key in sets}
        for position, seed in enumerate(args.seeds):
            order = list(sets) if position % 2 == 0 else list(sets)[::-1]
            for procedure in order:
                spec = {**geometry, "geometry": name, "procedure": "paper" if procedure == "paper" else "streamed",
                        "label": procedure, "seed": seed, "threads": args.reference_threads, "set": sets[procedure]}
                runs[procedure].append(dict(in_subprocess(spec), seed=seed))
        first = runs["paper"][0]
        results["geometries"][name] = {
            "stores": geometry["stores"], "members": geometry["members"], "dim": first["dim"],
            "train_pixels": first["pixels"], **{key: summarise(part) for key, part in runs.items()},
            "runs": runs, "time_ratio_paper_over_streamed":
                statistics.mean(r["fit_seconds"] for r in runs["paper"]) / statistics.mean(r["fit_seconds"] for r in runs["streamed"]),
        }
    if "paper256" in geometries:
        results["paper256_geometry"] = {"train_images": args.paper256_train, "val_images": args.paper256_val,
                                        "members_both": args.paper256_members, "classes": args.paper256_classes}
    if "paper_like" in geometries:
        results["paper_like_geometry"] = {**PAPER_LIKE, "train_images": args.paper_like_train,
                                          "val_images": args.paper_like_val, "members_both": args.paper_like_members}
    results["table"] = table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    print(results["table"])


if __name__ == "__main__":
    main()
