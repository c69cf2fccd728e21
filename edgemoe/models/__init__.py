"""Architectures, dispatched on the checkpoint's model_type through an alias table."""
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
}

SUPPORTED = sorted(ALIASES)


def get(model_type: str) -> ModuleType:
    """The architecture module for a model_type, or a clear error listing what is supported."""
    name = ALIASES.get(model_type)
    if name is None:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED)}")
    return importlib.import_module(f"{__name__}.{name}")
