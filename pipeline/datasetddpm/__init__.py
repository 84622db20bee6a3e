"""DatasetDDPM (the paper's section 4.3): images sampled from the DDPM, labeled by the ensemble, the most
uncertain dropped; the labeled set then trains an ordinary segmentation network.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
