"""From ``dvc exp show --json`` to the analyses' tables: pure functions of the recorded JSON."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import pandas as pd

from analyses.experiments import seed_of

# What the report reads of each run (dvc.yaml's metrics files).
METRICS_FILES = ("metrics/val.json", "metrics/eval.json", "metrics/robustness.json", "metrics/label.json",
                 "metrics/datasetddpm.json")


def _entries(node: Any) -> Iterator[dict]:
    """Every revision entry (a dict with ``rev`` and ``data``) anywhere in ``dvc exp show --json`` output."""
    if isinstance(node, list):
        for item in node:
            yield from _entries(item)
    elif isinstance(node, dict):
        if "rev" in node and isinstance(node.get("data"), dict):
            yield node
        for key in ("experiments", "revs"):
            if node.get(key):
                yield from _entries(node[key])


def experiment_states(exp_show: list, names: Sequence[str]) -> dict[str, str]:
    """``{name: queued | running | success | failed}`` of the named experiments in ``dvc exp show --json``
    output (its ``executor.state``; a finished experiment whose executor is gone is a success); a name it
    does not list is left out."""
    states = {}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            if "revs" in node:  # one experiment (dvc's ExpRange)
                name = node.get("name") or next((rev.get("name") for rev in node["revs"] or []), None)
                if name in names:
                    executor = node.get("executor")
                    states[name] = executor["state"] if executor else "success"
            visit(node.get("experiments") or [])

    visit(exp_show)
    return states


def experiment_rows(exp_show: list, names: Sequence[str]) -> dict[str, dict]:
    """The named experiments' params.yaml and metrics (``{name: {"rev", "timestamp", "params", "metrics"}}``),
    as ``dvc exp show --json`` reports them; a name it does not list is left out."""
    rows = {}
    for entry in _entries(exp_show):
        if entry.get("name") not in names:
            continue
        data = entry["data"]
        metrics = {path: (data.get("metrics") or {}).get(path, {}).get("data") for path in METRICS_FILES}
        rows[entry["name"]] = {"rev": entry["rev"], "timestamp": data.get("timestamp"),
                               "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                               "metrics": {path: value for path, value in metrics.items() if value is not None}}
    return rows


def miou(row: dict, split: str) -> float | None:
    """The paper-protocol mIoU of a recorded run on ``val`` or ``test``."""
    metrics = row["metrics"].get("metrics/val.json" if split == "val" else "metrics/eval.json") or {}
    return metrics.get("miou")


def label_groups(record: dict, labels: dict[str, str]) -> dict[str, list[str]]:
    """The recorded experiments of each label of ``labels`` (experiment name -> label), in ``labels``' order:
    experiments of one label are seeds of one run."""
    groups: dict[str, list[str]] = {}
    for name, label in labels.items():
        if name in record["experiments"]:
            groups.setdefault(label, []).append(name)
    return groups


def mean_and_std(values: list) -> tuple[float, float]:
    """Mean and sample std over seeds (std NaN for one seed: no spread to show)."""
    series = pd.Series(values, dtype=float)
    return series.mean(), series.std() if len(series) > 1 else float("nan")


def split_table(record: dict, labels: dict[str, str]) -> pd.DataFrame:
    """One row per label of ``labels`` (experiment name -> label; experiments of one label are fit seeds of one run),
    in that order: the first recorded experiment's name, the seeds recorded, and the mean and std over them of val
    and test mIoU (std empty for one seed)."""
    rows = []
    for label, names in label_groups(record, labels).items():
        val, val_std = mean_and_std([miou(record["experiments"][n], "val") for n in names])
        test, test_std = mean_and_std([miou(record["experiments"][n], "test") for n in names])
        rows.append({"run": label, "experiment": names[0], "seeds": len(names), "val mIoU": val, "val std": val_std,
                     "test mIoU": test, "test std": test_std})
    return pd.DataFrame(rows)


def datasetddpm_table(record: dict, labels: dict[str, str]) -> pd.DataFrame:
    """DatasetDDPM's rows (experiments of one label are segnet seeds of one synthetic set): the samples drawn and kept,
    the segnet's val and test mIoU (mean, std over seeds), its chosen epochs and the val mIoU of the ensemble that
    labeled the set (the same in every run but those with another DDPM); first, the default DDPM's ensemble, from
    the first recorded experiment."""
    groups = label_groups(record, labels)
    if not groups:
        return pd.DataFrame()
    rows = []
    first = record["experiments"][next(iter(groups.values()))[0]]
    rows.append({"run": "ensemble on real features (what is distilled)", "seeds": 1, "samples": "-", "kept": "-",
                 "val mIoU": miou(first, "val"), "val std": float("nan"), "test mIoU": miou(first, "test"),
                 "test std": float("nan"), "epochs chosen": "-", "ensemble val": miou(first, "val")})
    for label, names in groups.items():
        segnet = [record["experiments"][n]["metrics"].get("metrics/datasetddpm.json") or {} for n in names]
        labeled = record["experiments"][names[0]]["metrics"].get("metrics/label.json") or {}
        val, val_std = mean_and_std([m.get("val_miou") for m in segnet])
        test, test_std = mean_and_std([m.get("miou") for m in segnet])
        rows.append({"run": label, "seeds": len(names), "samples": labeled.get("images", "-"),
                     "kept": labeled.get("kept", "-"), "val mIoU": val, "val std": val_std, "test mIoU": test,
                     "test std": test_std, "epochs chosen": ", ".join(str(m.get("epoch", "?")) for m in segnet),
                     "ensemble val": miou(record["experiments"][names[0]], "val")})
    return pd.DataFrame(rows)


def sample_efficiency_table(record: dict) -> pd.DataFrame:
    """Per number of labeled images: the optimizer steps per member (``ensemble.steps``; ``by epochs`` for runs
    trained by epochs, whose steps grew with the images), the draws (subset seeds), and mean and std over them of
    val and test mIoU."""
    rows = []
    for row in record["experiments"].values():
        ensemble = row["params"].get("ensemble", {})
        steps = ensemble.get("steps")
        rows.append({"images": ensemble.get("train_images") or row["params"].get("dataset", {}).get("train_images"),
                     "steps": "by epochs" if steps is None else str(steps),
                     "seed": ensemble.get("train_subset_seed", 0), "val": miou(row, "val"), "test": miou(row, "test")})
    frame = pd.DataFrame(rows).dropna()
    summary = frame.groupby(["images", "steps"]).agg(
        seeds=("seed", "count"), val_mean=("val", "mean"), val_std=("val", "std"), test_mean=("test", "mean"),
        test_std=("test", "std")).reset_index()
    return summary.fillna({"val_std": 0.0, "test_std": 0.0})


def robustness_table(record: dict, labels: dict[str, str]) -> pd.DataFrame:
    """Test mIoU per corruption and severity (columns), one row per (run, corruption); severity 0 = clean."""
    rows = []
    for name, label in labels.items():
        if seed_of(name) != 0:  # one row per run: its first fit seed
            continue
        result = record["experiments"].get(name, {}).get("metrics", {}).get("metrics/robustness.json")
        if not result:
            continue
        for corruption, by_severity in result.items():
            if isinstance(by_severity, dict):
                rows.append({"run": label, "corruption": corruption, "0": result["clean"],
                             **{severity: value for severity, value in sorted(by_severity.items())}})
    return pd.DataFrame(rows)
