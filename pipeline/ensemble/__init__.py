"""The pixel-classifier ensemble: model, streamed fit, prediction, metrics and evaluation.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
