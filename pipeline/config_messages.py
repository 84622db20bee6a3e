"""pydantic's validation errors in the words of this project: the params key, the value, and what to do.

``validated(Params, data)`` is how ``pipeline.config`` builds its params; kept apart from the schema so
that each reads on its own. Torch-free, like the config.
"""
from __future__ import annotations

import typing
from typing import Any, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.diffusion.flags import DIFFUSION_FLAGS
from pipeline.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
              "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
              "bool_parsing": "true or false", "string_type": "a string"}
BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
          "less_than_equal": ("<=", "le")}


def _key(location: tuple) -> str:
    key = ""
    for part in location:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _field_info(location: tuple, root: type[BaseModel]):
    """The FieldInfo of the params key at ``location`` (None past a list index or an unknown key)."""
    model, info = root, None
    for part in location:
        if isinstance(part, int) or model is None or part not in model.model_fields:
            return info
        info = model.model_fields[part]
        annotation = info.annotation
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
        model = next((option for option in options if isinstance(option, type) and issubclass(option, BaseModel)), None)
    return info


def _description(annotation: Any, description: str | None) -> str | None:
    """A field's description, also from inside ``Optional[Annotated[int, Field(description=...)]]``."""
    if description or annotation is None:
        return description
    for part in (*getattr(annotation, "__metadata__", ()), *typing.get_args(annotation)):
        found = getattr(part, "description", None) or (None if isinstance(part, str) else _description(part, None))
        if found:
            return found
    return None


def _describe(error: dict, root: type[BaseModel]) -> str:
    location, kind, value, context = error["loc"], error["type"], error.get("input"), error.get("ctx") or {}
    key = _key(location)
    info = _field_info(location, root)
    description = _description(info.annotation if info is not None else None, info.description if info else None)
    why = f" ({description})" if description else ""
    if kind == "extra_forbidden":
        if _diffusion_flag(location):
            return f"{key} is a diffusion flag, not a model flag: {DIFFUSION_FLAGS[location[-1]]}"
        return _unknown_keys(location[:-1], [location[-1]], root)
    if kind in TYPE_WORDS:
        return f"{key} must be {TYPE_WORDS[kind]}, got {value!r}"
    if kind in ("tuple_type", "list_type"):
        return f"{key} must be a YAML list such as [1, 2], got {value!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{key} must be a mapping of keys to values, got {value!r}"
    if kind == "enum":
        return f"{key}={value!r} is not one of [{context['expected'].replace(' or ', ', ')}]"
    if kind in BOUNDS:
        symbol, name = BOUNDS[kind]
        bound = context[name]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{key} must be {symbol} {bound}, got {value!r}{why}"
    if kind == "string_pattern_mismatch":
        return f"{key}={value!r} is not {description}" if description else f"{key}={value!r}: {error['msg']}"
    return f"{key}={value!r}: {error['msg'].removeprefix('Value error, ')}"


def _diffusion_flag(location: tuple) -> bool:
    """A guided-diffusion diffusion flag pasted into ``ddpm.model`` (it has a key of its own elsewhere)."""
    return location[:-1] == ("ddpm", "model") and location[-1] in DIFFUSION_FLAGS


def _unknown_keys(parent: tuple, names: Sequence[str], root: type[BaseModel]) -> str:
    section = _field_info(parent, root).annotation if parent else root
    keys = ", ".join(_key((*parent, name)) for name in names)
    known = ", ".join(getattr(section, "model_fields", {}))
    return f"unknown params key(s) {keys}; known keys{' of ' + _key(parent) if parent else ''}: {known}"


def validated(root: type[Model], data: dict) -> Model:
    """``root.model_validate(data)``; a failure is one ``ConfigError`` naming the first three problems in this
    project's words: the key, the value, what to do (unknown keys of one section named together)."""
    try:
        return root.model_validate(data)
    except ValidationError as error:
        # The first three problems, in pydantic's order; unknown keys of one section are named together.
        unknown: dict[tuple, list[str]] = {}
        problems: list[dict | tuple] = []
        for problem in error.errors(include_url=False):
            location = problem["loc"]
            if problem["type"] != "extra_forbidden" or _diffusion_flag(location):
                problems.append(problem)
            elif location[:-1] in unknown:
                unknown[location[:-1]].append(location[-1])
            else:
                unknown[location[:-1]] = [location[-1]]
                problems.append(location[:-1])
        messages = [_unknown_keys(item, unknown[item], root) if isinstance(item, tuple) else _describe(item, root)
                    for item in problems[:3]]
        raise ConfigError("; ".join(messages)) from None
