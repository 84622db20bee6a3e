"""features.layout pixels against native, measured on the real stages, at two geometries.

- ``digits``: the built-in run's geometry (32², blocks [0, 1, 2, 3], D = 768), the extract and fit stages
  run directly on a prepared digits dataset and a checkpoint (default: the pipeline's own).
- ``paper256``: the paper's configuration end to end through ``dvc repro`` in a scratch copy of the
  repository: a random-weights checkpoint of the paper's 256 model (the shapes of
  shared/reference/guided_diffusion/adm256_paper_keys.json, written here, not committed), a few 256²
  images in the paper's layout (real/train, real/test), ``ddpm.preset: adm256`` (blocks [5, 6, 7, 8, 12]),
  t = 50, 150, 250 (D = 8448); every stage is run on its own (``dvc repro -s``) so its peak RSS is its own.

Per layout: bytes on disk per image (all steps), extraction seconds per image including the write (the
stage's own count, model load excluded) and the stage's wall time, fit's rows read per second (rows x
epochs / fit's training time) and every stage's peak RSS (``os.wait4``'s ru_maxrss of the stage's process
tree). The ratio column is native against pixels, from the same run. Run it alone, under the CPU lock:

    python benchmarks/store_layouts.py digits --out benchmarks/results/store_layouts_digits.json
    python benchmarks/store_layouts.py paper256 --work /tmp/paper256 --out benchmarks/results/store_layouts_paper256.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KEYS = REPO.parent / "shared" / "reference" / "guided_diffusion" / "adm256_paper_keys.json"
LAYOUTS = ("pixels", "native")


def measured(command: list[str], cwd: Path, env: dict) -> dict:
    """Run ``command``; its wall seconds, the peak RSS of its process tree, and its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "output": output}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summary(stages: dict[str, dict], stores: list[Path], images: int) -> dict:
    """What one layout's run measured, from its stages' outputs."""
    extract = {name: run for name, run in stages.items() if name.startswith("extract")}
    written = [re.search(r"(\d+) of \d+ images computed in ([\d.]+)s", run["output"]) for run in extract.values()]
    fit = stages["fit"]["output"]
    rows, dim = map(int, re.search(r"fit: (\d+) pixels x (\d+) features", fit).groups())
    epochs, fit_seconds = re.search(r"fit: (\d+) epochs .* in (\d+)s", fit).groups()
    return {
        "feature_dim": dim,
        "bytes_per_image": round(sum(map(folder_bytes, stores)) / images),
        "extract_seconds_per_image": round(sum(float(m.group(2)) for m in written) / images, 3),
        "extract_images_per_second": round(images * len(written) / sum(float(m.group(2)) for m in written), 3),
        "extract_stage_seconds": round(sum(run["seconds"] for run in extract.values()), 1),
        "fit_rows_per_second": round(rows * int(epochs) / max(float(fit_seconds), 1.0)),
        "fit_rows": rows, "fit_epochs": int(epochs), "fit_seconds": float(fit_seconds),
        "stages": {name: {k: v for k, v in run.items() if k != "output"} for name, run in stages.items()},
    }


def environment() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                f"{os.environ['PATH']}", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
                GIT_COMMITTER_EMAIL="b@b")


def digits(args) -> dict:
    """The extract and fit stages on the digits geometry, in ``args.work``, for both layouts."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env, results = environment(), {}
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    images = sum(len(list((args.data / "real" / split).glob("*.png"))) for split in ("train", "val", "test"))
    for layout in args.layouts:
        params = work / f"{layout}.yaml"
        params.write_text(yaml.safe_dump({**base, "features": {**base["features"], "layout": layout}}, sort_keys=False))
        stores = work / layout
        shutil.rmtree(stores, ignore_errors=True)
        stages = {}
        for t in base["t_steps"]:
            stages[f"extract@{t}"] = measured(
                [sys.executable, "-m", "stages.extract", "--params", str(params), "--t", str(t), "--data", str(args.data),
                 "--checkpoint", str(args.checkpoint), "--out", str(stores / f"t{t}.zarr")], REPO, env)
        stages["fit"] = measured([sys.executable, "-m", "stages.fit", "--params", str(params), "--stores",
                                  str(stores / "t{t}.zarr"), "--out", str(work / f"{layout}.pt"), "--curves",
                                  str(work / f"curves_{layout}")], REPO, env)
        results[layout] = summary(stages, [stores / f"t{t}.zarr" for t in base["t_steps"]], images)
    return {"geometry": "digits 32², blocks [0, 1, 2, 3], t 50/150/250", "images": images, "layouts": results}


def paper_checkpoint(path: Path) -> int:
    """A random-weights guided-diffusion state dict of the paper's 256 model, checked against the paper's shapes,
    written by a child process: the 2.2 GB model would otherwise stay in this process's RSS, and a stage started
    from here later would report it as its own peak (Linux carries ru_maxrss across fork and exec)."""
    done = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                           "import store_layouts; print(store_layouts.write_paper_checkpoint(Path(sys.argv[2])))",
                           str(Path(__file__).resolve().parent), str(Path(path).resolve())], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"writing {path} failed:\n{done.stderr[-4000:]}")
    return int(done.stdout.split()[-1])


def write_paper_checkpoint(path: Path) -> int:
    import torch

    from pipeline.diffusion.unet import config_from_flags, create_unet
    from pipeline.presets import MODEL_PRESETS

    torch.manual_seed(0)
    model = create_unet(config_from_flags(dict(MODEL_PRESETS["adm256"]["model"], image_size=256)))
    with torch.no_grad():  # guided-diffusion zero-initialises each residual branch's last conv: give them small
        for parameter in model.parameters():  # random weights, so that the maps are not the skip paths alone
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0, 0.01)
    state = model.state_dict()
    expected = json.loads(KEYS.read_text())["state_dict_shapes"]
    assert {k: list(v.shape) for k, v in state.items()} == expected, "the adm256 preset differs from the paper's keys"
    torch.save(state, path)
    return sum(v.numel() for v in state.values())


def paper_images(root: Path, counts: dict[str, int], size: int = 256) -> None:
    """Smooth random 256² images with 3-class masks (rectangles, an ignore line), as real/<split>/<stem>.png|npy."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        folder = root / "real" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            mask = np.zeros((size, size), np.uint8)
            for label in (1, 2):
                top, left = rng.integers(0, size // 2, size=2)
                mask[top : top + size // 3, left : left + size // 3] = label
            mask[size // 2, :] = 255
            classes = np.where(mask == 255, 0, mask).astype(np.int64)
            colour = np.stack([classes * 90, 200 - classes * 80, classes * 40], -1)
            image = np.clip(colour + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{split}{index}.png")
            np.save(folder / f"{split}{index}.npy", mask)


def scratch_copy(root: Path) -> None:
    """``root`` becomes a fresh copy of the repository's files (tracked and untracked-but-not-ignored), without
    dvc.lock, so every stage runs there."""
    shutil.rmtree(root, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)


def commit_scratch(root: Path) -> None:
    """Make the scratch copy a git + DVC repository with everything committed (DVC telemetry off)."""
    env, dvc = environment(), str(Path(sys.executable).parent / "dvc")
    for command in (["git", "init", "-q"], [dvc, "init", "-q", "-f"], [dvc, "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "scratch"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)


def paper256(args) -> dict:
    """The paper's configuration through ``dvc repro -s`` per stage in a scratch copy of the repository."""
    work = args.work
    root = work / "repo"
    if (root / "dvc.lock").is_file() and args.reuse:  # a previous invocation's copy: prepare and pretrain are done
        return paper256_layouts(args, root)
    scratch_copy(root)
    counts = {"train": args.train_images, "test": args.test_images}
    paper_images(root / "data" / "datasets" / "paper256", counts)
    checkpoint = work / "adm256_random.pt"
    if not checkpoint.is_file():
        parameters = paper_checkpoint(checkpoint)
        print(f"wrote {checkpoint}: {parameters} parameters", flush=True)
    os.link(checkpoint, root / "models" / "adm256_random.pt")  # a dep DVC hashes; the 2.2 GB are not copied
    with open(root / ".gitignore", "a") as ignore:  # nor committed to git
        ignore.write("/models/adm256_random.pt\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["t_steps"], params["blocks"] = [50, 150, 250], None  # null = the adm256 preset's [5, 6, 7, 8, 12]
    params["dataset"].update(name="paper256", root="data/datasets/paper256", image_size=256, num_classes=3,
                             train_images=args.train_images, val_images=0, test_images=args.test_images)
    params["ddpm"].update(preset="adm256", checkpoint="models/adm256_random.pt")
    params["ensemble"].update(members=args.members, epochs=args.epochs)
    params["evaluate"]["overlays"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_scratch(root)
    return paper256_layouts(args, root)


def paper256_layouts(args, root: Path) -> dict:
    env, dvc = environment(), str(Path(sys.executable).parent / "dvc")
    params = yaml.safe_load((root / "params.yaml").read_text())
    counts = {"train": params["dataset"]["train_images"], "test": params["dataset"]["test_images"]}
    results, images = {}, sum(counts.values())
    for layout in args.layouts:
        params["features"]["layout"] = layout
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # done ones: DVC skips them; pretrain_mae and pretrain_swav write the placeholders extract depends on
        names = ["prepare", "pretrain", "pretrain_mae", "pretrain_swav", "extract"]
        stages = {name: measured([dvc, "repro", "-s", name], root, env) for name in names + ["fit", "evaluate"]}
        stages = {name: run for name, run in stages.items() if "Running stage" in run["output"]}
        for name, run in stages.items():
            print(f"{layout} {name}: {run['seconds']} s, peak RSS {run['peak_rss_mb']} MB", flush=True)
        results[layout] = summary(stages, [root / "features" / f"t{t}.zarr" for t in params["t_steps"]], images)
        results[layout]["test_miou"] = json.loads((root / "metrics" / "eval.json").read_text())["miou"]
        assert results[layout]["feature_dim"] == json.loads(KEYS.read_text())[
            "paper_feature_dim_blocks_5_6_7_8_12_steps_50_150_250"] == 8448, results[layout]["feature_dim"]
        save(args.out, {"layouts": {layout: results[layout]}})  # kept should a later layout not finish
    return {"geometry": "paper 256², adm256 random weights, blocks [5, 6, 7, 8, 12], t 50/150/250",
            "images": counts, "members": params["ensemble"]["members"], "epochs": params["ensemble"]["epochs"],
            "layouts": results}


def save(out: Path | None, result: dict) -> dict:
    """Write ``result`` to ``out``, keeping the layouts an earlier invocation measured; returns the merged result."""
    if out and out.is_file():
        result = {**json.loads(out.read_text()), **result,
                  "layouts": {**json.loads(out.read_text())["layouts"], **result["layouts"]}}
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("geometry", choices=["digits", "paper256"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/store_layouts"))
    parser.add_argument("--data", type=Path, default=REPO / "data" / "prepared", help="digits: a prepared dataset")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "ddpm.pt", help="digits: its checkpoint")
    parser.add_argument("--train-images", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=1)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--reuse", action="store_true", help="paper256: keep the scratch copy of an earlier invocation")
    parser.add_argument("--out", type=Path, default=None, help="JSON results; an existing file's other layouts are kept")
    args = parser.parse_args()
    result = digits(args) if args.geometry == "digits" else paper256(args)
    result = save(args.out, result)  # with the layouts of an earlier invocation (one locked slot each)
    if set(result["layouts"]) != set(LAYOUTS):
        return
    pixels, native = result["layouts"]["pixels"], result["layouts"]["native"]
    print(f"{result['geometry']}; D = {native['feature_dim']}")
    print("| measure | pixels | native | native / pixels |\n|---|---|---|---|")
    for key in ("bytes_per_image", "extract_seconds_per_image", "extract_images_per_second", "fit_rows_per_second"):
        print(f"| {key} | {pixels[key]} | {native[key]} | {native[key] / pixels[key]:.3f} |")
    for stage in {**pixels["stages"], **native["stages"]}:
        before = pixels["stages"].get(stage, {}).get("peak_rss_mb", "-")
        print(f"| peak RSS {stage} (MB) | {before} | {native['stages'].get(stage, {}).get('peak_rss_mb', '-')} | |")


if __name__ == "__main__":
    main()
