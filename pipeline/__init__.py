"""Label-efficient segmentation with diffusion features: the library behind the DVC stages.

Importing it (every stage does, before torch runs anything) asks Intel MKL for run-to-run identical
results: its Conditional Numerical Reproducibility mode ``AUTO`` keeps the CPU's fastest code path but
fixes the scheduling and the order of reductions, and fixed thread counts stop MKL/OpenMP from changing
them at run time. Without these, Intel documents that MKL results may differ between runs on the same
machine. A value already in the environment wins. Nothing here changes results on a GPU.
"""
import os

for _name, _value in (("MKL_CBWR", "AUTO"), ("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE")):
    os.environ.setdefault(_name, _value)
