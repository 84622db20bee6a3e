"""Stage sample (DatasetDDPM): sample.images images drawn from the DDPM checkpoint with guided-diffusion's
sampler (ancestral, or DDIM with sample.eta) over sample.steps respaced steps, into a zarr store of uint8
images. Written batch by batch to <out>.partial; a killed run resumes where it stopped."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.data.samples import create_or_resume
from pipeline.diffusion.sample import Sampler, draw, image_generator, to_uint8
from pipeline.diffusion.train import load_checkpoint
from pipeline.diffusion.unet import check_model_builds, for_inference
from pipeline.errors import ConfigError
from pipeline.hashing import file_sha256
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="zarr store of the sampled images")
    args = parser.parse_args()
    params = stage_params(args.params)
    check_model_builds(params.unet_config())
    options = params.sample
    model, diffusion, _ = load_checkpoint(args.checkpoint)
    device = pick_device(params.runtime.device)
    model = for_inference(model, device)
    try:
        sampler = Sampler(diffusion, options.steps, options.fixed_sigma.value)
    except ConfigError as error:  # the checkpoint's own schedule may have fewer steps than ddpm.diffusion_steps
        raise ConfigError(f"sample.steps={options.steps!r} for {args.checkpoint} ({diffusion.num_timesteps} steps): "
                          f"{error}") from None
    size = model.config.image_size
    record = {"checkpoint_sha256": file_sha256(args.checkpoint), "steps": options.steps, "eta": options.eta,
              "fixed_sigma": options.fixed_sigma.value, "seed": options.seed, "images": options.images,
              "image_size": size, "clip_denoised": True}
    writer = create_or_resume(args.out, record, options.images, size)
    pending = writer.pending()
    with tqdm(total=options.images, initial=options.images - len(pending), desc="sample", unit="img", mininterval=5) as bar:
        for first in range(0, len(pending), options.batch_size):
            indices = pending[first : first + options.batch_size]
            generators = [image_generator(options.seed, index) for index in indices]  # x_T, then each step's noise
            x_T = draw(generators, (3, size, size)).to(device)
            writer.write(indices, to_uint8(sampler.sample(model, x_T, generators, eta=options.eta)))
            bar.update(len(indices))
    writer.finish()
    method = "ancestral" if options.eta is None else f"DDIM eta={options.eta}"
    print(f"sample: {options.images} images, {sampler.num_steps} steps ({method}) -> {args.out}")


if __name__ == "__main__":
    main()
