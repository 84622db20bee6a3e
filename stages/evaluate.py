"""Stage evaluate: ensemble majority vote on the test pixels -> metrics JSON, tables, plots, overlays."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.data import Split, list_examples, read_rgb
from pipeline.ensemble import EnsembleMLP, predict_chunks
from pipeline.metrics import confusion_matrix, jensen_shannon, majority_vote, top_decile_mean
from pipeline.report import confusion_rows, metrics_dict, overlay, palette, per_class_table, write_csv_atomic
from pipeline.runtime import building_dir, pick_device, stage_main, write_json_atomic
from pipeline.store import StoreError, expected_record, lazy_matrix, open_store


def load_ensemble(path: Path, params, checkpoint_sha256: str) -> EnsembleMLP:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("t_steps") != list(params.t_steps) or payload.get("blocks") != list(params.blocks) \
            or payload.get("checkpoint_sha256") != checkpoint_sha256:
        raise StoreError(f"ensemble {path} was fit on other features than the params ask for; rerun `dvc repro`")
    model = EnsembleMLP(payload["members"], payload["dim"], payload["num_classes"], payload["seed"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--stores", required=True, help="store path or fsspec URL with {t}, e.g. features/t{t}.zarr")
    parser.add_argument("--ensemble", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (test images for overlays)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--per-class", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    parser.add_argument("--overlays", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    if params.ensemble.threads:  # the ensemble's arithmetic, as in fit (README "Determinism")
        torch.set_num_threads(params.ensemble.threads)
    dataset = params.dataset
    stores = [open_store(args.stores.format(t=t), expected_record(params, t)) for t in params.t_steps]
    matrix, labels = lazy_matrix(stores, "test")
    model = load_ensemble(args.ensemble, params, stores[0].record.checkpoint_sha256)
    device = pick_device(params.ensemble.device)
    model.to(device)
    prediction = np.zeros(matrix.shape[0], dtype=np.uint8)
    disagreement = torch.zeros(matrix.shape[0])
    for first, classes, probabilities in predict_chunks(model, matrix, batch_pixels=params.evaluate.batch_pixels, device=device):
        prediction[first : first + classes.shape[1]] = majority_vote(classes, dataset.num_classes).numpy()
        disagreement[first : first + classes.shape[1]] = jensen_shannon(probabilities)
    truth = labels.compute()
    pixels = stores[0].pixels_per_image("test")
    images = len(truth) // pixels
    uncertainty = float(np.mean([top_decile_mean(disagreement[i * pixels : (i + 1) * pixels]) for i in range(images)]))
    confusion = confusion_matrix(truth, prediction, dataset.num_classes, dataset.ignore_label)
    names = dataset.names()
    metrics = metrics_dict(confusion, names, dataset.ignore_label, uncertainty, images)
    write_json_atomic(metrics, args.metrics)
    write_csv_atomic(per_class_table(confusion, names, dataset.ignore_label), args.per_class)
    write_csv_atomic(confusion_rows(truth, prediction, names, dataset.ignore_label, params.evaluate.confusion_max_pixels),
                     args.confusion)
    colours = palette(dataset.num_classes, dataset.ignore_label)
    size = dataset.image_size
    examples = list_examples(args.data, Split.TEST)
    with building_dir(args.overlays) as temporary:
        for i, example in enumerate(examples[: params.evaluate.overlays]):
            image = read_rgb(example.image_path)
            rows = slice(i * pixels, (i + 1) * pixels)
            picture = overlay(image, truth[rows].reshape(size, size), prediction[rows].reshape(size, size), colours,
                              scale=max(1, 256 // size))
            picture.save(temporary / f"{example.stem}.png")
    print(f"evaluate: mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f}, "
          f"uncertainty {metrics['uncertainty']:.4f} on {images} test images")


if __name__ == "__main__":
    main()
