"""Self-supervised representations the DDPM is compared against, pretrained on the same unlabeled images
(issue 26): mae.py, a masked autoencoder from transformers' ViTMAE.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
