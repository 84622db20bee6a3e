"""Stage pretrain_mae: train the masked autoencoder of features.representation: mae on the unlabeled images
(pipeline/selfsup/mae.py); with any other representation, write a placeholder and train nothing."""
from __future__ import annotations

from pipeline.enums import Representation
from pipeline.runtime import stage_main
from pipeline.selfsup.mae import save_mae, train_mae, unused_checkpoint
from pipeline.selfsup.pretraining import pretrain_stage


@stage_main
def main() -> None:
    pretrain_stage(__doc__, Representation.MAE, train=train_mae, save=save_mae, unused=unused_checkpoint)


if __name__ == "__main__":
    main()
