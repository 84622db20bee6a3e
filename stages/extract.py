"""Stage extract@t: decoder features of every train/test image at one diffusion step, into a zarr store (or the
features of features.representation: RGB, or the MAE's patch tokens, the same at every step)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.data.layout import Split, list_examples
from pipeline.diffusion.unet import check_model_builds
from pipeline.enums import Representation
from pipeline.errors import ConfigError, ModelFlagsError, check_timesteps
from pipeline.features.activations import feature_dim, representation_dim
from pipeline.features.compute import feature_checkpoint, load_feature_model
from pipeline.features.extraction import ExtractJob, extraction_runner, loaded_model, worker_device
from pipeline.features.record import StoreRecord, inputs_sha256, params_record
from pipeline.features.store import create_or_resume
from pipeline.hashing import file_sha256
from pipeline.runtime import stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--t", type=int, required=True, help="diffusion step")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--mae", type=Path, default=None, help="pretrain_mae's checkpoint (representation mae)")
    parser.add_argument("--out", required=True, help="zarr store to write: a path, or an fsspec URL (s3://bucket/t50.zarr)")
    args = parser.parse_args()
    params = stage_params(args.params)
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    options = params.features
    mae = options.representation is Representation.MAE
    mae_checkpoint = str(args.mae) if mae and args.mae is not None else None
    source = feature_checkpoint(options, args.checkpoint, mae_checkpoint)  # the weights the features come from
    # Validate the checkpoint, t and blocks up front. In process, this load is the one extraction reuses.
    if options.workers or options.scheduler:
        model, diffusion = load_feature_model(options, args.checkpoint, mae_checkpoint, torch.device("cpu"))
    else:
        model, diffusion = loaded_model(str(args.checkpoint), str(worker_device(params.runtime.device)), mae_checkpoint)
    if diffusion is not None:
        check_timesteps([args.t], diffusion.num_timesteps)
    examples = {split.value: list_examples(args.data, split, allow_empty=split is Split.VAL) for split in Split}
    blocks = options.store_blocks
    if not mae:
        shapes = model.decoder_block_shapes()
        try:
            feature_dim(model, blocks)
        except ModelFlagsError as error:  # its message names `blocks`: say which key holds them here
            raise ConfigError(f"features.store_blocks {list(blocks)} (null = ddpm.preset's blocks): {error}") from None
    if model.config.image_size != params.dataset.image_size:
        raise ConfigError(f"{source} is a model for {model.config.image_size} px images but "
                          f"dataset.image_size={params.dataset.image_size}; make them equal")
    # each stored block's (channels, map side); none for the RGB baselines, whose columns are no decoder blocks
    if mae:  # each encoder block: hidden_size columns, from a map of image_size / patch_size tokens a side
        stored = [(model.config.hidden_size, model.config.image_size // model.config.patch_size)] * len(blocks)
    else:
        stored = [shapes[b][:2] for b in blocks] if options.representation is Representation.DDPM else []
    record = StoreRecord(**params_record(params, args.t), checkpoint_sha256=file_sha256(source),
                         feature_dim=representation_dim(model, blocks, options.representation, options.patch_size),
                         block_channels=tuple(channels for channels, _ in stored),
                         block_sizes=tuple(side for _, side in stored),
                         inputs_sha256=inputs_sha256({s: [(e.stem, e.image_path, e.mask_path) for e in ex]
                                                      for s, ex in examples.items()}))
    del model
    where = (f"dask scheduler {options.scheduler}" if options.scheduler
             else f"{options.workers} dask workers" if options.workers else "in process")
    with extraction_runner(options.workers, options.scheduler, options.tls_files()) as run:
        writer = create_or_resume(args.out, record, {s: [e.stem for e in ex] for s, ex in examples.items()},
                                  chunk_pixels=options.chunk_pixels, codec=options.codec.value, clevel=options.clevel)
        job = ExtractJob(
            checkpoint=str(args.checkpoint), store=str(args.out), t=args.t, blocks=tuple(blocks), features=options,
            device=params.runtime.device, mae_checkpoint=mae_checkpoint,
            image_paths={s: tuple(str(e.image_path) for e in ex) for s, ex in examples.items()},
            mask_paths={s: tuple(str(e.mask_path) for e in ex) for s, ex in examples.items()},
        )
        pending = {split: writer.pending(split) for split in examples}
        start = time.perf_counter()
        with tqdm(total=sum(map(len, pending.values())), desc=f"extract t={args.t} ({where})", unit="img",
                  mininterval=5) as bar:
            run(job, pending, bar.update)
    writer.finish()
    print(f"t={args.t}: {record.feature_dim} features/pixel, "
          f"{sum(len(e) for e in examples.values())} images in {time.perf_counter() - start:.1f}s ({where}) -> {args.out}")


if __name__ == "__main__":
    main()
