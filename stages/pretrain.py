"""Stage pretrain: train the DDPM on the unlabeled images, or import a guided-diffusion checkpoint.

On several processes: ``torchrun --nproc_per_node N -m stages.pretrain ...`` (docs/scaling.md). The ranks split
each global batch of ddpm.train.batch_size; rank 0 writes the checkpoint, the resumable state and the curves."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.code_closure import run_fingerprint
from pipeline.config import SCRATCH  # the default ddpm.checkpoint: a placeholder file meaning "train, import nothing"
from pipeline.data.layout import load_unlabeled
from pipeline.diffusion import distributed
from pipeline.diffusion.diffusers_unet import import_diffusers_folder
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import save_checkpoint, train_ddpm
from pipeline.diffusion.unet import check_model_builds, create_unet, load_guided_diffusion
from pipeline.enums import UNetInit
from pipeline.hashing import file_sha256
from pipeline.outputs.live import log_step, loss_curve, open_curves, write_curves
from pipeline.runtime import stage_main, stage_params, stage_parser

LOSS_TERMS = ("loss", "mse", "vb")  # the curves: vb is 0 for a model without learned sigma


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its unlabeled/ folder)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--curves", type=Path, required=True, help="dvclive folder for the loss curves")
    args = parser.parse_args()
    world = distributed.world_from_env()  # rank 0 of 1 unless torchrun started this process
    params = stage_params(args.params)
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    ddpm = params.ddpm
    diffusion = Diffusion(ddpm.noise_schedule, ddpm.diffusion_steps, ddpm.rescale_timesteps)
    if not world.main:
        live = None
        if ddpm.checkpoint not in (None, SCRATCH):
            return  # an import is one process's work: rank 0's
    else:
        live = open_curves(args.curves)
    if ddpm.checkpoint not in (None, SCRATCH):
        model, diffusion, source, message = import_checkpoint(params, diffusion)
        save_checkpoint(args.out, model, diffusion, source)
        live.make_summary()  # an imported checkpoint has no loss curve: metrics.json is {}
        print(f"{message} -> {args.out}")
        return
    flags = params.unet_config()
    images = load_unlabeled(args.data)
    # training knobs only: log_every and state_every change no weight
    fingerprint = run_fingerprint({"train": ddpm.train.model_dump(mode="json", exclude={"log_every", "state_every"}),
                                   "model": flags.to_dict(), "steps": ddpm.diffusion_steps,
                                   "schedule": ddpm.noise_schedule, "rescale": ddpm.rescale_timesteps},
                                  "stages.pretrain", images.paths)
    torch.manual_seed(ddpm.train.seed)  # module init (the UNet's random weights)
    model = create_unet(flags, init=ddpm.train.init.value)
    start = time.perf_counter()
    bar = tqdm(total=ddpm.train.steps, desc="pretrain", unit="step", mininterval=5, disable=not world.main)
    state_path = args.out.with_name(args.out.name + ".state")
    window: list[dict[str, float]] = []

    def on_step(step: int, losses: dict[str, float]) -> None:  # each log_every window's mean, as it closes
        if live is None:  # ranks other than 0 log nothing
            return
        bar.update(1)
        window.append(losses)
        if step % ddpm.train.log_every == 0 or step == ddpm.train.steps:
            log_step(live, step, loss_curve(window, len(window), LOSS_TERMS)[0][1])
            window.clear()

    device = distributed.start(world, params.runtime.device)
    try:
        ema, history = train_ddpm(model, diffusion, images, ddpm.train, device=device, on_step=on_step,
                                  state_path=state_path, fingerprint=fingerprint, world=world)
    except RuntimeError as error:
        if not (world.distributed and distributed.is_collective_failure(error)):
            raise
        raise distributed.RankLostError(
            f"pretrain rank {world.rank} of {world.size} stopped: a collective failed ({distributed.first_line(error)}). "
            f"Another rank died, hung past {distributed.TIMEOUT_ENV}={distributed.timeout_s():g} s or lost the network "
            f"(see its log); the last resumable state ({state_path}) is kept, so the same launch resumes from it"
        ) from error
    finally:
        distributed.stop(world)
    bar.close()
    if not world.main:
        return
    source = {"kind": "trained", "steps": ddpm.train.steps, "unlabeled_images": len(images), "ema_rate": ddpm.train.ema_rate}
    if ddpm.train.init is not UNetInit.GUIDED:  # recorded when not the default, so a default checkpoint keeps its bytes
        source["init"] = ddpm.train.init.value
    if world.distributed:  # likewise: the rank count changes the weights' last bits (docs/determinism.md)
        source["ranks"] = world.size
    save_checkpoint(args.out, ema, diffusion, source)
    write_curves(args.curves, loss_curve(history, ddpm.train.log_every, LOSS_TERMS))
    state_path.unlink(missing_ok=True)
    print(f"trained {ddpm.train.steps} steps on {len(images)} images in {time.perf_counter() - start:.0f}s -> {args.out}")


def import_checkpoint(params, diffusion: Diffusion):
    """``ddpm.checkpoint`` loaded: a diffusers UNet2DModel folder or a guided-diffusion ``.pt`` file, with
    the diffusion it brings, its source record and a line for the log."""
    path = params.ddpm.checkpoint
    if Path(path).is_dir():
        model, diffusion, source = import_diffusers_folder(Path(path), diffusion, params.dataset.image_size)
        return model, diffusion, source, f"imported diffusers UNet2DModel {path} ({model.num_decoder_blocks} decoder blocks)"
    model = load_guided_diffusion(path, params.unet_config().to_dict())
    return model, diffusion, {"kind": "imported", "path": path, "sha256": file_sha256(path)}, f"imported {path}"


if __name__ == "__main__":
    main()
