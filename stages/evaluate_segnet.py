"""Stage evaluate_segnet (DatasetDDPM): the distilled network's test mIoU by the paper's protocol (the same
``score`` the ensemble's evaluate writes metrics/eval.json with), its val mIoU beside it, and the epoch
train_segnet chose on val, into one metrics JSON that `dvc metrics diff` shows beside the ensemble's."""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.data.layout import Split, list_examples, load_split
from pipeline.ensemble.metrics import check_finite_metrics, score
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser
from pipeline.segnet.network import load_segnet, segment_images, segnet_record


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--segnet", type=Path, required=True, help="train_segnet's network file")
    parser.add_argument("--data", type=Path, required=True, help="the prepared dataset (its real/test and real/val)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    args = parser.parse_args()
    params = stage_params(args.params)
    dataset = params.dataset
    network, training = load_segnet(args.segnet, segnet_record(params.segnet, num_classes=dataset.num_classes,
                                                               image_size=dataset.image_size,
                                                               ignore_label=dataset.ignore_label))
    device = pick_device(params.runtime.device)
    network.to(device)
    results = {}
    for split in (Split.VAL, Split.TEST):
        if not list_examples(args.data, split, allow_empty=True):
            continue
        stems, images, masks = load_split(args.data, split)
        prediction, _ = segment_images(network, images, device=device)
        metrics = score(masks.reshape(-1), prediction.reshape(-1), dataset.names(), dataset.ignore_label)
        check_finite_metrics(metrics, split.value, dataset.ignore_label, stage="evaluate_segnet")
        results[split] = {**metrics, "images": len(stems)}
    test = results[Split.TEST]
    val = results.get(Split.VAL)
    output = {"split": "test", **test, "val_miou": val["miou"] if val else None,
              "val_miou_strict": val["miou_strict"] if val else None, "epoch": training["epoch"],
              "epoch_chosen_on": training["chosen_on"], "synthetic_images": training["synthetic_images"]}
    write_json_atomic(output, args.metrics)
    val_text = f"; val {val['miou']:.4f}" if val else "; no val images"
    print(f"evaluate_segnet: test mIoU {test['miou']:.4f} (paper protocol; strict {test['miou_strict']:.4f}){val_text}; "
          f"epoch {training['epoch']} of the segnet trained on {training['synthetic_images']} samples -> {args.metrics}")


if __name__ == "__main__":
    main()
