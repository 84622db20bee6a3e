"""The encoder weights DatasetDDPM's SegFormer starts from (``segnet.weights``), instead of a random init.

``segnet.weights`` names a local file or folder (nothing is downloaded):
- a transformers SegFormer folder written by ``save_pretrained`` (a local copy of nvidia/mit-b0, say), read by
  ``SegformerModel.from_pretrained(folder, local_files_only=True)``;
- a ``.safetensors`` or ``.pt`` state dict of a ``SegformerModel``, a ``SegformerForSemanticSegmentation`` or a
  ``SegformerForImageClassification`` (``{"state_dict": ...}`` too, so a segnet file of this pipeline can start
  another run).
Either way transformers maps the keys (older checkpoints' ``encoder.block.*`` names included) onto a
``SegformerModel`` built from the ``segnet`` params; only the encoder is taken, and the decode head keeps the
fresh init it was built with (for the run's number of classes). A key whose shape differs, a key the params
build but the file lacks, or an encoder key the file has and the params do not build is refused, naming the
key and the segnet param to change: nothing is silently left at its random init.

transformers is imported inside the functions, as in ``pipeline.segnet.network``.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from pipeline.errors import SegnetError
from pipeline.hashing import path_sha256

# segnet param -> the transformers SegformerConfig field it sets (segformer_config's arguments)
PARAM_FIELDS = {"hidden_sizes": "hidden_sizes", "depths": "depths", "attention_heads": "num_attention_heads",
                "sr_ratios": "sr_ratios", "patch_sizes": "patch_sizes", "strides": "strides", "mlp_ratio": "mlp_ratios"}


def load_encoder_weights(network: torch.nn.Module, path: Path) -> dict:
    """Copy the encoder weights at ``path`` (a folder or a state-dict file, see above) into ``network.segformer``
    (a ``SegformerForSemanticSegmentation`` of ``build_network``); returns where they came from, ``{"path",
    "sha256"}`` (a folder's sha256 covers its files: ``path_sha256``). ``FileNotFoundError`` naming
    ``segnet.weights`` when nothing is there, ``SegnetError`` naming the key when the shapes differ."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"segnet.weights {path} does not exist; put the SegFormer weights there (a folder "
                                f"written by save_pretrained, or a .pt / .safetensors state dict) or set "
                                f"segnet.weights: models/scratch for a random init")
    state_dict = None if path.is_dir() else read_state_dict(path)
    encoder, info = _from_pretrained(path if path.is_dir() else None, state_dict, copy.deepcopy(network.config))
    problems = _problems(info, network.segformer.state_dict())
    if problems:
        raise SegnetError(shape_message(path, problems, network.config))
    check_heads(path, network.config)
    network.segformer.load_state_dict(encoder.state_dict())
    return {"path": str(path), "sha256": path_sha256(path)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` or ``.pt`` file's tensors, never running a pickle (``weights_only``); a ``{"state_dict":
    ...}`` payload is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (not a tensor file, truncated, or a pickle of other objects)
        raise SegnetError(f"segnet.weights {path} cannot be read as a state dict ({type(error).__name__}); give a "
                          f"SegFormer folder written by save_pretrained, or a .pt / .safetensors state dict") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise SegnetError(f"segnet.weights {path} is not a state dict (a mapping of names to tensors); give a "
                          f"SegFormer folder written by save_pretrained, or a .pt / .safetensors state dict")
    return loaded


def _from_pretrained(folder: Path | None, state_dict: dict | None, config) -> tuple[torch.nn.Module, dict]:
    """transformers' loader onto a ``SegformerModel`` of ``config`` (the params' shapes, whatever the folder's
    config.json says), mismatched shapes reported rather than raised; its load report and progress bar muted,
    since it lists the decode head's keys, which are dropped on purpose."""
    from transformers import SegformerModel
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return SegformerModel.from_pretrained(folder, config=config, state_dict=state_dict, local_files_only=True,
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as error:  # noqa: BLE001 (no weights file in the folder, a truncated one, safetensors' own errors)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SegnetError(f"segnet.weights {folder} cannot be loaded as a SegFormer ({type(error).__name__}: "
                          f"{first}); give a folder written by save_pretrained, or a .pt / .safetensors state dict"
                          ) from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _problems(info: dict, expected: dict[str, torch.Tensor]) -> list[tuple[str, str, str]]:
    """``(key, kind, what is wrong)`` for each encoder key that does not load, in the network's key order; kind is
    ``shape``, ``missing`` (the params build it, the file lacks it) or ``extra`` (the other way round)."""
    found = {}
    for key, in_file, in_model in info["mismatched_keys"]:
        found[key] = ("shape", f"has shape {list(in_file)} in the file, {list(in_model)} from the params")
    for key in info["missing_keys"]:
        found[key] = ("missing", "is not in the file")
    for key in info["unexpected_keys"]:
        key = key.removeprefix("segformer.")
        # a head (decode_head.*, mit-b0's ImageNet classifier.*) is dropped: this run's starts fresh for its classes
        if key.startswith("stages."):
            found[key] = ("extra", "is in the file but not in a SegFormer of these params")
    for index, error in enumerate(info.get("error_msgs") or []):
        found[f"(load error {index})"] = ("error", str(error))
    order = {key: index for index, key in enumerate(expected)}
    return [(key, kind, what) for key, (kind, what) in
            sorted(found.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))]


def check_heads(path: Path, config) -> None:
    """A folder's config.json must split attention into the heads the params do: the weights' shapes do not
    show it, but each head would read other channels than it was trained on. (Strides may differ: no weight
    depends on them, and a small image may want stride 1 where the file's model had 4.)"""
    saved = _saved_config(path)
    heads = _param_value(config, "num_attention_heads")
    if saved is not None and _param_value(saved, "num_attention_heads") != heads:
        raise SegnetError(f"segnet.weights {path} was trained with num_attention_heads "
                          f"{_param_value(saved, 'num_attention_heads')} (its config.json), but segnet.attention_heads "
                          f"is {heads}: the weights would load, each head reading other channels than it learned; "
                          f"set segnet.attention_heads to the file's")


def _saved_config(path: Path) -> dict | None:
    """A folder's config.json (what save_pretrained wrote), or None for a file or a folder without one."""
    config_file = path / "config.json"
    return json.loads(config_file.read_text()) if path.is_dir() and config_file.is_file() else None


def shape_message(path: Path, problems: list[tuple[str, str, str]], config) -> str:
    """The refusal: the first keys that differ, the segnet param most likely behind the first, and for a folder
    with a config.json, each segnet param whose value differs from the file's."""
    shown = "; ".join(f"{key} {what}" for key, _, what in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    key, kind, _ = problems[0]
    message = (f"segnet.weights {path} does not fit the segnet params: {len(problems)} encoder key(s) differ: "
               f"{shown}{more}. Likely param: {likely_param(key, kind, config.num_encoder_blocks)}")
    saved = _saved_config(path)
    if saved is not None:
        differ = [f"segnet.{param} {_param_value(config, field)!r} (the file's: {_param_value(saved, field)!r})"
                  for param, field in PARAM_FIELDS.items() if _param_value(saved, field) != _param_value(config, field)]
        if differ:
            message += f". Its config.json differs in {'; '.join(differ)}"
    return (message + ". Set the segnet params to the shapes of the model in the file, or point segnet.weights at "
            "weights of these shapes (models/scratch: random init)")


def likely_param(key: str, kind: str, stages: int) -> str:
    """The segnet param a differing encoder key (transformers' ``stages.<i>.…`` names) most likely comes from."""
    match = re.match(r"stages\.(\d+)\.(blocks\.\d+\.)?", key)
    if match is None:
        return "all of them (the file holds keys of another model than a SegFormer encoder)"
    stage = int(match[1])
    if kind != "shape" and (stage >= stages or match[2] is None):  # a whole stage more or less
        return f"the number of encoder stages (each segnet list has {stages} entries)"
    if "sequence_reduction" in key:  # sr_ratio 1 builds no reduction at all
        return f"segnet.sr_ratios[{stage}] or segnet.hidden_sizes[{stage}]"
    if kind != "shape":
        return f"segnet.depths[{stage}] (transformer blocks in stage {stage})"
    if "patch_embeddings.proj.weight" in key:
        return f"segnet.hidden_sizes[{stage}] or segnet.patch_sizes[{stage}]"
    if ".mlp." in key:
        return f"segnet.mlp_ratio or segnet.hidden_sizes[{stage}]"
    return f"segnet.hidden_sizes[{stage}]"


def _param_value(config, field: str):
    """A SegformerConfig field (of a config object or a config.json dict), mlp_ratios as the one segnet.mlp_ratio
    when all stages share it."""
    value = config.get(field) if isinstance(config, dict) else getattr(config, field, None)
    if field == "mlp_ratios" and isinstance(value, list) and len(set(value)) == 1:
        return value[0]
    return list(value) if isinstance(value, tuple) else value

