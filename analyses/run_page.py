"""One self-contained HTML page for a finished run: its metrics (``metrics/*.json``), tables
(``plots/*.csv`` but the per-pixel confusion rows), figures (evaluate's overlays, the corruption strip,
k-means maps, segment's overlays, suggest's images) base64-embedded, and its params.yaml. The page needs no other file, so
it can be mailed or attached to an issue as it is:

    python -m analyses.report --run . [--out report.html]
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from analyses.results import METRICS_FILES, _entries  # the report's reading of dvc's JSON

# Figures of a run, in the order the page shows them: (heading, glob under the run folder).
FIGURES = [
    ("Test images: image, ground truth, prediction, uncertainty (evaluate)", "plots/overlays/*.png"),
    ("The first test image under each corruption (robustness)", "plots/corruptions.png"),
    ("k-means clusters of the features (kmeans)", "plots/kmeans/*.png"),
    ("New images segmented (segment)", "segmentations/*.overlay.png"),
    ("Unlabeled images worth labeling next, with their uncertainty (suggest)", "plots/suggestions.png"),
]
# Tables of plots/ too long or too raw for a page: one row per sampled test pixel.
SKIPPED_TABLES = {"confusion.csv"}
STYLE = """body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#f3f3f3}td.number{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:0.5em}figcaption{font-size:small;color:#555}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}.missing{color:#a33}"""


def image_tag(path: Path, alt: str) -> str:
    """``<img>`` with the PNG itself in a ``data:`` URI (no file beside the page to lose)."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    """Nested JSON -> ``(dotted key, value)`` rows; lists stay one value."""
    if isinstance(data, dict):
        return [row for key, value in data.items() for row in flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), data)]


def cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="number">{value:.4f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="number">{value}</td>'
    return f"<td>{html.escape('null' if value is None else str(value))}</td>"


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_section(run: Path) -> list[str]:
    parts = ["<h2>Metrics</h2>"]
    files = sorted((run / "metrics").glob("*.json"))
    if not files:
        return parts + [f'<p class="missing">{html.escape(str(run / "metrics"))} holds no .json: run '
                        f"<code>dvc repro</code> (evaluate writes metrics/eval.json)</p>"]
    for path in files:
        rows = flatten(json.loads(path.read_text()))
        parts += [f"<h3>{html.escape(path.name)}</h3>", html_table(["key", "value"], [list(row) for row in rows])]
    return parts


def tables_section(run: Path) -> list[str]:
    files = [path for path in sorted((run / "plots").glob("*.csv")) if path.name not in SKIPPED_TABLES]
    parts = ["<h2>Tables</h2>"] if files else []
    for path in files:
        frame = pd.read_csv(path)
        rows = [[value.item() if hasattr(value, "item") else value for value in row] for row in frame.itertuples(index=False)]
        parts += [f"<h3>{html.escape(path.name)}</h3>", html_table(list(frame.columns), rows)]
    return parts


def figures_section(run: Path) -> list[str]:
    parts = ["<h2>Figures</h2>"]
    for heading, pattern in FIGURES:
        paths = sorted(run.glob(pattern))
        if not paths:
            parts.append(f'<p class="missing">{html.escape(heading)}: no {html.escape(pattern)} in this run</p>')
            continue
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts += [f"<figure>{image_tag(path, path.stem)}<figcaption>{html.escape(str(path.relative_to(run)))}"
                  f"</figcaption></figure>" for path in paths]
    return parts


def build_run_page(run: Path) -> str:
    """The page's HTML for the run folder ``run`` (a project checkout after ``dvc repro``)."""
    params = run / "params.yaml"
    if not params.is_file():
        raise FileNotFoundError(f"{params} does not exist: give --run the folder of a run (the one holding "
                                f"params.yaml, metrics/ and plots/)")
    title = f"Run {run.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>", *metrics_section(run), *tables_section(run), *figures_section(run),
            "<h2>params.yaml</h2>", f"<pre>{html.escape(params.read_text())}</pre>"]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_comparison_page(exp_show: list, title: str = "Experiments") -> str:
    """One self-contained page comparing the experiments of ``dvc exp show --json`` output: a row per
    experiment (and the workspace and baseline commits), the params that differ between them, and each one's
    val and test mIoU (paper protocol and strict) and clean robustness score."""
    rows = []
    for entry in _entries(exp_show):
        data = entry["data"]
        params = dict(flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {})))
        metrics = {path: (data.get("metrics") or {}).get(path, {}).get("data") or {} for path in METRICS_FILES}
        rev = str(entry["rev"])
        rows.append((entry.get("name") or (rev if rev == "workspace" else rev[:7]), params, metrics))
    keys = sorted({key for _, params, _ in rows for key in params})
    differing = [key for key in keys if len({json.dumps(params.get(key), sort_keys=True) for _, params, _ in rows}) > 1]
    scores = [("val mIoU", "metrics/val.json", "miou"), ("test mIoU", "metrics/eval.json", "miou"),
              ("val strict", "metrics/val.json", "miou_strict"), ("test strict", "metrics/eval.json", "miou_strict"),
              ("robustness clean", "metrics/robustness.json", "clean")]
    table = html_table(["experiment", *differing, *(name for name, _, _ in scores)],
                       [[name, *(params.get(key) for key in differing),
                         *(metrics[path].get(key) for _, path, key in scores)] for name, params, metrics in rows])
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(rows)} runs; the params columns are those that differ between them (all others are equal).</p>",
            table]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
