"""Per-pixel features: decoder activations, the one path that makes them for images, and the zarr
stores that hold them.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
