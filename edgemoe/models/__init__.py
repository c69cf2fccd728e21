"""Architectures, one file each, dispatched on the checkpoint's model_type through an alias table.

An architecture module holds LAYOUT (a CheckpointLayout: how its checkpoint names map to
edgemoe's) and Model (a DecoderLM subclass: its config class, routing and blocks);
docs/adding-an-architecture.md says how to add one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedArchitectureError

# model_type (as in config.json) -> module in this package
ALIASES: dict[str, str] = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
}

SUPPORTED = sorted(ALIASES)


def get(model_type: str, where: str = "the model") -> ModuleType:
    """The architecture module for a model_type, or a clear error listing what is supported."""
    name = ALIASES.get(model_type)
    if name is None:
        raise UnsupportedArchitectureError(
            f"{where} is a {model_type!r} model; edgemoe runs these architectures: {', '.join(SUPPORTED)}. "
            f"Use a checkpoint of one of them (or add the architecture: docs/adding-an-architecture.md)"
        )
    return importlib.import_module(f"{__name__}.{name}")
