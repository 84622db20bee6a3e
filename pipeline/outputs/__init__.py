"""What stages show people: figures, segmentation outputs and live training curves.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
