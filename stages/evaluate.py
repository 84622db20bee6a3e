"""Stage evaluate: ensemble majority vote on the val and test pixels -> metrics JSON, tables, plots,
overlays (image | ground truth | prediction | uncertainty, with the class legend) and each test image's
predicted mask and uncertainty map."""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import building_dir, write_json_atomic
from pipeline.data.images import read_rgb
from pipeline.data.layout import Split, list_examples
from pipeline.ensemble.evaluation import check_finite_metrics, predict_split, score
from pipeline.ensemble.files import load_ensemble
from pipeline.ensemble.metrics import label_counts
from pipeline.features.record import fit_record
from pipeline.features.store import open_step_stores
from pipeline.outputs.figures import (
    confusion_rows,
    overlay_figure,
    palette,
    per_class_table,
    save_figure,
    write_csv_atomic,
    write_prediction,
)
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--stores", required=True, help="store path or fsspec URL with {t}, e.g. features/t{t}.zarr")
    parser.add_argument("--ensemble", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (test images for overlays)")
    parser.add_argument("--metrics", type=Path, required=True, help="test-split metrics JSON")
    parser.add_argument("--val-metrics", type=Path, required=True, help="val-split metrics JSON (what choices are made on)")
    parser.add_argument("--per-class", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    parser.add_argument("--overlays", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="folder for the test masks and uncertainty maps")
    args = parser.parse_args()
    params = stage_params(args.params, one_thread=True)  # the ensemble's arithmetic, as in fit (docs/determinism.md)
    dataset = params.dataset
    names = dataset.names()
    stores = open_step_stores(args.stores, params)
    model = load_ensemble(args.ensemble, fit_record(params, stores[0].record.checkpoint_sha256))
    device = pick_device(params.runtime.device)
    model.to(device)
    results = {}
    for split in (Split.VAL, Split.TEST):
        if not stores[0].image_ids(split.value):
            results[split] = None
            continue
        result = predict_split(model, stores, split.value, blocks=params.blocks, batch_pixels=params.evaluate.batch_pixels, device=device,
                                precision=params.ensemble.autocast)
        metrics = score(result.truth, result.prediction, names, dataset.ignore_label, result.disagreement,
                        result.image_size**2)
        check_finite_metrics(metrics, split.value, dataset.ignore_label)
        results[split] = (result, {"split": split.value, **metrics, "images": len(result.stems)})
    val = results[Split.VAL]
    write_json_atomic(val[1] if val else {"split": "val", "images": 0}, args.val_metrics)
    test, metrics = results[Split.TEST]
    write_json_atomic(metrics, args.metrics)
    write_csv_atomic(per_class_table(label_counts(test.truth, test.prediction, len(names)), names, dataset.ignore_label),
                     args.per_class)
    write_csv_atomic(confusion_rows(test.truth, test.prediction, names, dataset.ignore_label,
                                    params.evaluate.confusion_max_pixels), args.confusion)
    with building_dir(args.predictions) as temporary:
        for index, stem in enumerate(test.stems):
            _, prediction, disagreement = test.image(index)
            write_prediction(temporary, stem, prediction, disagreement)
    colours = palette(dataset.num_classes, dataset.ignore_label)
    examples = {example.stem: example for example in list_examples(args.data, Split.TEST)}
    with building_dir(args.overlays) as temporary:
        for index, stem in enumerate(test.stems[: params.evaluate.overlays]):
            truth, prediction, disagreement = test.image(index)
            save_figure(overlay_figure(read_rgb(examples[stem].image_path), truth, prediction, disagreement, colours,
                                       names, dataset.ignore_label, title=f"test image {stem}"), temporary / f"{stem}.png")
    val_text = f"; val mIoU {val[1]['miou']:.4f}" if val else "; no val images"
    print(f"evaluate: test mIoU {metrics['miou']:.4f} (paper protocol; strict {metrics['miou_strict']:.4f}), "
          f"pixel accuracy {metrics['pixel_accuracy']:.4f}, uncertainty {metrics['uncertainty']:.4f} on "
          f"{metrics['images']} test images{val_text}")


if __name__ == "__main__":
    main()
