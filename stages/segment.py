"""Stage segment: the finished run applied to a folder of new images -> per image a class-index mask
(<stem>.png), a figure of the image, the prediction over it and the uncertainty with the class legend
(<stem>.overlay.png), the members' Jensen-Shannon disagreement (<stem>.uncertainty.npy, and
<stem>.uncertainty.png to look at), plus summary.csv. A bad image is
reported at the end (exit code 2) and costs only its own outputs. ``--model segnet`` segments with
DatasetDDPM's distilled network (``--segnet``, train_segnet's file) in one forward pass instead of the DDPM
and the ensemble; its uncertainty is the entropy of the network's softmax."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
from tqdm import tqdm

from pipeline.api import PreparedImage, Segmenter, prepare_image
from pipeline.data.layout import list_images
from pipeline.diffusion.unet import check_model_builds
from pipeline.errors import DatasetError, PipelineError
from pipeline.outputs.figures import palette, write_csv_atomic
from pipeline.outputs.segment import summary_row, write_outputs
from pipeline.runtime import stage_main, stage_params, stage_parser
from pipeline.selfsup.encoders import add_encoder_arguments


def readable(paths: list[Path], segmenter: Segmenter, bad: dict[Path, str]) -> Iterator[PreparedImage]:
    """The images that prepare's rule accepts; the error of every other one goes into ``bad``."""
    dataset = segmenter.params.dataset
    for path in paths:
        try:
            yield prepare_image(path, dataset.image_size, dataset.non_square)
        except PipelineError as error:
            bad[path] = str(error)


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ddpm.pt"))
    parser.add_argument("--ensemble", type=Path, default=Path("ensemble/ensemble.pt"))
    parser.add_argument("--model", choices=("ensemble", "segnet"), default="ensemble",
                        help="ensemble: the DDPM's features and the MLP ensemble (--checkpoint, --ensemble); segnet: "
                             "DatasetDDPM's distilled network (--segnet), one forward pass")
    parser.add_argument("--segnet", type=Path, default=Path("segnet/segnet.pt"), help="train_segnet's network file")
    add_encoder_arguments(parser, Path("checkpoints"))
    parser.add_argument("--images", type=Path, required=True, help="folder of .png/.jpg images to segment")
    parser.add_argument("--out", type=Path, required=True, help="folder for the masks, overlays, maps and summary.csv")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise DatasetError(f"--images {args.images} is not a folder; give a folder of .png/.jpg images")
    if args.model == "segnet":
        segmenter = Segmenter.load_segnet(stage_params(args.params), args.segnet)
    else:
        params = stage_params(args.params, one_thread=True)  # the ensemble's arithmetic, as in fit and evaluate
        check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
        segmenter = Segmenter.load(params, args.checkpoint, args.ensemble, args.mae, args.swav)
    paths = list_images(args.images)
    stems = [path.stem for path in paths]
    if len(set(stems)) != len(stems):
        twice = sorted({stem for stem in stems if stems.count(stem) > 1})
        raise DatasetError(f"{args.images} holds several images named {twice} (other suffixes); outputs are named "
                           f"by stem, so rename them")
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = segmenter.params.dataset
    colours, names = palette(dataset.num_classes, dataset.ignore_label), dataset.names()
    bad: dict[Path, str] = {}
    rows = []
    by_stem = {path.stem: path for path in paths}
    for result in tqdm(segmenter.segment_prepared(readable(paths, segmenter, bad)), total=len(paths),
                       desc="segment", unit="img", mininterval=5):
        write_outputs(args.out, result, by_stem[result.name], colours, names, dataset.ignore_label)
        rows.append(summary_row(result, names))
    write_csv_atomic(pd.DataFrame(rows, columns=["image", "width", "height", "mean_uncertainty",
                                                 *[f"pixels_{name}" for name in names]]), args.out / "summary.csv")
    print(f"segment: {len(rows)} of {len(paths)} images -> {args.out}")
    if bad:
        for path, message in bad.items():
            print(f"error: {message}", file=sys.stderr)
        print(f"error: {len(bad)} of {len(paths)} images could not be segmented (listed above); the others' "
              f"outputs are written. Fix or remove them and rerun", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
