"""Peak memory and speed of the streaming fit at the paper's feature width, against the paper's in-RAM fit.

Synthetic stores (random float16 features, 3 steps x 2816 = 8448 features per pixel, 64x64 images,
34 classes as FFHQ-34) for N = 10, 20, 40 images. Each measurement runs in its own process and reports
its peak RSS (ru_maxrss):

- streaming: pipeline.ensemble.fit.fit_ensemble over the lazy dask matrix, one epoch, 10 members;
- in-RAM (the paper's approach): features gathered into one float32 [N, D, H, W] tensor, reshaped into
  [N*H*W, D] (a second copy, as ddpm-segmentation's prepare_data does), then a shuffled DataLoader
  trains one member for --in-ram-steps batches (memory is set by the arrays, not by the steps).

    python benchmarks/fit_memory.py --work /tmp/fitbench --members 2 --members-per-pass 1 \
        --out benchmarks/results/fit_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZE, STEPS, PER_STEP, CLASSES = 64, (50, 150, 250), 2816, 34


def build_stores(work: Path, images: int, chunk_pixels: int) -> Path:
    from pipeline.features.record import StoreRecord
    from pipeline.features.store import create_or_resume

    folder = work / f"n{images}"
    rng = np.random.default_rng(images)
    for t in STEPS:
        path = folder / f"t{t}.zarr"
        if path.exists():
            continue
        record = StoreRecord(t=t, blocks=(5, 6, 7, 8, 12), upsample="bilinear", noise_seed=0, stochastic_noise=False,
                             checkpoint_sha256="synthetic", image_size=SIZE, feature_dim=PER_STEP)
        ids = {"train": [f"img{i:03d}" for i in range(images)], "test": ["test000"]}
        # Random features do not compress; "none" keeps the benchmark about memory, not the codec.
        writer = create_or_resume(path, record, ids, chunk_pixels=chunk_pixels, codec="none", clevel=1)
        for split, count in (("train", images), ("test", 1)):
            for index in range(count):
                features = rng.standard_normal((SIZE * SIZE, PER_STEP), dtype=np.float32).astype(np.float16)
                writer.write(split, index, features, rng.integers(0, CLASSES, SIZE * SIZE).astype(np.uint8))
        writer.finish()
    return folder


def streaming(folder: Path, buffer_rows: int, members: int, members_per_pass: int | None) -> dict:
    import torch

    from pipeline.config import EnsembleConfig
    from pipeline.ensemble.fit import fit_ensemble
    from pipeline.features.store import lazy_matrix, open_store

    stores = [open_store(folder / f"t{t}.zarr", {"t": t}) for t in STEPS]
    matrix, labels = lazy_matrix(stores, "train")
    config = EnsembleConfig(members=members, epochs=1, buffer_rows=buffer_rows, members_per_pass=members_per_pass)
    start = time.perf_counter()
    _, history = fit_ensemble(matrix, labels, num_classes=CLASSES, ignore_label=255, config=config,
                              device=torch.device("cpu"))
    seconds = time.perf_counter() - start
    return {"pixels": history[0].pixels, "seconds": seconds, "pixels_per_s": history[0].pixels * members / seconds,
            "note": "pixels_per_s counts member-pixels (one pixel seen by one member) over all passes"}


def in_ram(folder: Path, images: int, steps: int) -> dict:
    import torch
    import zarr
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.ensemble.model import EnsembleMLP

    dim = PER_STEP * len(STEPS)
    start = time.perf_counter()
    features = torch.zeros((images, dim, SIZE, SIZE), dtype=torch.float32)
    labels = torch.zeros((images, SIZE, SIZE), dtype=torch.uint8)
    groups = [zarr.open_group(folder / f"t{t}.zarr", mode="r") for t in STEPS]
    for image in range(images):
        rows = slice(image * SIZE * SIZE, (image + 1) * SIZE * SIZE)
        per_step = [torch.from_numpy(g["train/features"][rows].astype(np.float32)) for g in groups]
        features[image] = torch.cat(per_step, 1).T.reshape(dim, SIZE, SIZE)
        labels[image] = torch.from_numpy(groups[0]["train/labels"][rows].reshape(SIZE, SIZE))
    matrix = features.permute(1, 0, 2, 3).reshape(dim, -1).permute(1, 0)  # the reshape copies
    target = labels.reshape(-1).long()
    loader = DataLoader(TensorDataset(matrix, target), batch_size=64, shuffle=True, drop_last=True)
    model = EnsembleMLP(1, dim, CLASSES, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step + 1 >= steps:
            break
    return {"seconds": time.perf_counter() - start, "bytes_features_float32": images * dim * SIZE * SIZE * 4}


def child(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    result = streaming(folder, args.buffer_rows, args.members, args.members_per_pass) if args.mode == "streaming" else in_ram(folder, args.images[0], args.in_ram_steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fitbench"))
    parser.add_argument("--images", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--in-ram-images", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--chunk-pixels", type=int, default=1024)
    parser.add_argument("--buffer-rows", type=int, default=8192, help="ensemble.buffer_rows (x D float16 in the shuffle pool)")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--members-per-pass", type=int, default=None)
    parser.add_argument("--in-ram-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=["streaming", "in_ram"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    results = {"streaming": {}, "in_ram": {}, "settings": {"image_size": SIZE, "feature_dim": PER_STEP * len(STEPS),
               "classes": CLASSES, "chunk_pixels": args.chunk_pixels, "buffer_rows": args.buffer_rows,
               "members": args.members, "members_per_pass": args.members_per_pass}}
    for images in sorted(set(args.images) | set(args.in_ram_images)):
        folder = build_stores(args.work, images, args.chunk_pixels)
        runs = [("streaming", images in args.images), ("in_ram", images in args.in_ram_images)]
        for mode, wanted in runs:
            if not wanted:
                continue
            command = [sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--images", str(images),
                       "--buffer-rows", str(args.buffer_rows), "--members", str(args.members),
                       "--in-ram-steps", str(args.in_ram_steps)]
            if args.members_per_pass:
                command += ["--members-per-pass", str(args.members_per_pass)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode][images] = json.loads(output.strip().splitlines()[-1])
            print(mode, images, results[mode][images], flush=True)
    print("\n| N images | streaming peak RSS (MB) | streaming member-pixels/s | in-RAM peak RSS (MB) | ratio |\n|---|---|---|---|---|")
    for images in sorted(results["streaming"]):
        stream = results["streaming"][images]
        ram = results["in_ram"].get(images)
        ratio = f"{ram['peak_rss_mb'] / stream['peak_rss_mb']:.1f}x" if ram else "-"
        ram_text = f"{ram['peak_rss_mb']:.0f}" if ram else "-"
        print(f"| {images} | {stream['peak_rss_mb']:.0f} | {stream['pixels_per_s']:.0f} | {ram_text} | {ratio} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
