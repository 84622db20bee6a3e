"""The diffusion model: the UNet (guided-diffusion's, and diffusers' through an adapter), its flags and
schedules (torch-free), the Gaussian diffusion, checkpoints and pretraining.

Kept empty of imports: a stage's code deps are its import closure (tests/test_dvc_deps.py).
"""
