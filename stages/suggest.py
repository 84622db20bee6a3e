"""Stage suggest: the unlabeled images worth labeling next. The finished ensemble votes on suggest.pool_images
images of the prepared unlabeled pool (features on the fly, as segment makes them); each is scored by its
members' disagreement (suggest.score), and the suggest.count best (spread by k-center with
suggest.diversity) are written: suggestions.csv, images/, label_studio_tasks.json (with the predictions as
polygon pre-annotations) and label_studio_config.xml, plus a figure of them with their uncertainty maps."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.analysis.suggest import choose, pool_sample, score_pool
from pipeline.atomic import building_dir
from pipeline.data.layout import list_images
from pipeline.diffusion.unet import check_model_builds
from pipeline.ensemble.files import load_ensemble
from pipeline.errors import DatasetError
from pipeline.features.compute import feature_checkpoint, load_feature_model
from pipeline.features.record import fit_record
from pipeline.hashing import file_sha256
from pipeline.outputs.figures import palette
from pipeline.outputs.suggestions import write_figure, write_suggestions
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser
from pipeline.selfsup.encoders import add_encoder_arguments, encoder_checkpoint


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--ensemble", type=Path, required=True)
    add_encoder_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its unlabeled/ folder is the pool)")
    parser.add_argument("--out", type=Path, required=True, help="folder: suggestions.csv, images/, Label Studio tasks")
    parser.add_argument("--plot", type=Path, required=True, help="PNG: the suggested images and their uncertainty")
    parser.add_argument("--image-url", default="/data/local-files/?d=suggestions/images/{name}",
                        help="the tasks' image URL, {name} = the file's name (default: Label Studio's local-files "
                             "serving with the repository as its document root)")
    args = parser.parse_args()
    if "{name}" not in args.image_url:
        parser.error(f"--image-url {args.image_url!r} has no {{name}}; give e.g. https://host/images/{{name}}")
    params = stage_params(args.params, one_thread=True)  # the ensemble's arithmetic, as in fit and evaluate
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    config, dataset = params.suggest, params.dataset
    device = pick_device(params.runtime.device)
    encoder = encoder_checkpoint(params.features.representation, args.mae, args.swav)
    model, diffusion = load_feature_model(params.features, args.checkpoint, encoder, device)
    source = feature_checkpoint(params.features, args.checkpoint, encoder)  # the weights the features come from
    ensemble = load_ensemble(args.ensemble, fit_record(params, file_sha256(source))).to(device)
    if not args.data.is_dir():
        raise DatasetError(f"prepared dataset {args.data} does not exist; run the prepare stage (`dvc repro prepare`)")
    folder = args.data / "unlabeled"
    pool = list_images(folder) if folder.is_dir() else []
    if not pool:  # a dataset with an imported checkpoint may have no unlabeled images: empty outputs, not a failed repro
        print(f"suggest: {folder} holds no images, so there is nothing to suggest; put unlabeled images in the "
              f"dataset's unlabeled/ folder and rerun prepare", file=sys.stderr)
    paths = pool_sample(pool, config.pool_images, config.seed) if pool else []
    keep = config.candidates if config.diversity else config.count
    candidates, scored = score_pool(model, diffusion, ensemble, params, paths, keep,
                                    pooled=config.diversity)
    suggestions = choose(candidates, config.count, config.diversity)
    with building_dir(args.out) as building:
        write_suggestions(building, suggestions, dataset.names(), dataset.ignore_label, args.image_url,
                          model_version=f"ensemble sha256 {file_sha256(args.ensemble)[:12]}")
    write_figure(args.plot, suggestions, palette(dataset.num_classes, dataset.ignore_label), dataset.names(),
                 config.score.value)
    print(f"suggest: {len(suggestions)} of {scored} unlabeled images (score {config.score.value}"
          f"{', k-center among the top ' + str(len(candidates)) if config.diversity else ''}) -> {args.out}")


if __name__ == "__main__":
    main()
