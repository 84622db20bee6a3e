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
# Subset draws per count: >= 5 below 10 images, where which images are drawn moves mIoU the most; 3 above.
SUBSET_SEEDS = (0, 1, 2, 3, 4)
FEW_IMAGES = 10  # counts below it get every seed of SUBSET_SEEDS, counts from it on the first LARGER_SEEDS
LARGER_SEEDS = 3
# Optimizer steps per member at every count (ensemble.steps), so the curve varies the labels and not the training:
# trained by epochs (batch 512, 4 epochs) 1 digit canvas (~950 labeled pixels, 2 batches an epoch) took 8 Adam
# steps and all 50 (47,584 labeled pixels, 93 batches an epoch) 372. 400 is that full-data budget rounded up, so the
# 50-image point trains about as long as the default run (400 steps against 372) and every smaller count as long
# (1 image cycles over its 2 batches for 200 epochs). No stopping rule runs with steps set.
EQUAL_STEPS = 400


def sample_efficiency_experiments(counts=TRAIN_IMAGES, seeds=SUBSET_SEEDS, all_images: int = 50,
                                  steps: int = EQUAL_STEPS) -> tuple[Experiment, ...]:
    """One experiment per (number of labeled images, subset seed), each trained ``steps`` optimizer steps per member:
    every seed below FEW_IMAGES images, LARGER_SEEDS of them from there, all the images once (every seed draws them
    all). For one seed the subsets are nested (``train_subset``: the 5 images hold the 2, which hold the 1)."""
    runs = []
    for count in counts:
        drawn = seeds[:1] if count >= all_images else seeds if count < FEW_IMAGES else seeds[:LARGER_SEEDS]
        for seed in drawn:
            runs.append(Experiment(f"se-n{count}-s{seed}", f"{count} images, seed {seed}",
                                   (f"ensemble.train_images={count}", f"ensemble.train_subset_seed={seed}",
                                    f"ensemble.steps={steps}")))
    return tuple(runs)


# Fit seeds (ensemble.seed: the members' inits and row orders) of every baseline, so each row has a spread. Seed 0
# keeps the experiment's plain name (the runs recorded before seeds were added); the others are <name>-fs<seed>.
FIT_SEEDS = (0, 1, 2)


def with_fit_seeds(experiments: tuple[Experiment, ...], seeds=FIT_SEEDS, key: str = "ensemble.seed") -> tuple[Experiment, ...]:
    """Each experiment once per fit seed (``key``: the ensemble's, or e.g. ``segnet.seed``), under the same label (the
    report's row); the same stores for every seed."""
    return tuple(experiment if seed == 0 else
                 Experiment(f"{experiment.name}-fs{seed}", experiment.label,
                            (*experiment.overrides, f"{key}={seed}"))
                 for experiment in experiments for seed in seeds)


# swav.steps' default (params.yaml): SwAV's steps in the DDPM's pretraining time here (docs/benchmarks.md)
SWAV_STEPS = 1500

# DatasetDDPM (issue 27): synthetic sets of these sizes (sample.images; label keeps all but the 10% most uncertain),
# and one size without the filter. Each is trained with FIT_SEEDS segnet seeds; the samples, their labels and the
# ensemble are the same for every seed of a size (sample.seed fixed), so the spread is the network's training.
SYNTHETIC_IMAGES = (32, 128, 256)
UNFILTERED_IMAGES = 128
# Every size trains the same segnet optimizer steps, SEGNET_STEPS (twice segnet.steps' default: 256 samples chose their
# step 2059 of 2320, 32 samples their step 528), so the sweep varies the set and not the training. The same sweep at
# the paper's 20 epochs (segnet.steps=null: 80 steps for 29 kept samples, 580 for 231, a confounded sweep) is kept as
# the "-e20" runs, recorded before segnet.steps existed.
PAPER_EPOCHS = "segnet.steps=null"
SEGNET_STEPS = 2320
# ... and how it moves with the DDPM's pretraining steps (its samples and the ensemble that labels them both change):
# 256 samples from a DDPM pretrained this many steps instead of 800, at 20 epochs, one segnet seed each (every run
# pretrains anew: a stage whose curve is kept in git is not in DVC's run-cache).
DDPM_STEPS = (400, 1600)


def datasetddpm_experiments(sizes=SYNTHETIC_IMAGES, unfiltered: int = UNFILTERED_IMAGES,
                            ddpm_steps=DDPM_STEPS) -> tuple[Experiment, ...]:
    def sweep(suffix: str, note: str, extra: tuple[str, ...]) -> tuple[Experiment, ...]:
        runs = [Experiment(f"dd-n{size}{suffix}", f"{size} samples, 10% most uncertain dropped{note}",
                           (f"sample.images={size}", *extra)) for size in sizes]
        runs.append(Experiment(f"dd-n{unfiltered}-all{suffix}", f"{unfiltered} samples, none dropped{note}",
                               (f"sample.images={unfiltered}", "datasetddpm.drop_uncertain=0", *extra)))
        return with_fit_seeds(tuple(runs), key="segnet.seed")

    return (sweep("", f", {SEGNET_STEPS} segnet steps", (f"segnet.steps={SEGNET_STEPS}",))
            + sweep("-e20", ", the paper's 20 epochs", (PAPER_EPOCHS,)) + tuple(
        Experiment(f"dd-n256-ddpm{steps}-e20",
                   f"256 samples, a DDPM of {steps} pretraining steps, the paper's 20 epochs (one segnet seed)",
                   ("sample.images=256", f"ddpm.train.steps={steps}", PAPER_EPOCHS)) for steps in ddpm_steps))


# The second dataset's params (analysis baselines_64px): the canvases at 64 px and the UNet's attention at the same
# relative resolution as at 32 px (a quarter of the image side).
AT_64PX = ("dataset.image_size=64", "ddpm.model.attention_resolutions=[16]")


def seed_of(name: str) -> int:
    """The fit seed an experiment of ``with_fit_seeds`` runs: ``bl-rgb-fs2`` -> 2, ``bl-rgb`` -> 0."""
    head, _, tail = name.rpartition("-fs")
    return int(tail) if head and tail.isdigit() else 0


ANALYSES = {
    # The method beside simpler representations through the same stages, each with FIT_SEEDS fit seeds; robustness
    # runs for each of them.
    "baselines": Analysis(("evaluate", "robustness"), with_fit_seeds((
        Experiment("bl-ddpm", "DDPM features (the pipeline's default)"),
        Experiment("bl-rgb", "raw RGB pixels", ("features.representation=rgb", "t_steps=[50]")),
        Experiment("bl-rgb-patch", "5x5 RGB neighbourhood",
                   ("features.representation=rgb_patch", "features.patch_size=5", "t_steps=[50]")),
        # Two untrained UNets of the same architecture: guided-diffusion's init leaves every ResBlock's last conv,
        # every attention proj_out and the output conv at zero, so that net is close to an identity map of its
        # input; "all layers drawn" draws those too (PyTorch's default init), the fair random-network control.
        Experiment("bl-random-unet", "random UNet, guided-diffusion init (zero layers)", ("ddpm.train.steps=0",)),
        Experiment("bl-random-unet-dense", "random UNet, all layers drawn",
                   ("ddpm.train.steps=0", "ddpm.train.init=dense")),
        Experiment("bl-ddpm-200", "DDPM after 200 of 800 pretraining steps", ("ddpm.train.steps=200",)),
        # The competitor pretrained on the same unlabeled images (issue 26): a masked autoencoder at the DDPM's budget
        # in wall-clock time here (mae.steps' default: 3000 steps in 290 s against 800 DDPM steps in 270 s). Its
        # features do not depend on t: one store.
        Experiment("bl-mae", "MAE, the DDPM's pretraining time (3000 steps)",
                   ("features.representation=mae", "t_steps=[50]")),
        # The paper's other competitor, SwAV, at the same budget (swav.steps' default: SWAV_STEPS steps, the DDPM's
        # pretraining time here); its features are the paper's hooks, every other residual block (blocks [0..3]).
        Experiment("bl-swav", f"SwAV, the DDPM's pretraining time ({SWAV_STEPS} steps)",
                   ("features.representation=swav", "t_steps=[50]")),
    )) + (
        # ... and at twice that budget, one fit seed: every fit seed of a queued experiment reruns its pretraining
        # (a stage with an output kept in git, its dvclive curve, is not in DVC's run-cache), 10 minutes each here.
        Experiment("bl-mae-6000", "MAE, twice the DDPM's pretraining time (6000 steps), one fit seed",
                   ("features.representation=mae", "t_steps=[50]", "mae.steps=6000")),
        Experiment(f"bl-swav-{2 * SWAV_STEPS}", f"SwAV, twice the DDPM's pretraining time ({2 * SWAV_STEPS} steps), "
                   f"one fit seed", ("features.representation=swav", "t_steps=[50]", f"swav.steps={2 * SWAV_STEPS}")),
        # The MAE's learning curve beyond (issue 26's converged setting): four times the DDPM's time, one fit seed.
        Experiment("bl-mae-12000", "MAE, four times the DDPM's pretraining time (12000 steps), one fit seed",
                   ("features.representation=mae", "t_steps=[50]", "mae.steps=12000")),
        # The MAE's learning rate at its fair budget, chosen on val (its recipe was never tuned): a third and three
        # times the default 1e-3, one fit seed each.
        Experiment("bl-mae-lr3e-4", "MAE, the DDPM's pretraining time (3000 steps), lr 3e-4, one fit seed",
                   ("features.representation=mae", "t_steps=[50]", "mae.lr=0.0003")),
        Experiment("bl-mae-lr3e-3", "MAE, the DDPM's pretraining time (3000 steps), lr 3e-3, one fit seed",
                   ("features.representation=mae", "t_steps=[50]", "mae.lr=0.003")),
        # The MAE's own pretraining randomness (init, masks, batches: mae.seed) at its fair budget, one fit seed each:
        # the fit seeds' spread of bl-mae does not show it, and the lr runs above differ from it by about 0.03.
        *(Experiment(f"bl-mae-ps{seed}", f"MAE, the DDPM's pretraining time (3000 steps), pretraining seed {seed}, "
                     f"one fit seed", ("features.representation=mae", "t_steps=[50]", f"mae.seed={seed}"))
          for seed in (1, 2)),
        # Each competitor's longer budget (issue 26's converged rows, on val): the DDPM at twice, four and eight times
        # its own pretraining time (its lr is constant after warm-up, so these continue the default run's curve) and
        # the MAE at eight times (its curve still rose 0.05 val from 6000 to 12000 steps), one fit seed each.
        *(Experiment(f"bl-ddpm-{steps}", f"DDPM, {times} its pretraining time ({steps} steps), one fit seed",
                     (f"ddpm.train.steps={steps}",))
          for steps, times in ((1600, "twice"), (3200, "four times"), (6400, "eight times"))),
        Experiment("bl-mae-24000", "MAE, eight times the DDPM's pretraining time (24000 steps), one fit seed",
                   ("features.representation=mae", "t_steps=[50]", "mae.steps=24000")),
    )),
    # fit and evaluate only: the stores already hold every train image.
    "sample_efficiency": Analysis(("evaluate",), sample_efficiency_experiments()),
    # DatasetDDPM against the ensemble it distils: sample, label, train_segnet, evaluate_segnet (and evaluate, for the
    # ensemble's own row) at several synthetic-set sizes, with and without the uncertainty filter.
    "datasetddpm": Analysis(("evaluate", "evaluate_segnet"), datasetddpm_experiments()),
    # The paper's noise variants (its appendix table): re-extracts the stores.
    "noise": Analysis(("evaluate",), (
        Experiment("nz-fixed", "one fixed noise for all images (default)"),
        Experiment("nz-stochastic", "fresh noise per image", ("features.stochastic_noise=true",)),
        Experiment("nz-avg5", "average of 5 fixed noise draws", ("features.noise_draws=5",)),
    )),
}


def at_64px(name: str, label: str) -> Experiment:
    """The baselines' experiment ``name`` on the second dataset: its own overrides after ``AT_64PX``."""
    twin = {e.name: e for e in ANALYSES["baselines"].experiments}[name]
    return Experiment("b64-" + name.removeprefix("bl-"), f"64 px: {label}", (*AT_64PX, *twin.overrides))


# A second dataset (issue 26's item 4): the digits composed at 64 px, the same 24 px digits on a canvas of four times
# the area (smaller objects, more background; dataset.digit_size unchanged), every method at its 32 px settings,
# nothing retuned: the DDPM the same UNet with its attention moved from 8 px to 16 px (at 32 px and at 64 px the
# lowest resolution that channel_mult [1, 2, 2] reaches), the same blocks, steps and recipes; the MAE its 3000 steps
# at patch 4 (16 x 16 tokens), the DDPM's pretraining time again (18 min 26 s against the DDPM's 17 min 49 s here).
# Evaluate only: no robustness at 64 px. The MAE's fit seeds would each rerun its 18-minute pretraining: one fit seed.
ANALYSES["baselines_64px"] = Analysis(("evaluate",), with_fit_seeds((
    at_64px("bl-ddpm", "DDPM features"),
    at_64px("bl-rgb", "raw RGB pixels"),
    at_64px("bl-random-unet-dense", "random UNet, all layers drawn"),
)) + (at_64px("bl-mae", "MAE, the DDPM's pretraining time (3000 steps), one fit seed"),))
