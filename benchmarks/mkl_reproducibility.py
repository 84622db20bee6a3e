"""Cost of the MKL reproducibility settings that ``pipeline/__init__.py`` makes by default.

Runs the real pretrain and fit stages (shortened) on the repository's prepared data and feature stores
in fresh processes, alternating MKL's own defaults (``MKL_CBWR`` unset, ``MKL_DYNAMIC=TRUE``) with the
pipeline's (``MKL_CBWR=AUTO``, ``MKL_DYNAMIC=FALSE``, ``OMP_DYNAMIC=FALSE``), and reports wall time per
stage, the ratio, and whether both settings wrote bit-identical weights. Needs `dvc repro` to have run
(data/prepared, features/). Run alone: another job on the cores changes the times.

    python benchmarks/mkl_reproducibility.py --rounds 2 --out benchmarks/results/mkl_reproducibility.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "mkl_defaults": {"MKL_CBWR": "", "MKL_DYNAMIC": "TRUE", "OMP_DYNAMIC": "FALSE"},
    "pipeline": {},  # pipeline/__init__.py fills in AUTO / FALSE / FALSE
}


def weights_digest(path: Path) -> str:
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key, value in sorted(payload["state_dict"].items()):
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def run_stage(args: list[str], setting: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC", "OMP_DYNAMIC")}
    env.update(SETTINGS[setting], PYTHONPATH=str(REPO))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--fit-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ddpm"]["train"]["steps"] = args.pretrain_steps
    params["ensemble"]["epochs"] = args.fit_epochs
    params["ensemble"]["patience"] = args.fit_epochs
    results: dict[str, dict[str, list]] = {s: {"pretrain_s": [], "fit_s": [], "pretrain_weights": [], "fit_weights": []}
                                           for s in SETTINGS}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        for round_ in range(args.rounds):
            for setting in SETTINGS:
                checkpoint, ensemble = work / f"{setting}.pt", work / f"{setting}_ensemble.pt"
                pretrain = run_stage(["stages.pretrain", "--params", str(params_file), "--data", "data/prepared",
                                      "--out", str(checkpoint), "--plot", str(work / "p.csv")], setting)
                fit = run_stage(["stages.fit", "--params", str(params_file), "--stores", "features/t{t}.zarr",
                                 "--out", str(ensemble), "--plot", str(work / "f.csv")], setting)
                row = results[setting]
                row["pretrain_s"].append(round(pretrain, 2))
                row["fit_s"].append(round(fit, 2))
                row["pretrain_weights"].append(weights_digest(checkpoint))
                row["fit_weights"].append(weights_digest(ensemble))
                print(f"round {round_ + 1} {setting}: pretrain {pretrain:.1f}s, fit {fit:.1f}s", flush=True)
    summary = {}
    for stage in ("pretrain", "fit"):
        base, ours = min(results["mkl_defaults"][f"{stage}_s"]), min(results["pipeline"][f"{stage}_s"])
        summary[stage] = {"mkl_defaults_best_s": base, "pipeline_best_s": ours, "ratio": round(ours / base, 3),
                          "same_weights": len({*results["mkl_defaults"][f"{stage}_weights"],
                                               *results["pipeline"][f"{stage}_weights"]}) == 1}
        print(f"{stage}: {base:.1f}s with MKL's defaults, {ours:.1f}s with the pipeline's ({ours / base:.3f}x); "
              f"bit-identical weights across all runs: {summary[stage]['same_weights']}")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": results,
                                        "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
