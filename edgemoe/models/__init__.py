"""Architectures, one file each, dispatched on the checkpoint's model_type through an alias table.

An architecture module holds LAYOUT (a CheckpointLayout: how its checkpoint names map to
edgemoe's) and Model (a DecoderLM subclass: its config class, routing and blocks);
docs/adding-an-architecture.md says how to add one.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..errors import ModelDirectoryError, UnsupportedArchitectureError

# model_type (as in config.json) -> module in this package
ALIASES: dict[str, str] = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "phimoe": "phimoe",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",
    "gpt_oss": "gpt_oss",
    "switch_transformers": "switch_transformers",
}

SUPPORTED = sorted(ALIASES)

# general.architecture of a GGUF file (llama.cpp's names) -> module in this package; the module's
# GGUF (a GGUFLayout) says where its weights and settings sit in the file
GGUF_ALIASES: dict[str, str] = {
    "llama": "mixtral",  # llama.cpp stores Mixtral as llama with an expert count
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek2": "deepseek",
    "granitemoe": "granitemoe",
    "gpt-oss": "gpt_oss",
}


def get(model_type: str, where: str = "the model") -> ModuleType:
    """The architecture module for a model_type, or a clear error listing what is supported."""
    name = ALIASES.get(model_type) if isinstance(model_type, str) else None
    if name is None:
        raise UnsupportedArchitectureError(
            f"{where} is a {model_type!r} model; edgemoe runs these architectures: {', '.join(SUPPORTED)}. "
            f"Use a checkpoint of one of them (or add the architecture: docs/adding-an-architecture.md)"
        )
    return importlib.import_module(f"{__name__}.{name}")


def config_from_dict(config: Any, where: str = "the model") -> Any:
    """The architecture's config (a DecoderConfig) of a Hugging Face config dict, as config.json
    holds it and a manifest keeps it: dispatched on model_type, every field it reads checked."""
    if not isinstance(config, dict):
        raise ModelDirectoryError(f"{where}'s config is not a JSON object: it is not a Hugging Face model config")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedArchitectureError(
            f"{where}'s config has no model_type naming its architecture (got {model_type!r}); "
            f"edgemoe runs {', '.join(SUPPORTED)}: give the checkpoint's own config.json"
        )
    return get(model_type, where).Model.config_class.from_dict(config)


def get_gguf(arch: str, where: str = "the GGUF file") -> tuple[str, ModuleType]:
    """(canonical name, architecture module) for a GGUF file's general.architecture, or a clear error."""
    name = GGUF_ALIASES.get(arch)
    if name is None:
        raise UnsupportedArchitectureError(
            f"{where} holds a {arch!r} model (general.architecture); edgemoe imports GGUF files of "
            f"{', '.join(sorted(GGUF_ALIASES))}. Use a GGUF of one of them, or convert the model's "
            f"Hugging Face checkpoint if edgemoe runs its architecture ({', '.join(SUPPORTED)})"
        )
    return name, importlib.import_module(f"{__name__}.{name}")
