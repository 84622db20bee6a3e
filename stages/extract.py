"""Stage extract: decoder features of every train/val/test image at each diffusion step of ``t_steps``, one zarr
store per step (or the features of features.representation: RGB, the MAE's patch tokens or SwAV's block
outputs, the same at every step).

``--stores features/t{t}.zarr`` is the pipeline's form: one stage owns the stores' folder (a persisted DVC
output). It keeps the stores already complete and current (``finished_store_is_current``: same record, images,
settings and extraction code) and computes only what is missing; it sets the stores of steps no longer in
``t_steps`` aside into the folder's dvc-ignored ``removed_steps/`` (taken back if the step returns). So fit and
evaluate depend on exactly the stores of ``t_steps`` and no stage writes into its inputs (docs/layout.md).
``--t 50 --out features/t50.zarr`` writes one step's store and touches nothing else."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.code_closure import closure_sha256
from pipeline.data.layout import Split, list_examples
from pipeline.diffusion.unet import check_model_builds
from pipeline.enums import Representation
from pipeline.errors import ConfigError, ModelFlagsError, check_timesteps
from pipeline.features.activations import feature_dim, representation_dim
from pipeline.features.compute import feature_checkpoint, load_feature_model
from pipeline.features.extraction import ExtractJob, extraction_runner, loaded_model, worker_device
from pipeline.features.locations import set_aside_stores_of_other_steps, take_back_set_aside_store
from pipeline.features.record import StoreRecord, extraction_provenance, inputs_sha256, params_record
from pipeline.features.store import create_or_resume, finished_store_is_current
from pipeline.hashing import file_sha256
from pipeline.runtime import stage_main, stage_params, stage_parser
from pipeline.selfsup.encoders import (
    add_encoder_arguments,
    encoder_block_shapes,
    encoder_checkpoint,
    is_self_supervised,
)


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--stores", help="one store per step of t_steps: a path or fsspec URL with {t}, e.g. "
                                         "features/t{t}.zarr; stores of other steps in its folder are deleted")
    parser.add_argument("--t", type=int, help="one diffusion step only (with --out), instead of --stores")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--checkpoint", type=Path, required=True)
    add_encoder_arguments(parser)
    parser.add_argument("--out", help="with --t: the zarr store to write, a path or an fsspec URL (s3://bucket/t50.zarr)")
    args = parser.parse_args()
    if (args.stores is None) == (args.t is None) or (args.t is None) != (args.out is None):
        parser.error("give either --stores PATTERN (every step of t_steps) or --t T with --out STORE")
    if args.stores is not None and "{t}" not in args.stores:
        parser.error(f"--stores {args.stores!r} has no {{t}}: write e.g. features/t{{t}}.zarr")
    params = stage_params(args.params)
    steps = [args.t] if args.t is not None else list(params.t_steps)
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    options = params.features
    encoder = is_self_supervised(options.representation)
    encoder_path = encoder_checkpoint(options.representation, args.mae, args.swav)
    source = feature_checkpoint(options, args.checkpoint, encoder_path)  # the weights the features come from
    # Validate the checkpoint, steps and blocks up front. In process, this load is the one extraction reuses.
    if options.workers or options.scheduler:
        model, diffusion = load_feature_model(options, args.checkpoint, encoder_path, torch.device("cpu"))
    else:
        model, diffusion = loaded_model(str(args.checkpoint), str(worker_device(params.runtime.device)), encoder_path,
                                        options.representation.value)
    if diffusion is not None:
        check_timesteps(steps, diffusion.num_timesteps)
    examples = {split.value: list_examples(args.data, split, allow_empty=split is Split.VAL) for split in Split}
    blocks = options.store_blocks
    if not encoder:
        shapes = model.decoder_block_shapes()
        try:
            feature_dim(model, blocks)
        except ModelFlagsError as error:  # its message names `blocks`: say which key holds them here
            raise ConfigError(f"features.store_blocks {list(blocks)} (null = ddpm.preset's blocks): {error}") from None
    if model.config.image_size != params.dataset.image_size:
        raise ConfigError(f"{source} is a model for {model.config.image_size} px images but "
                          f"dataset.image_size={params.dataset.image_size}; make them equal")
    # each stored block's (channels, map side); none for the RGB baselines, whose columns are no decoder blocks
    if encoder:  # the MAE's blocks: hidden_size columns from image_size / patch_size tokens a side; SwAV's: its maps
        stored = encoder_block_shapes(options.representation, model, blocks)
    else:
        stored = [shapes[b][:2] for b in blocks] if options.representation is Representation.DDPM else []
    # an encoder's columns are its stored blocks' channels (shapes known already: SwAV's come from a forward pass)
    dim = (sum(channels for channels, _ in stored) if encoder
           else representation_dim(model, blocks, options.representation, options.patch_size))
    del model
    checkpoint_sha256 = file_sha256(source)
    code_sha256 = closure_sha256("stages.extract")
    inputs = inputs_sha256({s: [(e.stem, e.image_path, e.mask_path) for e in ex] for s, ex in examples.items()})
    where = (f"dask scheduler {options.scheduler}" if options.scheduler
             else f"{options.workers} dask workers" if options.workers else "in process")
    if args.stores is not None:
        for moved in set_aside_stores_of_other_steps(args.stores, steps):
            print(f"{moved}: not a step of t_steps {steps}: " + ("set aside" if moved.exists() else "deleted"))
    with extraction_runner(options.workers, options.scheduler, options.tls_files()) as run:
        for t in steps:
            out = args.out if args.t is not None else args.stores.format(t=t)
            record = StoreRecord(**params_record(params, t), checkpoint_sha256=checkpoint_sha256, feature_dim=dim,
                                 block_channels=tuple(channels for channels, _ in stored),
                                 block_sizes=tuple(side for _, side in stored), inputs_sha256=inputs)
            ids = {s: [e.stem for e in ex] for s, ex in examples.items()}
            provenance = extraction_provenance(params, record, code_sha256)
            if args.stores is not None and take_back_set_aside_store(args.stores, t):
                print(f"t={t}: {out} taken back from where it was set aside")
            if args.stores is not None and finished_store_is_current(out, record, ids, provenance):
                print(f"t={t}: {out} is complete and current (same record, images, settings and code): kept")
                continue
            writer = create_or_resume(out, record, ids, chunk_pixels=options.chunk_pixels, codec=options.codec.value,
                                      clevel=options.clevel, provenance=provenance)
            job = ExtractJob(
                checkpoint=str(args.checkpoint), store=str(out), t=t, blocks=tuple(blocks), features=options,
                device=params.runtime.device, encoder_checkpoint=encoder_path,
                image_paths={s: tuple(str(e.image_path) for e in ex) for s, ex in examples.items()},
                mask_paths={s: tuple(str(e.mask_path) for e in ex) for s, ex in examples.items()},
            )
            pending = {split: writer.pending(split) for split in examples}
            todo = sum(map(len, pending.values()))
            start = time.perf_counter()
            with tqdm(total=todo, desc=f"extract t={t} ({where})", unit="img", mininterval=5) as bar:
                run(job, pending, bar.update)
            writer.finish()
            print(f"t={t}: {record.feature_dim} features/pixel, {todo} of {sum(len(e) for e in examples.values())} "
                  f"images computed in {time.perf_counter() - start:.1f}s ({where}) -> {out}")


if __name__ == "__main__":
    main()
