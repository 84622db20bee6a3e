"""The paper's analyses that run as stages: corruption robustness and k-means maps.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
