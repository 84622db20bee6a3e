"""Queue an analysis' experiments, run them, and record their ``dvc exp show --json`` rows.

    python -m analyses.run baselines            # or sample_efficiency, noise
    python -m analyses.report                   # docs/analyses.md from analyses/results/*.json

It runs, for each experiment of ``analyses/experiments.py``, ``dvc exp run --queue -n <name> -S ...
<targets>``, then ``dvc queue start -j 1`` and waits until the queue is empty, then writes the rows of those
experiments from ``dvc exp show --json`` (params, metrics) with the wall time to ``analyses/results/<name>.json``.
Experiments of the same names are removed first (``dvc exp remove``), so a rerun replaces them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from analyses.experiments import ANALYSES
from analyses.results import experiment_rows, experiment_states


def dvc(*args: str, check: bool = True) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        sys.exit(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def untracked_files() -> list[str]:
    """Files git does not track yet and does not ignore: a queued experiment's copy of the repository holds only
    what git tracks, so these travel with ``-C`` (a new stage's code before it is committed)."""
    def listed(*options: str) -> list[str]:
        return subprocess.run(["git", "ls-files", *options], capture_output=True, text=True, check=True).stdout.splitlines()

    # dvc copies files only into folders the copy already has (git's): new stages' code lives in pipeline/ and stages/
    folders = {str(Path(path).parent) for path in listed()}
    return [path for path in listed("--others", "--exclude-standard")
            if path.endswith(".py") and str(Path(path).parent) in folders]


def wait_for_queue(names: set[str], baseline: str, poll_seconds: float = 5.0) -> dict[str, str]:
    """Poll ``dvc exp show --json`` of the experiments derived from ``baseline`` (the commit they were queued on,
    wherever HEAD has moved since) until none of ``names`` is queued or running; their final states
    (``analyses.results.experiment_states``: success, failed)."""
    while True:
        states = experiment_states(json.loads(dvc("exp", "show", "--json", "--rev", baseline)), names)
        if not any(state in ("queued", "running") for state in states.values()):
            return states
        time.sleep(poll_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("analysis", choices=sorted(ANALYSES))
    parser.add_argument("--out", type=Path, default=None, help="default: analyses/results/<analysis>.json")
    parser.add_argument("--only", nargs="*", default=None, help="run only these experiment names of the analysis")
    parser.add_argument("--collect", action="store_true", help="queue nothing: wait for and record the analysis' "
                        "experiments already queued or run (e.g. after this command was interrupted)")
    parser.add_argument("--baseline", default="HEAD", help="with --collect: the commit the experiments were queued on "
                        "(default HEAD)")
    args = parser.parse_args()
    analysis = ANALYSES[args.analysis]
    experiments = [e for e in analysis.experiments if args.only is None or e.name in args.only]
    names = [e.name for e in experiments]
    start = time.perf_counter()
    # the commit the experiments derive from: a commit made while they run moves HEAD, and `dvc exp show` lists
    # HEAD's experiments unless told which baseline
    baseline = subprocess.run(["git", "rev-parse", args.baseline if args.collect else "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    if not args.collect:
        # A rerun replaces the analysis' own experiments and queue tasks, and touches no other experiment.
        dvc("exp", "remove", *names, check=False)
        dvc("queue", "remove", *names, check=False)
        copied = [part for path in untracked_files() for part in ("-C", path)]
        for experiment in experiments:
            overrides = [part for value in experiment.overrides for part in ("-S", value)]
            dvc("exp", "run", "--queue", "-n", experiment.name, *copied, *overrides, *analysis.targets)
        dvc("queue", "start", "-j", "1")
    statuses = wait_for_queue(set(names), baseline)
    seconds = time.perf_counter() - start
    failed = [name for name in names if statuses.get(name) != "success"]
    # a failed task is listed by `dvc exp show` with its baseline's metrics: record the successful ones only
    rows = experiment_rows(json.loads(dvc("exp", "show", "--json", "--rev", baseline)),
                           [name for name in names if name not in failed])
    out = args.out or Path("analyses/results") / f"{args.analysis}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() and args.only else {"experiments": {}}
    record = {"analysis": args.analysis, "targets": list(analysis.targets),
              "seconds": round(seconds + previous.get("seconds", 0), 1),
              "experiments": {**previous["experiments"], **rows}}
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{args.analysis}: {len(rows)} of {len(names)} experiments recorded in {seconds:.0f}s -> {out}")
    if failed:
        sys.exit(f"failed or missing: {', '.join(failed)} (see `dvc queue logs <name>`)")


if __name__ == "__main__":
    main()
