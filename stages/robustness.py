"""Stage robustness: the test split under corruptions (robustness.corruptions x robustness.severities), its
features made on the fly as extract makes them (features.representation included, so an RGB-baseline run
gives the baseline's numbers), voted on by the fitted ensemble and scored as evaluate scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.analysis.corruptions import constants_for, corrupt
from pipeline.analysis.robustness import vote_on_images
from pipeline.atomic import write_json_atomic
from pipeline.data.images import read_rgb
from pipeline.data.layout import Split, list_examples
from pipeline.diffusion.unet import check_model_builds
from pipeline.ensemble.evaluation import score
from pipeline.ensemble.files import load_ensemble
from pipeline.features.compute import feature_checkpoint
from pipeline.features.extraction import loaded_model, worker_device
from pipeline.features.record import fit_record
from pipeline.hashing import file_sha256
from pipeline.outputs.figures import corruption_figure, save_figure, write_csv_atomic
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser
from pipeline.selfsup.encoders import add_encoder_arguments, encoder_checkpoint


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    add_encoder_arguments(parser)
    parser.add_argument("--ensemble", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its test split is corrupted)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON: test mIoU per corruption and severity")
    parser.add_argument("--table", type=Path, required=True, help="CSV: severity and a test-mIoU column per corruption")
    parser.add_argument("--examples", type=Path, required=True, help="PNG: the first test image under each corruption")
    args = parser.parse_args()
    params = stage_params(args.params, one_thread=True)  # the ensemble's arithmetic, as in fit and evaluate
    check_model_builds(params.unet_config())  # the flags build a UNet (on the meta device)
    representation = params.features.representation
    encoder = encoder_checkpoint(representation, args.mae, args.swav)
    source = feature_checkpoint(params.features, args.checkpoint, encoder)  # the weights the features come from
    model, diffusion = loaded_model(str(args.checkpoint), str(worker_device(params.runtime.device)), encoder,
                                    representation.value)
    ensemble = load_ensemble(args.ensemble, fit_record(params, file_sha256(source)))
    ensemble.to(pick_device(params.runtime.device))
    examples = list_examples(args.data, Split.TEST)
    clean = [read_rgb(example.image_path) for example in examples]
    masks = np.stack([np.load(example.mask_path) for example in examples])
    config = params.robustness
    levels = [("none", 0)] + [(c.value, s) for c in config.corruptions for s in config.severities]
    rows, shown = [], []
    for corruption, severity in levels:
        rng = np.random.default_rng([config.seed, severity])
        images = clean if severity == 0 else [corrupt(image, corruption, severity, rng, config.constants)
                                              for image in clean]
        shown.append(images[0])
        prediction = vote_on_images(model, diffusion, ensemble, params, np.stack(images))
        metrics = score(masks.reshape(-1), prediction, params.dataset.names(), params.dataset.ignore_label)
        rows.append({"corruption": corruption, "severity": severity, "miou": metrics["miou"]})
        print(f"robustness: {corruption} severity {severity}: test mIoU {metrics['miou']:.4f}", flush=True)
    constants = constants_for(params.dataset.image_size, config.constants)
    results = {"clean": rows[0]["miou"], "representation": params.features.representation_id(),
               "constants": {"cifar10c": "CIFAR-10-C", "imagenetc": "ImageNet-C"}[constants.value]}
    for row in rows[1:]:
        results.setdefault(row["corruption"], {})[str(row["severity"])] = row["miou"]
    write_json_atomic(results, args.metrics)
    # one column per corruption and a row per severity (0 = clean in every column): dvc.yaml's plot draws a line each
    table = pd.DataFrame(rows).pivot(index="severity", columns="corruption", values="miou")
    table = table.drop(columns="none").fillna(results["clean"]).reset_index()
    write_csv_atomic(table[["severity", *[c.value for c in config.corruptions]]], args.table)
    save_figure(corruption_figure(shown, levels), args.examples)  # clean, then each corruption's severities in order
    print(f"robustness: {len(levels)} levels on {len(examples)} test images -> {args.metrics}; "
          f"{json.dumps({k: v for k, v in results.items() if k == 'clean'})}")


if __name__ == "__main__":
    main()
