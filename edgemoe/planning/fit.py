"""Will a model fit a device? Its sizes, the smallest expert budget and the smallest memory
limit it runs in, from a Hugging Face config.json alone, before anything is downloaded
(`edgemoe info config.json`).

    plan = plan_config(read_config("config.json"), context_tokens=256)
    plan["experts"][4]["min_memory_limit"]

The sizes come from the architecture's size model (edgemoe/models/sizes.py), the memory terms
from the ones Model.memory_needed adds up (edgemoe/runtime/memory.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EdgeMoEError
from ..format.manifest import MANIFEST, PAGE
from ..models.sizes import SizeModel, size_model
from ..runtime.memory import RUNTIME_OVERHEAD_BYTES, memory_terms

EXPERT_BITS = (16, 8, 4, 3, 2)
BACKBONE_BITS = (16, 8, 4)
CONFIG = "config.json"


def is_config_path(path: str | Path) -> bool:
    """A config file (any .json path), or a folder holding a config.json but no manifest.json."""
    p = Path(path)
    if p.is_dir():
        return (p / CONFIG).is_file() and not (p / MANIFEST).exists()
    return p.is_file() or p.suffix == ".json"  # a missing config.json is reported as such


def read_config(path: str | Path) -> dict[str, Any]:
    """The config dict of a config.json file or of the folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeMoEError(f"{p} does not exist: give a Hugging Face config.json or the folder holding it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeMoEError(f"{p} cannot be read as JSON ({e}): download the model's config.json again") from None
    if not isinstance(config, dict):
        raise EdgeMoEError(f"{p} is not a JSON object: it is not a Hugging Face model config")
    return config


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _default_backbone_bits(expert_bits: int) -> int:
    return 16 if expert_bits == 16 else 8  # as `edgemoe convert` chooses without --backbone-bits


def plan_config(
    config: dict[str, Any],
    context_tokens: int = 256,
    group_size: int = 64,
    symmetric: bool = False,
    backbone_bits: int | None = None,
    where: str = CONFIG,
) -> dict[str, Any]:
    """Sizes and the smallest budget and memory limit of the model `config` describes, for every
    expert bitwidth. backbone_bits: the backbone's bits in the memory limit (default: as
    `edgemoe convert` picks, 16 with 16-bit experts, else 8)."""
    if context_tokens < 1:
        raise EdgeMoEError(f"the context must be at least one token, got {context_tokens}")
    if backbone_bits is not None and backbone_bits not in BACKBONE_BITS:
        raise EdgeMoEError(f"backbone bits must be one of {', '.join(map(str, BACKBONE_BITS))}, got {backbone_bits}")
    sm = size_model(config, where)
    notes = list(sm.notes)
    backbone = {b: _quantized_or_none(sm.backbone_nbytes, b, group_size, symmetric) for b in BACKBONE_BITS}
    experts: dict[int, dict[str, Any] | None] = {}
    for bits in EXPERT_BITS:
        one = _quantized_or_none(sm.expert_nbytes, bits, group_size, symmetric)
        bb = backbone_bits or _default_backbone_bits(bits)
        held = backbone[bb]
        experts[bits] = None if one is None or held is None else _at_bits(sm, one, bb, held, context_tokens)
    if any(e is None for e in experts.values()):
        notes.append(
            f"hidden size {sm.hidden_size} or expert intermediate size {sm.expert_shapes[0][0]} is not a "
            f"multiple of the group size {group_size}: quantized sizes need another --group-size"
        )
    return {
        "config": where,
        "model_type": config.get("model_type"),
        "architecture": sm.architecture,
        "supported": sm.supported,
        "why_not": sm.why_not,
        "layers": sm.layers,
        "moe_layers": len(sm.moe_layers),
        "experts_per_layer": sm.num_experts,
        "top_k": sm.top_k,
        "hidden_size": sm.hidden_size,
        "vocab_size": sm.vocab_size,
        "params": sm.params(),
        "tied_embeddings": sm.tied,
        "embedding_bytes": sm.embedding_nbytes(),
        # under a budget the runtime reads the table by row from the file unless the head shares it
        "embeddings": "ram" if sm.tied else "file",
        "backbone_bytes": backbone,
        "experts": experts,
        "context_tokens": context_tokens,
        "group_size": group_size,
        "symmetric": symmetric,
        "notes": notes,
        "assumptions": _assumptions(sm, context_tokens, group_size, symmetric),
    }


def _quantized_or_none(size: Any, bits: int, group_size: int, symmetric: bool) -> int | None:
    try:
        return int(size(bits, group_size, symmetric))
    except ValueError:  # a dimension the group size does not divide: the converter refuses these bits
        return None


def _at_bits(sm: SizeModel, one: int, backbone_bits: int, backbone: int, context_tokens: int) -> dict[str, Any]:
    budget = sm.top_k * _pages(one)  # one layer's routed experts, whole pages each: load's minimum
    in_ram = backbone - (0 if sm.tied else sm.embedding_nbytes())
    terms = memory_terms(
        experts=budget,
        backbone=in_ram,
        expert_slots=sm.layers * sm.num_experts,  # the cache's table covers dense layers too
        kv_values_per_token=sm.kv_values_per_token,
        kv_value_bytes=sm.kv_value_bytes,
        heads=sm.heads,
        hidden=sm.hidden_size,
        top_k=sm.top_k,
        context_tokens=context_tokens,
        attention_values_per_token=sm.attention_values_per_token,
    )
    return {
        "bytes": len(sm.moe_layers) * sm.num_experts * one,
        "expert_bytes": one,
        "min_budget": budget,
        "backbone_bits": backbone_bits,
        "min_memory_limit": sum(terms.values()),
        "memory_terms": terms,
    }


def _assumptions(sm: SizeModel, context_tokens: int, group_size: int, symmetric: bool) -> list[str]:
    kind = "symmetric" if symmetric else "asymmetric"
    table = (
        "held in RAM (the output head shares it)"
        if sm.tied
        else "read by row from the file, as under a budget (the output head is a separate matrix)"
    )
    out = [
        f"every expert at one bitwidth, quantized in groups of {group_size} ({kind}); a bf16 or f16 checkpoint",
        "backbone: attention, dense and shared MLP matrices and the output head at the backbone bits; "
        "routers, embeddings, norms and biases at 16 bits",
        "min budget: one layer's top-k experts, each rounded up to whole 4 KiB pages (the smallest budget load accepts)",
        f"min memory limit: the min budget, the backbone in RAM with the embedding table {table}, "
        f"the expert cache's entries, the KV cache and prefill scratch for {context_tokens} tokens, and "
        f"{RUNTIME_OVERHEAD_BYTES >> 20} MiB for the runtime (Model.memory_needed, docs/memory.md)",
    ]
    if not sm.supported:
        out.append("an estimate: edgemoe's runtime terms for an architecture it does not run yet")
    return out
