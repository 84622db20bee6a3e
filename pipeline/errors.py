"""Errors for people: each names the file, key or value and how to fix it. Stages exit 2 on these."""
from __future__ import annotations


class PipelineError(ValueError):
    """Bad input to the pipeline (params, data, checkpoint, store)."""


class ConfigError(PipelineError):
    """A params file that cannot be used."""


class DatasetError(PipelineError):
    """A dataset folder or file that cannot be used."""


class ModelFlagsError(PipelineError):
    """Model flags that cannot build a UNet, or a checkpoint that does not match them."""


class NumericsError(PipelineError):
    """NaN, infinity or overflow made by a stage: it stops there, naming the step, the stage and a likely cause."""


class StoreError(PipelineError):
    """A feature store that is missing, incomplete, or made with other params than the ones asked for."""
