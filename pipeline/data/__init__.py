"""Datasets: image and mask readers, the built-in digits, splits and the prepared layout.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
