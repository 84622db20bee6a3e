"""Two passes of members at once (ensemble.parallel_passes) against the same passes one after another
and against one pass of all members, on the same stores; and whether the weights are identical.

    python benchmarks/fit_passes.py --stores 'features/t{t}.zarr' --out benchmarks/results/fit_passes.json

Run it alone (it times CPU work). Every fit uses ensemble.threads = 1 and the params' other settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.ensemble import fit_ensemble
from pipeline.store import lazy_matrix, open_store

VARIANTS = {"one pass of all members": {"members_per_pass": 10, "parallel_passes": 1},
            "2 passes of 5, one after another": {"members_per_pass": 5, "parallel_passes": 1},
            "2 passes of 5 at once (default)": {"members_per_pass": 5, "parallel_passes": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--stores", default="features/t{t}.zarr")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(1)
    stores = [open_store(args.stores.format(t=t), {}) for t in params.t_steps]
    matrix, labels = lazy_matrix(stores, "train")
    seconds, weights = {}, {}
    for name, settings in VARIANTS.items():
        config = dataclasses.replace(params.ensemble, threads=1, **settings)
        start = time.perf_counter()
        model, _ = fit_ensemble(matrix, labels, num_classes=params.dataset.num_classes,
                                ignore_label=params.dataset.ignore_label, config=config, device=torch.device("cpu"))
        seconds[name] = round(time.perf_counter() - start, 2)
        weights[name] = model.state_dict()
        print(f"{name}: {seconds[name]} s", flush=True)
    sequential, parallel = list(VARIANTS)[1:]
    identical = all(torch.equal(weights[sequential][k], weights[parallel][k]) for k in weights[parallel])
    baseline = seconds[list(VARIANTS)[0]]
    result = {"seconds": seconds, "speedup_vs_one_pass": {k: round(baseline / v, 2) for k, v in seconds.items()},
              "parallel_weights_identical_to_sequential": identical, "rows": int(matrix.shape[0]), "dim": int(matrix.shape[1])}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
