"""Stage kmeans: k-means clusters (kmeans.k) of the per-pixel features of the first kmeans.images test images,
one map per step in kmeans.t_steps and decoder block in kmeans.blocks, saved beside each image (plots/kmeans/
<stem>.png: the image, then a map per (t, block)) as the paper's figure of k = 5 clusters."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from pipeline.analysis.kmeans import kmeans
from pipeline.atomic import building_dir
from pipeline.data.images import read_rgb
from pipeline.data.layout import Split, list_examples
from pipeline.diffusion.unet import check_model_builds
from pipeline.enums import Representation
from pipeline.features.compute import features_for_images
from pipeline.features.extraction import loaded_model, worker_device
from pipeline.runtime import stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its first test images)")
    parser.add_argument("--out", type=Path, required=True, help="folder of cluster-map figures, one per image")
    args = parser.parse_args()
    params = stage_params(args.params)
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    # the DDPM's decoder blocks (kmeans.blocks, kmeans.t_steps) whatever features.representation the run learns from
    # (the paper's figure is of DDPM features; this stage does not depend on features.representation)
    config = params.kmeans
    options = params.features.model_copy(update={"representation": Representation.DDPM})
    model, diffusion = loaded_model(str(args.checkpoint), str(worker_device(params.runtime.device)))
    examples = list_examples(args.data, Split.TEST)[: config.images]
    images = np.stack([read_rgb(example.image_path) for example in examples])
    size = images.shape[1]
    views = [(t, block) for t in config.t_steps for block in config.blocks]
    maps = {}
    for t, block in views:  # the features extract makes at t (the one feature path, the test split's noise)
        rows = features_for_images(model, diffusion, list(images), options=options, t_steps=[t], blocks=[block],
                                   split="test")
        maps[t, block] = [kmeans(values.float(), config.k, config.iterations, config.seed).reshape(size, size)
                          for _, values in rows]
    with building_dir(args.out) as temporary:
        for index, example in enumerate(examples):
            figure, axes = plt.subplots(1, 1 + len(views), figsize=(1.6 * (1 + len(views)), 1.9))
            axes[0].imshow(images[index])
            axes[0].set_title(example.stem, fontsize=7)
            for axis, (t, block) in zip(axes[1:], views):
                axis.imshow(maps[t, block][index].numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
                axis.set_title(f"t={t} block {block}", fontsize=7)
            for axis in axes:
                axis.axis("off")
            figure.suptitle(f"k-means, k={config.k}", fontsize=8)
            figure.savefig(temporary / f"{example.stem}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
    print(f"kmeans: k={config.k} maps of {len(examples)} test images at {len(views)} (t, block) views -> {args.out}")


if __name__ == "__main__":
    main()
