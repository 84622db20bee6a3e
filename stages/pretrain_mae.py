"""Stage pretrain_mae: train the masked autoencoder of features.representation: mae on the unlabeled images
(pipeline/selfsup/mae.py); with any other representation, write a placeholder and train nothing."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from pipeline.code_closure import run_fingerprint
from pipeline.data.layout import load_unlabeled
from pipeline.enums import Representation
from pipeline.outputs.live import log_step, loss_curve, open_curves, write_curves
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser
from pipeline.selfsup.mae import save_mae, train_mae, unused_checkpoint


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its unlabeled/ folder)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--curves", type=Path, required=True, help="dvclive folder for the loss curve")
    args = parser.parse_args()
    params = stage_params(args.params)
    live = open_curves(args.curves)
    if params.features.representation is not Representation.MAE:
        unused_checkpoint(args.out)
        live.make_summary()  # no curve: metrics.json is {}
        print(f"pretrain_mae: features.representation={params.features.representation.value}, so no MAE is trained; "
              f"placeholder -> {args.out}")
        return
    config, size = params.mae, params.dataset.image_size
    images = load_unlabeled(args.data)
    state_path = args.out.with_name(args.out.name + ".state")
    bar = tqdm(total=config.steps, desc="pretrain_mae", unit="step", mininterval=5)
    window: list[float] = []

    def on_step(step: int, losses: dict[str, float]) -> None:  # each log_every window's mean, as it closes
        bar.update(1)
        window.append(losses["loss"])
        if step % config.log_every == 0 or step == config.steps:
            log_step(live, step, {"loss": sum(window) / len(window)})
            window.clear()

    start = time.perf_counter()
    encoder, history = train_mae(config, size, images, device=pick_device(params.runtime.device), on_step=on_step,
                                 state_path=state_path, fingerprint=run_fingerprint(
                                     {"mae": config.model_dump(mode="json", exclude={"log_every", "state_every"}),
                                      "image_size": size}, "stages.pretrain_mae", images.paths))
    bar.close()
    source = {"kind": "trained", "steps": config.steps, "unlabeled_images": len(images)}
    save_mae(args.out, encoder, config, size, source)
    write_curves(args.curves, loss_curve(history, config.log_every))
    state_path.unlink(missing_ok=True)
    print(f"pretrain_mae: trained {config.steps} steps on {len(images)} images in {time.perf_counter() - start:.0f}s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
