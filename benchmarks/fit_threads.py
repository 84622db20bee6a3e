"""Fit stage wall time with ``ensemble.threads`` 2 vs 1 (the store reader has its own thread in both).

Runs the real fit stage (shortened) on the repository's feature stores in fresh processes,
alternating ``ensemble.threads: 2`` and ``1``, and reports best wall time per setting, the ratio and
whether each setting wrote the same weights in every round. Needs `dvc repro` to have run (features/).
Run alone: another job on the cores changes the times.

    python benchmarks/fit_threads.py --rounds 2 --out benchmarks/results/fit_threads.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from mkl_reproducibility import weights_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fit-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ensemble"]["epochs"] = params["ensemble"]["patience"] = args.fit_epochs
    runs: dict[int, dict[str, list]] = {n: {"fit_s": [], "weights": []} for n in args.threads}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for round_ in range(args.rounds):
            for threads in args.threads:
                params["ensemble"]["threads"] = threads
                (work / "params.yaml").write_text(yaml.safe_dump(params))
                env = dict(os.environ, PYTHONPATH=str(REPO))
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "stages.fit", "--params", str(work / "params.yaml"),
                                "--stores", "features/t{t}.zarr", "--out", str(work / "e.pt"), "--plot",
                                str(work / "f.csv")], cwd=REPO, env=env, check=True, capture_output=True)
                seconds = time.perf_counter() - start
                runs[threads]["fit_s"].append(round(seconds, 2))
                runs[threads]["weights"].append(weights_digest(work / "e.pt"))
                print(f"round {round_ + 1}, {threads} thread(s): fit {seconds:.1f}s", flush=True)
    base = min(runs[args.threads[0]]["fit_s"])
    summary = {n: {"best_s": min(r["fit_s"]), "ratio_vs_first": round(min(r["fit_s"]) / base, 3),
                   "same_weights_every_round": len(set(r["weights"])) == 1} for n, r in runs.items()}
    for n, s in summary.items():
        print(f"{n} thread(s): best {s['best_s']:.1f}s ({s['ratio_vs_first']:.3f}x of {args.threads[0]}), "
              f"same weights every round: {s['same_weights_every_round']}")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs,
                                        "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
