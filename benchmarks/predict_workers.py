"""evaluate's prediction on one core against every core, on the default run's stores and ensemble.

Times ``pipeline.evaluation.vote`` (the ensemble over a split's lazy feature matrix, majority vote and
disagreement) with 1 row-chunk at a time and with one per core, both with one torch thread per op (the
shipped ``ensemble.threads: 1``), interleaved over a few repeats, and checks the results are identical.

    python benchmarks/predict_workers.py --repeats 3 --out benchmarks/results/predict_workers.json

Run alone, after `dvc repro`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.ensemble import load_ensemble
from pipeline.evaluation import vote
from pipeline.store import expected_record, lazy_matrix, open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--stores", default="features/t{t}.zarr")
    parser.add_argument("--ensemble", type=Path, default=Path("ensemble/ensemble.pt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(1)
    stores = [open_store(args.stores.format(t=t), expected_record(params, t)) for t in params.t_steps]
    model = load_ensemble(args.ensemble, params.t_steps, params.blocks, stores[0].record.checkpoint_sha256)
    matrix, _ = lazy_matrix(stores, "test")
    cores = len(os.sched_getaffinity(0))
    seconds = {1: [], cores: []}
    results = {}
    for _ in range(args.repeats):
        for workers in seconds:
            start = time.perf_counter()
            results[workers] = vote(model, matrix, batch_pixels=params.evaluate.batch_pixels, device=torch.device("cpu"),
                                    workers=workers)
            seconds[workers].append(time.perf_counter() - start)
    identical = all(np.array_equal(a, b) for a, b in zip(results[1], results[cores]))
    report = {"rows": int(matrix.shape[0]), "dim": int(matrix.shape[1]), "members": model.members,
              "seconds_one_chunk_at_a_time": [round(s, 3) for s in seconds[1]],
              f"seconds_{cores}_chunks_at_once": [round(s, 3) for s in seconds[cores]],
              "speedup_median": round(float(np.median(seconds[1]) / np.median(seconds[cores])), 2),
              "identical": identical}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
