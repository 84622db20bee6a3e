"""One Markdown report of the analyses from their recorded runs (``analyses/results/<analysis>.json``, written
by ``python -m analyses.run``), with its figures beside it:

    python -m analyses.report --results analyses/results --out docs/analyses/report.md [--kmeans plots/kmeans]
    python -m analyses.report --run .    # instead: one self-contained HTML page of a run (analyses/run_page.py)

Tables: the baselines (val and test mIoU), mIoU against the number of labeled images (mean and std over the
subset seeds), the noise variants, test mIoU per corruption and severity; figures: sample efficiency,
robustness, and the k-means maps (copied from the kmeans stage's folder). Analyses without a results file
are left out, with a line saying so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analyses import active_learning
from analyses.experiments import ANALYSES
from analyses.representation_map import plot_map
from analyses.results import datasetddpm_table, robustness_table, sample_efficiency_table, split_table
from analyses.run_page import build_comparison_page, build_run_page


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """``frame`` as a GitHub Markdown table, numbers rounded to ``digits``."""
    def cell(value) -> str:
        if isinstance(value, float) and value != value:  # NaN: nothing to show (e.g. the std of one seed)
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def labels_of(analysis: str) -> dict[str, str]:
    return {e.name: e.label for e in ANALYSES[analysis].experiments}


def overrides_of(analysis: str) -> dict[str, str]:
    return {e.name: " ".join(f"`-S {o}`" for o in e.overrides) or "(defaults)" for e in ANALYSES[analysis].experiments}


def steps_caption(summary: pd.DataFrame) -> str:
    """What the curve holds fixed: one optimizer-step count at every point, or a warning that it does not."""
    steps = sorted(set(summary["steps"]))
    if steps == ["by epochs"]:
        return "trained by epochs: the optimizer steps grow with the images (confounded)"
    if len(steps) == 1:
        return f"{steps[0]} optimizer steps per member at every count"
    return f"mixed training budgets: {', '.join(steps)} (not comparable point to point)"


def plot_sample_efficiency(summary: pd.DataFrame, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for split, colour in (("val", "tab:blue"), ("test", "tab:orange")):
        axis.errorbar(summary["images"], summary[f"{split}_mean"], yerr=summary[f"{split}_std"], marker="o",
                      capsize=3, color=colour, label=f"{split} mIoU (mean ± std over nested subset draws)")
    axis.set_xscale("log")
    axis.set_xticks(summary["images"], [str(v) for v in summary["images"]])
    axis.set_xlabel("labeled training images")
    axis.set_ylabel("mIoU (paper protocol)")
    axis.set_title(f"Sample efficiency on the built-in digits\n{steps_caption(summary)}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_styles(runs: list[str]) -> dict[str, dict]:
    """A line style per run, no two alike however many runs: matplotlib's default cycle has 10 colours, so with the
    20 baselines' rows two runs shared each colour and the legend could not tell them apart. tab20's 10 dark hues
    solid, then its 10 light ones dashed, then both again dotted and dash-dotted, each block with its own marker."""
    colours = plt.get_cmap("tab20").colors
    hues = [colours[i] for i in range(0, 20, 2)] + [colours[i] for i in range(1, 20, 2)]
    lines, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v", "P")
    return {run: {"color": hues[i % 20], "linestyle": lines[i // 10 % 4], "marker": markers[i // 10 % 6]}
            for i, run in enumerate(runs)}


def plot_robustness(table: pd.DataFrame, path: Path) -> None:
    styles = run_styles(list(dict.fromkeys(table["run"])))
    corruptions = list(dict.fromkeys(table["corruption"]))
    legend_rows = -(-table["run"].nunique() // 3)  # three runs a row under the panels
    legend_inches = 0.45 + 0.17 * legend_rows
    figure, axes = plt.subplots(1, len(corruptions), figsize=(3.0 * len(corruptions), 2.8 + legend_inches),
                                sharey=True)
    axes = [axes] if len(corruptions) == 1 else list(axes)
    severities = [c for c in table.columns if c not in ("run", "corruption")]
    for axis, corruption in zip(axes, corruptions):
        for _, row in table[table["corruption"] == corruption].iterrows():
            axis.plot([int(s) for s in severities], [row[s] for s in severities], label=row["run"], markersize=4,
                      **styles[row["run"]])
        axis.set_title(corruption, fontsize=9)
        axis.set_xlabel("severity (0 = clean)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test mIoU")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.suptitle("Test mIoU under corruptions", fontsize=10)
    figure.tight_layout(rect=(0, legend_inches / (2.8 + legend_inches), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def representation_map_section(record: dict, folder: Path) -> list[str]:
    """The map's heatmaps (drawn again from its record) and its table: val mIoU per block (rows) and step."""
    plot_map(record, folder / "representation_map.png")
    cells = pd.DataFrame(record["cells"])
    lines = [f"One light classifier per cell ({record['classifier']['members']} MLP members, "
             f"{record['classifier']['optimizer_steps']} optimizer steps each) on one decoder block's features at "
             f"one step, trained on {record['train_images']} train images and scored on {record['val_images']} val "
             f"images. Small classes (below the median area in the train masks): "
             f"{', '.join(record['classes']['small'])}; large: {', '.join(record['classes']['large'])}.", "",
             "![val mIoU by decoder block and step, all / small / large classes](representation_map.png)", ""]
    for group in ("all", "small", "large"):
        table = cells.pivot(index="block", columns="t", values=f"miou_{group}")
        table.columns = [f"t={t}" for t in table.columns]
        lines.extend([f"val mIoU, {group} classes:", "", markdown_table(table.reset_index()), ""])
    best = cells.loc[cells["miou_all"].idxmax()]
    lines.extend([f"Best cell: block {int(best['block'])} at t={int(best['t'])} (val mIoU {best['miou_all']:.3f}).",
                  ""])
    return lines


def active_learning_section(record: dict, folder: Path) -> list[str]:
    """Uncertainty picking against random picking: the curve (mean and std over seeds) and its table."""
    active_learning.plot(record, folder / "active_learning.png")
    table = active_learning.summary(record)
    wide = table.pivot(index="labeled", columns="strategy", values=["val_mean", "val_std"])
    wide.columns = [f"{strategy} {stat.removeprefix('val_')}" for stat, strategy in wide.columns]
    return [f"Start from {record['start']} labeled train images (the same for both strategies per seed), add "
            f"{record['add']} a round for {record['rounds']} rounds, by the ensemble's disagreement "
            f"({record['score']}) or at random; {len(record['seeds'])} seeds; the ensemble "
            f"({record['fit']['members']} members, {record['fit']['optimizer_steps']} optimizer steps each) refit "
            f"every round; val mIoU. `{record.get('command', 'python -m analyses.active_learning')}`, "
            f"{record.get('seconds', float('nan')):.0f} s.", "",
            markdown_table(wide.reset_index()), "", "![val mIoU against labeled images](active_learning.png)", ""]


def build_report(results: Path, out: Path, kmeans: Path | None = None) -> str:
    """Write ``out`` (Markdown) and its figures into ``out``'s folder; returns the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}
    parts = ["# Analyses on the built-in digits", "",
             "Built by `python -m analyses.report` from the runs recorded in `analyses/results/` "
             "(`python -m analyses.run <analysis>`: `dvc exp run --queue` + `dvc queue start` + `dvc exp show --json`). "
             "mIoU is the paper's protocol; nothing here is selected on test.", ""]
    times = []

    def missing(name: str) -> None:
        parts.extend([f"No recorded runs for `{name}` (run `python -m analyses.run {name}`).", ""])

    def split_section(name: str, heading: str) -> None:
        parts.extend([f"## {heading}", ""])
        table = split_table(records[name], labels_of(name)) if name in records else pd.DataFrame()
        if table.empty:
            missing(name)
            return
        table.insert(2, "params", table["experiment"].map(overrides_of(name)))
        parts.extend([markdown_table(table.drop(columns="experiment")), ""])

    split_section("baselines", "Baselines through the same stages")
    split_section("baselines_64px", "Baselines on a second dataset: the digits at 64 px")
    parts.extend(["## Representation map (val)", ""])
    if "representation_map" in records:
        parts.extend(representation_map_section(records["representation_map"], out.parent))
    else:
        parts.extend(["No recorded map (run `python -m analyses.representation_map`).", ""])
    parts.extend(["## Sample efficiency", ""])
    if records.get("sample_efficiency", {}).get("experiments"):
        summary = sample_efficiency_table(records["sample_efficiency"])
        plot_sample_efficiency(summary, out.parent / "sample_efficiency.png")
        shown = summary.rename(columns={"steps": "optimizer steps", "seeds": "draws", "val_mean": "val mIoU",
                                        "val_std": "val std", "test_mean": "test mIoU", "test_std": "test std"})
        parts.extend([f"Nested subsets (for one seed the larger count holds the smaller's images), "
                      f"{steps_caption(summary)}; mean and std over the draws.", "",
                      markdown_table(shown), "", "![mIoU against labeled images](sample_efficiency.png)", ""])
    else:
        missing("sample_efficiency")
    parts.extend(["## Active learning (val)", ""])
    if "active_learning" in records:
        parts.extend(active_learning_section(records["active_learning"], out.parent))
    else:
        parts.extend(["No recorded run (run `python -m analyses.active_learning` after `dvc repro`).", ""])
    parts.extend(["## DatasetDDPM: the distilled network against the ensemble", ""])
    table = datasetddpm_table(records["datasetddpm"], labels_of("datasetddpm")) if "datasetddpm" in records else pd.DataFrame()
    if len(table):
        parts.extend(["Samples drawn from the DDPM (`sample.images`, 50 respaced steps), labeled by the ensemble, the "
                      "10% most uncertain dropped unless said; a SegFormer trained on the kept ones, its epoch chosen "
                      "on val; mean and std over segnet seeds (`segnet.seed`).", "", markdown_table(table), ""])
    else:
        missing("datasetddpm")
    split_section("noise", "Noise variants")
    parts.extend(["## Corruption robustness (test split)", ""])
    robust = robustness_table(records["baselines"], labels_of("baselines")) if "baselines" in records else pd.DataFrame()
    if len(robust):
        plot_robustness(robust, out.parent / "robustness.png")
        parts.extend(["Columns: severity (0 = clean, 1..5 with CIFAR-10-C's constants at 32 px); rows: run and "
                      "corruption.", "",
                      markdown_table(robust), "", "![test mIoU under corruptions](robustness.png)", ""])
    else:
        missing("baselines")
    parts.extend(["## K-means of the features", ""])
    maps = sorted(kmeans.glob("*.png")) if kmeans and kmeans.is_dir() else []
    if maps:
        folder = out.parent / "kmeans"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for path in maps:
            shutil.copy(path, folder / path.name)
            parts.extend([f"![k-means maps of {path.stem}](kmeans/{path.name})", ""])
    else:
        parts.extend(["No k-means maps given (`--kmeans plots/kmeans` after `dvc repro kmeans`).", ""])
    for name, record in records.items():
        times.append({"analysis": name, "experiments": len(record.get("experiments", record.get("cells", record.get("curves", [])))),
                      "wall clock (s)": float(record.get("seconds", float("nan")))})
    if times:
        parts.extend(["## Run times on this machine", "", markdown_table(pd.DataFrame(times), digits=0), ""])
    text = "\n".join(parts)
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("analyses/results"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/analyses/report.md; with --run, <run>/report.html")
    parser.add_argument("--kmeans", type=Path, default=None, help="the kmeans stage's folder (plots/kmeans)")
    parser.add_argument("--run", type=Path, default=None,
                        help="instead: one self-contained HTML page of this run folder (analyses/run_page.py)")
    parser.add_argument("--compare", type=Path, default=None, metavar="EXP_SHOW_JSON",
                        help="instead: one self-contained HTML page comparing the experiments of this `dvc exp show "
                             "--json` output ('-' runs it here), written to --out (default experiments.html)")
    args = parser.parse_args()
    if args.compare is not None:
        if str(args.compare) == "-":
            shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True).stdout
        else:
            shown = args.compare.read_text()
        out = args.out or Path("experiments.html")
        out.write_text(build_comparison_page(json.loads(shown)), encoding="utf-8")
        print(f"experiments page -> {out}")
        return
    if args.run is not None:
        out = args.out or args.run / "report.html"
        page = build_run_page(args.run)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"run page -> {out}")
        return
    out = args.out or Path("docs/analyses/report.md")
    build_report(args.results, out, args.kmeans)
    print(f"report -> {out}")


if __name__ == "__main__":
    main()
