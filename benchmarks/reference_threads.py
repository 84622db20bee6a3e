"""The paper's procedure on 1 thread against 2: its per-batch training step (ddpm-segmentation's pixel_classifier,
batch 64, Adam 1e-3, as benchmarks/fit_vs_paper.py's reference) at a feature width D and a class count, so that
fit_vs_paper compares against the reference at its faster setting (--reference-threads).

    python benchmarks/reference_threads.py --widths 768:10 1920:20 8448:34 --out benchmarks/results/reference_threads.json

Alone on the machine: the 2-thread time needs both cores. Median over --rounds alternations of 1 and 2 threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fit_vs_paper import paper_classifier  # noqa: E402


def batch_ms(dim: int, classes: int, threads: int, batches: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    features, labels = torch.randn(64 * batches, dim), torch.randint(0, classes, (64 * batches,))
    model = paper_classifier(dim, classes)
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for index in range(batches):
        rows = slice(index * 64, (index + 1) * 64)
        optimizer.zero_grad()
        loss = criterion(model(features[rows]), labels[rows])
        loss.backward()
        optimizer.step()
        loss.item()  # as the paper's loop reads the loss every batch
    return (time.perf_counter() - start) / batches * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["768:10", "1920:20", "8448:34"], help="D:classes")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"batch_size": 64, "batches": args.batches, "rounds": args.rounds, "widths": {}}
    for spec in args.widths:
        dim, classes = map(int, spec.split(":"))
        times = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads in (1, 2):
                times[threads].append(batch_ms(dim, classes, threads, args.batches))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        result["widths"][spec] = {"ms_per_batch_1_thread": one, "ms_per_batch_2_threads": two,
                                  "faster": "2 threads" if two < one else "1 thread", "ratio_1_over_2": one / two}
        print(f"D = {dim}, {classes} classes: {one:.2f} ms a batch on 1 thread, {two:.2f} on 2 ({one / two:.2f}x)",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
