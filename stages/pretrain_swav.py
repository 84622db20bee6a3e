"""Stage pretrain_swav: train the SwAV network of features.representation: swav on the unlabeled images
(pipeline/selfsup/swav.py); with any other representation, write a placeholder and train nothing."""
from __future__ import annotations

from pipeline.enums import Representation
from pipeline.runtime import stage_main
from pipeline.selfsup.pretraining import pretrain_stage
from pipeline.selfsup.swav import save_swav, train_swav, unused_checkpoint


@stage_main
def main() -> None:
    pretrain_stage(__doc__, Representation.SWAV, train=train_swav, save=save_swav, unused=unused_checkpoint)


if __name__ == "__main__":
    main()
