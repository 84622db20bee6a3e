"""Segmenting new images: the DDPM-feature ensemble against DatasetDDPM's distilled network, images/s and peak RSS.

Each segmenter runs in its own process (so ``ru_maxrss`` is its own peak) through the API users call
(``pipeline.api.Segmenter``: the ensemble's ``from_run`` path, and ``load_segnet``), on the same images:
the run's test images, repeated up to ``--images``. Loading the models is timed apart from segmenting;
one warm-up image is segmented before the clock starts.

    python benchmarks/segnet_speed.py --run . --segnet segnet/segnet.pt --images 50 \\
        --out benchmarks/results/segnet_speed.json
    python benchmarks/segnet_speed.py --paper256 /tmp/segnet256 --images 2     # the paper's geometry

``--paper256 WORK`` builds a scratch run in WORK in the paper's geometry first: a random-weights UNet of the
paper's 256 model (``ddpm.preset: adm256``, blocks [5, 6, 7, 8, 12], t 50/150/250, D = 8448), a random
10-member ensemble over its features, a random SegFormer-B0-sized segnet (hidden sizes [32, 64, 160, 256]) and
two smooth random 256² test images. Speed and memory do not depend on the weights.

Prints the ratio of the two rates, measured in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, run: Path, segnet: Path, images: int) -> dict:
    """In this process: load one segmenter, segment ``images`` test images, report time and peak RSS."""
    import numpy as np

    from pipeline.api import Segmenter
    from pipeline.data.images import read_rgb
    from pipeline.data.layout import Split, list_examples
    from pipeline.runtime import stage_params

    params = stage_params(run / "params.yaml", one_thread=model == "ensemble")  # as the segment stage sets threads
    start = time.perf_counter()
    if model == "segnet":
        segmenter = Segmenter.load_segnet(params, segnet)
    else:
        segmenter = Segmenter.load(params, run / "checkpoints" / "ddpm.pt", run / "ensemble" / "ensemble.pt")
    load_s = time.perf_counter() - start
    examples = list_examples(run / "data" / "prepared", Split.TEST)
    arrays = [read_rgb(examples[index % len(examples)].image_path) for index in range(images)]
    segmenter.predict(arrays[:1])  # warm-up: first-call allocations are not the steady rate
    start = time.perf_counter()
    results = segmenter.predict(arrays)
    seconds = time.perf_counter() - start
    classes = np.stack([result.mask for result in results])
    return {"model": model, "images": images, "image_size": int(arrays[0].shape[0]), "load_s": round(load_s, 3),
            "segment_s": round(seconds, 3), "images_per_s": round(images / seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mask_classes": sorted(int(value) for value in np.unique(classes))}


SEGFORMER_B0 = {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "attention_heads": [1, 2, 5, 8],
                "sr_ratios": [8, 4, 2, 1], "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2],
                "decoder_hidden_size": 256}


def paper256_run(work: Path) -> tuple[Path, Path]:
    """A scratch run folder of the paper's geometry (random weights everywhere); returns (run, segnet file)."""
    import torch
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is no installed package
    from benchmarks.store_layouts import paper_images
    from pipeline.config import params_from_dict
    from pipeline.diffusion.gaussian import Diffusion
    from pipeline.diffusion.train import save_checkpoint
    from pipeline.diffusion.unet import create_unet
    from pipeline.ensemble.files import save_ensemble
    from pipeline.ensemble.model import EnsembleMLP
    from pipeline.features.activations import feature_dim
    from pipeline.features.record import fit_record
    from pipeline.hashing import file_sha256
    from pipeline.segnet.network import build_network, save_segnet, segformer_config, segnet_record

    run = work / "run"
    data = {"t_steps": [50, 150, 250], "blocks": None,
            "dataset": {"name": "paper", "root": str(work / "none"), "image_size": 256, "num_classes": 3,
                        "train_images": 1, "test_images": 2},
            "ddpm": {"preset": "adm256", "checkpoint": "models/benchmark.pt"}, "features": {"batch_size": 1},
            "segnet": SEGFORMER_B0}
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = params_from_dict(data)
    checkpoint = run / "checkpoints" / "ddpm.pt"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        model = create_unet(params.unet_config())
        save_checkpoint(checkpoint, model.eval(), Diffusion("linear", 1000), {"kind": "benchmark"})
    else:
        from pipeline.diffusion.train import load_checkpoint

        model = load_checkpoint(checkpoint)[0]
    dim = feature_dim(model, params.blocks, len(params.t_steps))
    del model
    save_ensemble(run / "ensemble" / "ensemble.pt", EnsembleMLP(10, dim, 3, seed=0),
                  features=fit_record(params, file_sha256(checkpoint)))
    dataset = params.dataset
    network = build_network(segformer_config(params.segnet, dataset.num_classes), seed=0)
    segnet = run / "segnet" / "segnet.pt"
    save_segnet(segnet, network, segnet_record(params.segnet, num_classes=dataset.num_classes, image_size=256,
                                               ignore_label=dataset.ignore_label),
                {"epoch": 0, "val_miou": None, "chosen_on": "random weights", "synthetic_images": 0, "history": []})
    paper_images(run / "data" / "prepared", {"test": 2})
    return run, segnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."), help="a finished run: params.yaml, checkpoints/, "
                                                                   "ensemble/, data/prepared/")
    parser.add_argument("--segnet", type=Path, default=Path("segnet/segnet.pt"))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--paper256", type=Path, default=None, help="WORK folder: measure the paper's 256² geometry "
                                                                      "with random weights instead of --run")
    parser.add_argument("--child", choices=("ensemble", "segnet", "setup"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "setup":
        paper256_run(args.paper256)
        return
    if args.paper256:
        # in a process of its own: Linux keeps ru_maxrss across fork and exec, so a parent that held the 2.2 GB
        # UNet would lend its peak to every child it starts (the segnet's measured 2.35 GB instead of 0.54 GB)
        subprocess.run([sys.executable, __file__, "--child", "setup", "--paper256", str(args.paper256)], check=True)
        args.run, args.segnet = args.paper256 / "run", args.paper256 / "run" / "segnet" / "segnet.pt"
    if args.child:
        print(json.dumps(measure(args.child, args.run, args.segnet, args.images)))
        return
    rows = {}
    for model in ("ensemble", "segnet"):
        result = subprocess.run([sys.executable, __file__, "--child", model, "--run", str(args.run), "--segnet",
                                 str(args.segnet), "--images", str(args.images)], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{model} failed:\n{result.stderr}")
        rows[model] = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[model]))
    speedup = rows["segnet"]["images_per_s"] / rows["ensemble"]["images_per_s"]
    memory = rows["ensemble"]["peak_rss_mb"] / rows["segnet"]["peak_rss_mb"]
    print(f"segnet: {speedup:.1f}x the ensemble's images/s ({rows['segnet']['images_per_s']} against "
          f"{rows['ensemble']['images_per_s']} at {rows['segnet']['image_size']} px); peak RSS "
          f"{rows['segnet']['peak_rss_mb']} MB against {rows['ensemble']['peak_rss_mb']} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "speedup": round(speedup, 2), "rss_ratio": round(memory, 2)},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
