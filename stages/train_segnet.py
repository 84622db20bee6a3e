"""Stage train_segnet (DatasetDDPM): a SegFormer trained on the label stage's kept samples (segnet.* params; from
a random init, or from the encoder weights segnet.weights names), the epoch kept chosen on the real val split's
mIoU (never test, never the labeled train images). Writes the chosen network and the per-epoch curves (train
loss, val mIoU); a killed run resumes after its last finished epoch (<out>.state)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pipeline.segnet.network
import pipeline.segnet.train
import pipeline.segnet.weights
from pipeline.data.layout import Split, list_examples, load_split
from pipeline.hashing import file_sha256
from pipeline.outputs.live import log_step, open_curves, write_curves
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser
from pipeline.segnet.network import build_network, save_segnet, segformer_config, segnet_record
from pipeline.segnet.train import EpochRecord, LabeledFolder, paper_miou, train_segnet
from pipeline.segnet.weights import load_encoder_weights


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--synthetic", type=Path, required=True, help="the label stage's kept samples (png + npy)")
    parser.add_argument("--data", type=Path, required=True, help="the prepared dataset: its real/val split chooses the epoch")
    parser.add_argument("--out", type=Path, required=True, help="the chosen network's file")
    parser.add_argument("--curves", type=Path, required=True, help="dvclive folder for train loss and val mIoU per epoch")
    args = parser.parse_args()
    params = stage_params(args.params)
    dataset, config = params.dataset, params.segnet
    device = pick_device(params.runtime.device)
    train = LabeledFolder(args.synthetic, dataset.image_size)
    validate = None
    if list_examples(args.data, Split.VAL, allow_empty=True):
        _, val_images, val_masks = load_split(args.data, Split.VAL)

        def validate(network):
            return paper_miou(network, val_images, val_masks, dataset.num_classes, dataset.ignore_label, device)
    else:
        print(f"train_segnet: {args.data} has no val images, so no epoch can be chosen: the last one is kept")
    arguments = segformer_config(config, dataset.num_classes)
    network = build_network(arguments, seed=config.seed)  # the decode head's init, with or without segnet.weights
    init = None
    if config.weights_path() is not None:
        init = load_encoder_weights(network, config.weights_path())
        print(f"train_segnet: encoder weights from {init['path']} (sha256 {init['sha256'][:12]}), a fresh decode head")
    epochs = config.epochs_for(len(train))
    print(f"train_segnet: SegFormer {sum(p.numel() for p in network.parameters()):,} parameters, {len(train)} "
          f"labeled samples, {epochs} epochs of batch {config.batch_size}"
          f"{'' if config.steps is None else f' (segnet.steps {config.steps})'}, Adam lr {config.lr:g}")
    live, start = open_curves(args.curves), time.perf_counter()

    def on_epoch(record: EpochRecord) -> None:
        log_step(live, *curve_row(record))
        val = "" if record.val_miou is None else f", val mIoU {record.val_miou:.4f}"
        print(f"  epoch {record.epoch}: loss {record.loss:.4f}{val} ({time.perf_counter() - start:.0f}s)", flush=True)

    state_path = args.out.with_name(args.out.name + ".state")
    trained = train_segnet(network, train, config, ignore_label=dataset.ignore_label, validate=validate, device=device,
                           state_path=state_path, fingerprint=fingerprint(arguments, params, train, args.data, init),
                           on_epoch=on_epoch)
    network.load_state_dict(trained.state_dict)
    chosen = trained.history[trained.epoch - 1]
    save_segnet(args.out, network, segnet_record(config, num_classes=dataset.num_classes, image_size=dataset.image_size,
                                                 ignore_label=dataset.ignore_label),
                {"epoch": trained.epoch, "val_miou": chosen.val_miou, "chosen_on": "val" if validate else "last epoch",
                 "synthetic_images": len(train), "history": [vars(record) for record in trained.history],
                 **({"init": init} if init else {})})  # a random init records nothing: the default file keeps its bytes
    write_curves(args.curves, [curve_row(record) for record in trained.history])
    state_path.unlink(missing_ok=True)
    val = "" if chosen.val_miou is None else f" (val mIoU {chosen.val_miou:.4f})"
    print(f"train_segnet: epoch {trained.epoch} of {epochs} kept{val} in {time.perf_counter() - start:.0f}s "
          f"-> {args.out}")


def curve_row(record: EpochRecord) -> tuple[int, dict[str, float]]:
    values = {"loss": record.loss}
    if record.val_miou is not None:
        values["val_miou"] = record.val_miou
    return record.epoch, values


def fingerprint(arguments: dict, params, train: LabeledFolder, data: Path, init: dict | None) -> str:
    """What a resumable state must share with this run to be continued: the network, its initial weights, the
    recipe, the training code, and the bytes of the samples and of the val split."""
    recipe = params.segnet.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps({"network": arguments, "recipe": recipe, "ignore": params.dataset.ignore_label,
                                        "init": init}, sort_keys=True).encode())
    for module in (pipeline.segnet.train, pipeline.segnet.network, pipeline.segnet.weights):
        digest.update(Path(module.__file__).read_bytes())
    for path in train.paths:
        digest.update(f"{path.name}:{file_sha256(path)}:{file_sha256(path.with_suffix('.npy'))}".encode())
    for example in list_examples(data, Split.VAL, allow_empty=True):
        digest.update(f"{example.stem}:{file_sha256(example.image_path)}:{file_sha256(example.mask_path)}".encode())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
