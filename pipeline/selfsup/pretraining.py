"""What the pretrain_mae and pretrain_swav stages share: train a self-supervised encoder on the unlabeled
images when ``features.representation`` names it (with a progress bar, a dvclive loss curve logged as it goes,
a resumable state beside the checkpoint), else write its placeholder and train nothing.

Each stage passes its own module's functions, so neither imports the other's code."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel
from tqdm import tqdm

from pipeline.code_closure import run_fingerprint
from pipeline.config import Params
from pipeline.data.layout import load_unlabeled
from pipeline.enums import Representation
from pipeline.outputs.live import log_step, loss_curve, open_curves, write_curves
from pipeline.runtime import pick_device, stage_params, stage_parser


def pretrain_stage(doc: str, representation: Representation, *, train: Callable, save: Callable,
                   unused: Callable[[Path], None]) -> None:
    """A pretraining stage's command line (``--params --data --out --curves``), then ``pretrain_encoder``."""
    parser = stage_parser(doc)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (its unlabeled/ folder)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--curves", type=Path, required=True, help="dvclive folder for the loss curve")
    args = parser.parse_args()
    pretrain_encoder(stage_params(args.params), representation, args.data, args.out, args.curves,
                     train=train, save=save, unused=unused)


def pretrain_encoder(params: Params, representation: Representation, data: Path, out: Path, curves: Path, *,
                     train: Callable, save: Callable, unused: Callable[[Path], None]) -> None:
    """The stage of ``representation`` (mae or swav; its params section has the same name): ``train(config,
    image_size, images, device=, on_step=, state_path=, fingerprint=)`` returns ``(encoder, history)`` and
    ``save(path, encoder, config, image_size, source)`` writes the checkpoint; ``unused(path)`` writes the
    placeholder of other representations."""
    name = representation.value
    stage = f"pretrain_{name}"
    live = open_curves(curves)
    if params.features.representation is not representation:
        unused(out)
        live.make_summary()  # no curve: metrics.json is {}
        print(f"{stage}: features.representation={params.features.representation.value}, so nothing is trained; "
              f"placeholder -> {out}")
        return
    config: BaseModel = getattr(params, name)
    size = params.dataset.image_size
    images = load_unlabeled(data)
    state_path = out.with_name(out.name + ".state")
    bar = tqdm(total=config.steps, desc=stage, unit="step", mininterval=5)
    window: list[float] = []

    def on_step(step: int, losses: dict[str, float]) -> None:  # each log_every window's mean, as it closes
        bar.update(1)
        window.append(losses["loss"])
        if step % config.log_every == 0 or step == config.steps:
            log_step(live, step, {"loss": sum(window) / len(window)})
            window.clear()

    start = time.perf_counter()
    recipe = {name: config.model_dump(mode="json", exclude={"log_every", "state_every"}), "image_size": size}
    encoder, history = train(config, size, images, device=pick_device(params.runtime.device), on_step=on_step,
                             state_path=state_path, fingerprint=run_fingerprint(recipe, f"stages.{stage}", images.paths))
    bar.close()
    save(out, encoder, config, size, {"kind": "trained", "steps": config.steps, "unlabeled_images": len(images)})
    write_curves(curves, loss_curve(history, config.log_every))
    state_path.unlink(missing_ok=True)
    print(f"{stage}: trained {config.steps} steps on {len(images)} images in {time.perf_counter() - start:.0f}s "
          f"-> {out}")
