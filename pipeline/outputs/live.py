"""Training curves through dvclive, written step by step so `dvc exp show` and `dvc plots show` see a
stage's progress while it runs.

A curve directory holds ``metrics.json`` (the latest value of each curve, and its step) and
``plots/metrics/<name>.tsv`` (``step`` and the value, one row per logged step; no timestamps, so the
same run writes the same bytes). dvc.yaml declares these files itself.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dvclive import Live


def open_curves(directory: Path) -> Live:
    """A logger that writes only under ``directory``, emptied first.

    ``dvcyaml=None``: dvclive would otherwise rewrite dvc.yaml's plots and metrics; ``save_dvc_exp=False``:
    a stage is one step of a pipeline, and ``dvc exp run`` records the experiment.
    """
    return Live(dir=str(directory), dvcyaml=None, save_dvc_exp=False)


def log_step(live: Live, step: int, values: Mapping[str, float]) -> None:
    """Append ``values`` at ``step`` to their curves (``a/b`` names nest) and refresh ``metrics.json``."""
    live.step = int(step)
    for name, value in values.items():
        live.log_metric(name, float(value))
    live.make_summary()


def write_curves(directory: Path, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
    """Write ``directory``'s curves afresh from a finished run's ``(step, values)`` rows, in their order.

    A stage logs step by step to show progress, then calls this with its whole history: a run resumed
    from a state then shows its first steps too, and curves logged from threads have a fixed order.
    No rows leave an empty ``metrics.json`` (an imported checkpoint has no training curve).
    """
    live = open_curves(directory)
    for step, values in rows:
        log_step(live, step, values)
    live.make_summary()


def loss_curve(history: list[dict[str, float]], every: int,
               columns: Sequence[str] = ("loss",)) -> list[tuple[int, dict[str, float]]]:
    """Mean of each of ``columns`` over windows of ``every`` steps of a per-step ``history``: ``(last step,
    {column: mean})`` per window, the last window possibly shorter; a column a step lacks counts as 0 (e.g. vb
    of a model without learned sigma)."""
    frame = pd.DataFrame(history).reindex(columns=list(columns)).fillna(0.0)
    frame["step"] = np.arange(1, len(frame) + 1)
    windows = frame.groupby((frame["step"] - 1) // every).agg({"step": "max", **{name: "mean" for name in columns}})
    return [(int(row.pop("step")), row) for row in windows.to_dict("records")]
