"""Stage extract@t: decoder features of every train/test image at one diffusion step, into a zarr store."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Autocast, load_params
from pipeline.data import Split, list_examples, to_model_input
from pipeline.features import feature_dim, iter_pixel_features, make_noise
from pipeline.store import StoreRecord, background_writes, create_or_resume, file_sha256
from pipeline.runtime import pick_device, stage_main
from pipeline.train_ddpm import load_checkpoint
from PIL import Image

AUTOCAST_DTYPES = {Autocast.NONE: None, Autocast.BFLOAT16: torch.bfloat16, Autocast.FLOAT16: torch.float16}


def noise_for(seed: int, split: str, index: int, t: int, image_size: int) -> torch.Tensor:
    """Per-image noise of the stochastic variant, reproducible from (seed, split, image, t)."""
    state = np.random.SeedSequence([seed, 0 if split == "train" else 1, index, t]).generate_state(1)[0]
    return make_noise(int(state), image_size)


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--t", type=int, required=True, help="diffusion step")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="zarr store to write")
    args = parser.parse_args()
    params = load_params(args.params)
    options = params.features
    model, diffusion, _ = load_checkpoint(args.checkpoint)
    diffusion.check_timesteps([args.t])
    device = pick_device(options.device)
    model.to(device)
    size = model.config.image_size
    record = StoreRecord(t=args.t, blocks=tuple(params.blocks), upsample=options.upsample.value,
                         noise_seed=options.noise_seed, stochastic_noise=options.stochastic_noise,
                         checkpoint_sha256=file_sha256(args.checkpoint), image_size=size,
                         feature_dim=feature_dim(model, params.blocks))
    examples = {split.value: list_examples(args.data, split) for split in Split}
    writer = create_or_resume(args.out, record, {s: [e.stem for e in ex] for s, ex in examples.items()},
                              chunk_pixels=options.chunk_pixels, codec=options.codec, clevel=options.clevel)
    shared_noise = make_noise(options.noise_seed, size)
    start = time.perf_counter()
    for split, split_examples in examples.items():
        pending = writer.pending(split)

        def batches():
            for first in range(0, len(pending), options.batch_size):
                indices = pending[first : first + options.batch_size]
                images = np.stack([np.asarray(Image.open(split_examples[i].image_path).convert("RGB")) for i in indices])
                if options.stochastic_noise:
                    noise = torch.cat([noise_for(options.noise_seed, split, i, args.t, size) for i in indices])
                else:
                    noise = shared_noise
                x0 = to_model_input(images)
                if device.type == "cuda":  # page-locked host memory lets the copy overlap the previous batch
                    x0 = x0.pin_memory()
                yield indices, x0.to(device, non_blocking=True), noise.to(device)

        features = iter_pixel_features(model, diffusion, batches(), t_steps=[args.t], blocks=params.blocks,
                                       upsample=options.upsample, autocast_dtype=AUTOCAST_DTYPES[options.autocast])
        with background_writes(writer) as submit:
            for index, rows in tqdm(features, total=len(pending), desc=f"extract t={args.t} {split}", unit="img",
                                    mininterval=5):
                submit(split, index, rows.numpy(), np.load(split_examples[index].mask_path).reshape(-1))
    writer.finish()
    print(f"t={args.t}: {record.feature_dim} features/pixel, "
          f"{sum(len(e) for e in examples.values())} images in {time.perf_counter() - start:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
