"""Which experiments each analysis queues (names and ``-S`` overrides) and the stages it needs.

Each analysis is plain ``dvc exp run --queue -n <name> -S <key=value> ... <targets>``: the same stages and
splits as ``dvc repro``, so a baseline differs from the method only in the params it sets.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    name: str
    label: str  # the row's name in the report
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Analysis:
    targets: tuple[str, ...]  # the stages `dvc exp run` brings up to date (with everything they depend on)
    experiments: tuple[Experiment, ...]


TRAIN_IMAGES = (1, 2, 5, 10, 20, 50)
SUBSET_SEEDS = (0, 1, 2)


def sample_efficiency_experiments(counts=TRAIN_IMAGES, seeds=SUBSET_SEEDS, all_images: int = 50) -> tuple[Experiment, ...]:
    """One experiment per (number of labeled images, subset seed); all the images once (every seed draws them all)."""
    runs = []
    for count in counts:
        for seed in seeds[: 1 if count >= all_images else None]:
            runs.append(Experiment(f"se-n{count}-s{seed}", f"{count} images, seed {seed}",
                                   (f"ensemble.train_images={count}", f"ensemble.train_subset_seed={seed}")))
    return tuple(runs)


ANALYSES = {
    # The method beside simpler representations through the same stages; robustness runs for each of them.
    "baselines": Analysis(("evaluate", "robustness"), (
        Experiment("bl-ddpm", "DDPM features (the pipeline's default)"),
        Experiment("bl-rgb", "raw RGB pixels", ("features.representation=rgb", "t_steps=[50]")),
        Experiment("bl-rgb-patch", "5x5 RGB neighbourhood",
                   ("features.representation=rgb_patch", "features.patch_size=5", "t_steps=[50]")),
        Experiment("bl-random-unet", "random-init UNet (same architecture)", ("ddpm.train.steps=0",)),
        Experiment("bl-ddpm-200", "DDPM after 200 of 800 pretraining steps", ("ddpm.train.steps=200",)),
    )),
    # fit and evaluate only: the stores already hold every train image.
    "sample_efficiency": Analysis(("evaluate",), sample_efficiency_experiments()),
    # The paper's noise variants (its appendix table): re-extracts the stores.
    "noise": Analysis(("evaluate",), (
        Experiment("nz-fixed", "one fixed noise for all images (default)"),
        Experiment("nz-stochastic", "fresh noise per image", ("features.stochastic_noise=true",)),
        Experiment("nz-avg5", "average of 5 fixed noise draws", ("features.noise_draws=5",)),
    )),
}
