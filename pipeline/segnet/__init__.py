"""DatasetDDPM's distilled segmentation network: a SegFormer trained on the labeled samples, chosen on val.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
