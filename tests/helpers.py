"""Small real projects for stage-level tests: a prepared digits dataset and an untrained checkpoint."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import params_from_dict
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import load_checkpoint, save_checkpoint
from pipeline.diffusion.unet import create_unet
from pipeline.ensemble.files import save_ensemble
from pipeline.ensemble.model import EnsembleMLP
from pipeline.features.activations import feature_dim
from pipeline.features.record import fit_record
from pipeline.hashing import file_sha256
from tests.conftest import REPO

TINY_PARAMS = {
    "t_steps": [50, 150],
    "blocks": [1, 2, 3],
    "dataset": {"train_images": 6, "val_images": 2, "test_images": 4, "unlabeled_images": 16},
    "ddpm": {"model": {"num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [],
                       "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": False,
                       "learn_sigma": False, "dropout": 0.0},
             "train": {"steps": 2, "batch_size": 8}},
    "features": {"batch_size": 1},
    "ensemble": {"members": 2, "epochs": 2},
    "evaluate": {"overlays": 1},
}


def write_params(path: Path, overrides: dict | None = None) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    for key, value in (overrides or {}).items():
        section = data
        *parents, last = key.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def as_a_stage_process(argv: list[str], cwd: Path | None = None):
    """This process set up as a fresh stage process would be (``sys.argv``, working directory, one thread), and
    put back after: torch's thread count and the torch, NumPy and Python global generators too."""
    saved = (sys.argv, os.getcwd(), os.environ.get("DDPM_SEG_THREADS"), torch.get_num_threads(), torch.get_rng_state(),
             np.random.get_state(), random.getstate())
    sys.argv, os.environ["DDPM_SEG_THREADS"] = argv, "1"
    os.chdir(cwd or REPO)
    try:
        yield
    finally:
        sys.argv, cwd_before, threads, torch_threads, torch_rng, numpy_rng, python_rng = saved
        os.chdir(cwd_before)
        if threads is None:
            os.environ.pop("DDPM_SEG_THREADS", None)
        else:
            os.environ["DDPM_SEG_THREADS"] = threads
        torch.set_num_threads(torch_threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)


def run_stage(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m stages.<name> args`` (one thread): its exit code, stdout and stderr, run in this process as a
    fresh one would run it (``as_a_stage_process``; stdout and stderr its own; an uncaught exception is exit code 1
    with its traceback on stderr), because the imports of a fresh process cost more than these tiny stages."""
    argv = [f"stages/{name}.py", *map(str, args)]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with as_a_stage_process(argv, cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            importlib.import_module(f"stages.{name}").main()
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): Python prints it and exits with 1
                print(exit_.code, file=sys.stderr)
                code = 1
        except Exception:  # what a fresh process would print before exiting with 1
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def make_project(root: Path, overrides: dict | None = None) -> dict[str, Path]:
    """Prepared digits + an untrained checkpoint under ``root``; returns the paths stages take."""
    params = write_params(root / "params.yaml", overrides)
    data = root / "prepared"
    result = run_stage("prepare", "--params", params, "--out", data)
    assert result.returncode == 0, result.stderr
    checkpoint = root / "ddpm.pt"
    loaded = params_from_dict(yaml.safe_load(params.read_text()))
    torch.manual_seed(0)
    save_checkpoint(checkpoint, create_unet(loaded.unet_config()).eval(), Diffusion("linear", 1000), {"kind": "test"})
    return {"params": params, "data": data, "checkpoint": checkpoint}


def full_disk_save(real_save, failing_name: str | None = None):
    """A stand-in for ``torch.save`` that fails as torch's zip writer does on a full disk: it leaves a
    partial file, then raises a bare RuntimeError. Only for files named ``failing_name`` when given."""

    def save(payload, path, *args, **kwargs):
        real_save(payload, path, *args, **kwargs)
        if failing_name is not None and Path(path).name != failing_name:
            return
        with open(path, "r+b") as handle:
            handle.truncate(100)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    return save


def exit_code_2_stderr(main, argv: list[str], monkeypatch, capsys) -> str:
    """Run a stage's ``main`` in this process (so monkeypatches reach it) with ``argv``; assert it exits
    with code 2 and return what it wrote to stderr."""
    import pytest

    monkeypatch.setattr(sys, "argv", [str(arg) for arg in argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def save_random_ensemble(path, params, checkpoint) -> None:
    """An ensemble in fit's format over the project's features; weights scaled up so classes differ."""
    model, _, _ = load_checkpoint(checkpoint)
    dim = feature_dim(model, params.blocks, len(params.t_steps))
    ensemble = EnsembleMLP(3, dim, params.dataset.num_classes, seed=0)
    with torch.no_grad():
        for weight in ensemble.weights:
            weight.mul_(20)
    save_ensemble(path, ensemble, features=fit_record(params, file_sha256(checkpoint)))


def tiny_checkpoint(root, params_path):
    """An untrained tiny UNet whose output head is not zero (so samples depend on the network)."""
    loaded = params_from_dict(yaml.safe_load(params_path.read_text()))
    torch.manual_seed(0)
    model = create_unet(loaded.unet_config()).eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.05)
    save_checkpoint(root / "ddpm.pt", model, Diffusion("linear", 1000), {"kind": "test"})
    return root / "ddpm.pt"


def run_here(stage: str, *args) -> None:
    """Run a stage's main in this process as ``run_stage`` does, but let what it raises reach the caller (so that a
    test can monkeypatch what the stage calls and catch what it raises)."""
    with as_a_stage_process([stage, *map(str, args)], REPO):
        importlib.import_module(f"stages.{stage}").main()


def killed_and_resumed(command: list[str], out: Path, state: Path, env: dict[str, str]) -> int:
    """Run a pretraining stage's ``command`` (writing ``out``), SIGKILL it as soon as its first resumable state
    ``state`` exists, check the kill landed mid-training, rerun it to the end and check it said it resumed;
    returns the step it resumed from."""
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not out.exists(), "the kill should land mid-training, after a state was written"
    killed_at = torch.load(state, weights_only=True)["step"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {killed_at}" in result.stdout
    return killed_at


def assert_feature_path_upsamples(model, representation: str, images, block_maps, blocks: list[int], dim: int) -> None:
    """The one feature path's rows for ``images`` (``[N, S, S, 3] uint8``, in batches of 2) equal the
    encoder's ``block_maps(model, x0, blocks)`` bilinearly upsampled to S², concatenated, float16."""
    import torch.nn.functional as F

    from pipeline.config import FeaturesConfig
    from pipeline.features.compute import features_for_images

    count, size = len(images), images.shape[1]
    options = FeaturesConfig(representation=representation, batch_size=2)
    rows = dict(features_for_images(model, None, list(images), options=options, t_steps=[50], blocks=blocks))
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        maps = torch.cat([F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False)
                          for block in block_maps(model, x0, blocks)], dim=1)
    expected = maps.permute(0, 2, 3, 1).reshape(count, size * size, dim).to(torch.float16)
    assert sorted(rows) == list(range(count)) and rows[0].dtype == torch.float16 and rows[0].shape == (size**2, dim)
    for index in range(count):
        torch.testing.assert_close(rows[index], expected[index], atol=2e-3, rtol=2e-3)


def assert_placeholder_is_constant_and_refused(folder: Path, unused_checkpoint, load, name: str) -> None:
    """A pretraining stage's placeholder is the same bytes wherever it is written, and loading it as a model is
    refused, naming the representation to rerun it with."""
    import pytest

    from pipeline.errors import ConfigError

    unused_checkpoint(folder / "a.pt")
    (folder / "b").mkdir()
    unused_checkpoint(folder / "b" / "a.pt")
    assert (folder / "a.pt").read_bytes() == (folder / "b" / "a.pt").read_bytes()
    with pytest.raises(ConfigError, match=f"placeholder .* features.representation: {name}"):
        load(folder / "a.pt")
