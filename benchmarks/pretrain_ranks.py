"""Pretraining on one machine's CPU cores: one process on every core against torchrun ranks of one thread each.

The pretrain stage as `dvc repro` runs it (one process, torch on all cores) and the same stage under
`torchrun --standalone --nproc_per_node N` (gloo, one thread a rank: docs/scaling.md), with this repository's
params and prepared data, the same global batch and recipe. Each launcher runs the stage twice, for
``--short`` and ``--long`` steps (no resumable states, fresh folders), and the time a step is the difference of
the two wall times over the difference of the steps, so that start-up (imports, loading the unlabeled images,
building the UNet) cancels. The final loss of each long run is recorded beside it (the runs differ only in the
order of float sums, so the curves stay close: tests/test_pretrain_distributed.py).

    python benchmarks/pretrain_ranks.py --out benchmarks/results/pretrain_ranks.json

Run it alone: another torch job on the same cores spoils both timings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_command(launcher: str, params: Path, work: Path) -> list[str]:
    stage = ["-m", "stages.pretrain", "--params", str(params), "--data", str(ROOT / "data/prepared"),
             "--out", str(work / "ddpm.pt"), "--curves", str(work / "live")]
    if launcher == "process":
        return [sys.executable, *stage]
    ranks = int(launcher.split(":")[1])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *stage]


def run(launcher: str, steps: int, base: dict, scratch: Path) -> dict:
    work = scratch / f"{launcher.replace(':', '')}_{steps}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = copy.deepcopy(base)
    params["ddpm"]["train"].update(steps=steps, state_every=0)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "DDPM_SEG_THREADS")}
    start = time.perf_counter()
    done = subprocess.run(stage_command(launcher, params_file, work), cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{launcher} {steps} steps failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((work / "live" / "metrics.json").read_text())
    print(f"  {launcher:>10} {steps:>4} steps: {seconds:6.1f} s, final loss {metrics.get('loss')}", flush=True)
    return {"steps": steps, "seconds": seconds, "final": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launchers", nargs="+", default=["process", "torchrun:2"],
                        help="process (one process, every core) or torchrun:N (N ranks of one thread)")
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=120)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pretrain_ranks.json")
    args = parser.parse_args()
    if not (ROOT / "data/prepared/unlabeled").is_dir():
        parser.error(f"{ROOT / 'data/prepared/unlabeled'} is missing: run `dvc repro prepare` first")
    base = yaml.safe_load(args.params.read_text())
    results = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "batch_size": base["ddpm"]["train"]["batch_size"],
               "autocast": base["ddpm"]["train"]["autocast"], "launchers": {}}
    with tempfile.TemporaryDirectory(prefix="pretrain_ranks_") as scratch:
        # interleaved: each launcher's short run, then each launcher's long run
        runs = {launcher: [] for launcher in args.launchers}
        for steps in (args.short, args.long):
            for launcher in args.launchers:
                runs[launcher].append(run(launcher, steps, base, Path(scratch)))
    for launcher, (short, long) in runs.items():
        per_step = (long["seconds"] - short["seconds"]) / (long["steps"] - short["steps"])
        results["launchers"][launcher] = {"runs": runs[launcher], "seconds_per_step": per_step}
    first = results["launchers"][args.launchers[0]]["seconds_per_step"]
    for launcher, entry in results["launchers"].items():
        entry["speedup_vs_first"] = first / entry["seconds_per_step"]
        print(f"{launcher:>10}: {entry['seconds_per_step']:.3f} s a step, {entry['speedup_vs_first']:.2f}x "
              f"against {args.launchers[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
