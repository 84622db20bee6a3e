"""Stage label (DatasetDDPM): the sampled images segmented by the ensemble (the segment stage's path), each
scored by its uncertainty (mean top-decile Jensen-Shannon disagreement of the members), the most uncertain
dropped (datasetddpm.drop_uncertain; datasetddpm.drop_least_uncertain: the official code's shifted window).
Writes the kept images in the paper's layout (<stem>.png + <stem>.npy class mask), metrics/label.json, a CSV
of every image's uncertainty and a figure of kept and dropped samples."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.api import Segmenter
from pipeline.atomic import building_dir, write_json_atomic
from pipeline.data.layout import write_example
from pipeline.data.samples import open_samples
from pipeline.datasetddpm.label import kept_by_uncertainty, label_images, sample_stem, summary, uncertainty_ranks
from pipeline.diffusion.unet import check_model_builds
from pipeline.errors import ConfigError
from pipeline.hashing import file_sha256
from pipeline.outputs.figures import palette, samples_figure, save_figure, write_csv_atomic
from pipeline.runtime import stage_main, stage_params, stage_parser
from pipeline.selfsup.encoders import add_encoder_arguments

SCRATCH = ".uncertainty"  # per-image disagreement maps while labeling (for the figure), removed at the end


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--samples", type=Path, required=True, help="the sample stage's zarr store")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--ensemble", type=Path, required=True)
    add_encoder_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for the kept images and masks")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON: counts kept and dropped, uncertainty quantiles")
    parser.add_argument("--table", type=Path, required=True, help="CSV: every image's uncertainty, rank and fate")
    parser.add_argument("--figure", type=Path, required=True, help="PNG: kept and dropped samples side by side")
    args = parser.parse_args()
    params = stage_params(args.params, one_thread=True)  # the ensemble's arithmetic, as in segment
    check_model_builds(params.unet_config())
    images, record = open_samples(args.samples)
    if record["checkpoint_sha256"] != file_sha256(args.checkpoint):
        raise ConfigError(f"{args.samples} was sampled from another checkpoint than {args.checkpoint}; rerun the "
                          f"sample stage (`dvc repro sample`)")
    segmenter = Segmenter.load(params, args.checkpoint, args.ensemble, args.mae, args.swav)
    options, dataset = params.datasetddpm, params.dataset
    scores = []
    with building_dir(args.out) as folder:
        (folder / SCRATCH).mkdir()
        for image, result, score in tqdm(label_images(segmenter, (images[i] for i in range(images.shape[0]))),
                                         total=images.shape[0], desc="label", unit="img", mininterval=5):
            write_example(folder, result.name, image, result.mask)
            np.save(folder / SCRATCH / f"{result.name}.npy", result.uncertainty)
            scores.append(score)
        keep = kept_by_uncertainty(scores, options.drop_uncertain, options.drop_least_uncertain)
        rank = uncertainty_ranks(scores)

        def entry(index: int) -> tuple:
            stem = sample_stem(index)
            return (stem, scores[index], images[index], np.load(folder / f"{stem}.npy"),
                    np.load(folder / SCRATCH / f"{stem}.npy"))

        kept_shown = [entry(i) for i in np.flatnonzero(keep)[: options.grid_images]]
        most_uncertain_first = [int(i) for i in np.argsort(-rank) if not keep[i]]
        dropped_shown = [entry(i) for i in most_uncertain_first[: options.grid_images]]
        save_figure(samples_figure(kept_shown, dropped_shown, palette(dataset.num_classes, dataset.ignore_label),
                                   dataset.names(), dataset.ignore_label,
                                   title=f"DatasetDDPM: {int(keep.sum())} of {len(scores)} samples kept "
                                         f"(uncertainty = mean top-decile JS disagreement, nats)"), args.figure)
        for index in np.flatnonzero(~keep):
            for suffix in (".png", ".npy"):
                (folder / f"{sample_stem(index)}{suffix}").unlink()
        shutil.rmtree(folder / SCRATCH)
    write_csv_atomic(pd.DataFrame({"image": [sample_stem(i) for i in range(len(scores))],
                                   "uncertainty": np.round(scores, 6), "rank": rank, "kept": keep}), args.table)
    metrics = summary(scores, keep, options.drop_least_uncertain)
    write_json_atomic(metrics, args.metrics)
    print(f"label: {metrics['kept']} of {metrics['images']} samples kept -> {args.out} "
          f"({metrics['dropped_most_uncertain']} most and {metrics['dropped_least_uncertain']} least uncertain dropped)")


if __name__ == "__main__":
    main()
