"""Stage fit: train the MLP ensemble on the train pixels streamed from the per-step feature stores."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from pipeline.ensemble.files import save_ensemble
from pipeline.ensemble.fit import EpochStats, fit_ensemble, image_rows, member_passes, train_subset
from pipeline.features.record import fit_record
from pipeline.features.store import lazy_matrix, open_step_stores
from pipeline.outputs.live import log_step, open_curves, write_curves
from pipeline.runtime import pick_device, stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--stores", required=True, help="store path or fsspec URL with {t}, e.g. features/t{t}.zarr")
    parser.add_argument("--out", type=Path, required=True, help="ensemble file to write")
    parser.add_argument("--curves", type=Path, required=True, help="dvclive folder for the per-epoch loss curves")
    args = parser.parse_args()
    params = stage_params(args.params, one_thread=True)
    stores = open_step_stores(args.stores, params)
    matrix, labels = lazy_matrix(stores, "train", params.blocks)
    stems = stores[0].image_ids("train")
    chosen = train_subset(len(stems), params.ensemble.train_images, params.ensemble.train_subset_seed)
    if len(chosen) < len(stems):  # the sample-efficiency sweep: a seeded subset of the stored images
        matrix, labels = image_rows(matrix, labels, chosen, stores[0].pixels_per_image("train"))
        print(f"fit: {len(chosen)} of {len(stems)} train images (seed {params.ensemble.train_subset_seed}): "
              f"{', '.join(stems[i] for i in chosen)}")
    print(f"fit: {matrix.shape[0]} pixels x {matrix.shape[1]} features from {len(stores)} stores, "
          f"{params.ensemble.members} members")
    start = time.perf_counter()
    live, lock = open_curves(args.curves), threading.Lock()  # passes report their epochs from their own threads
    firsts = [first for first, _ in member_passes(params.ensemble)]

    def on_epoch(stats: EpochStats) -> None:
        with lock:
            log_step(live, *epoch_row(stats, firsts))
        print(f"  epoch {stats.epoch}: loss {stats.loss:.4f} accuracy {stats.accuracy:.4f} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)

    model, history = fit_ensemble(
        matrix, labels, num_classes=params.dataset.num_classes, ignore_label=params.dataset.ignore_label,
        config=params.ensemble, device=pick_device(params.runtime.device), on_epoch=on_epoch,
    )
    save_ensemble(args.out, model, features=fit_record(params, stores[0].record.checkpoint_sha256),
                  train_image_ids=[stems[i] for i in chosen])
    write_curves(args.curves, [epoch_row(stats, firsts) for stats in history])
    passes = len({s.first_member for s in history})
    print(f"fit: {max(s.epoch for s in history)} epochs ({passes} passes of members) in "
          f"{time.perf_counter() - start:.0f}s -> {args.out}")


def epoch_row(stats: EpochStats, firsts: list[int]) -> tuple[int, dict[str, float]]:
    """One pass's epoch as a curve point at step = epoch: ``pass_<k>/loss`` and ``pass_<k>/accuracy`` (mean
    over the members of pass k still training; ``firsts``: each pass's first member)."""
    name = f"pass_{firsts.index(stats.first_member)}"
    return stats.epoch, {f"{name}/loss": stats.loss, f"{name}/accuracy": stats.accuracy}

if __name__ == "__main__":
    main()
