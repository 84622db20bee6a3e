"""Stage kmeans: k-means clusters (kmeans.k) of the per-pixel features of the first kmeans.images test images,
one map per step in kmeans.t_steps and decoder block in kmeans.blocks, saved beside each image (plots/kmeans/
<stem>.png: the image, then a map per (t, block)) as the paper's figure of k = 5 clusters."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from pipeline.data.dataset import Split, list_examples, read_rgb, to_model_input
from pipeline.features.extraction import batch_noise, loaded_model, worker_device
from pipeline.features.activations import feature_maps
from pipeline.analysis.kmeans import kmeans
from pipeline.runtime import building_dir, stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its first test images)")
    parser.add_argument("--out", type=Path, required=True, help="folder of cluster-map figures, one per image")
    args = parser.parse_args()
    params = stage_params(args.params)
    config, options = params.kmeans, params.features
    model, diffusion = loaded_model(str(args.checkpoint), str(worker_device(params.runtime.device)))
    examples = list_examples(args.data, Split.TEST)[: config.images]
    images = np.stack([read_rgb(example.image_path) for example in examples])
    x0 = to_model_input(images).to(next(model.parameters()).device)
    size, indices = images.shape[1], list(range(len(images)))
    views = [(t, block) for t in config.t_steps for block in config.blocks]
    maps = {}
    for t in config.t_steps:  # the features extract makes at t (same noise), one block at a time
        noise = batch_noise(options.noise_seed, options.noise_draws, options.stochastic_noise, "test", indices, t, size)
        for block in config.blocks:
            features = feature_maps(model, diffusion, x0, t_steps=[t], blocks=[block], noise=noise.to(x0.device),
                                    upsample=options.upsample).cpu()
            maps[t, block] = [kmeans(f.flatten(1).T, config.k, config.iterations, config.seed).reshape(size, size)
                              for f in features]
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
