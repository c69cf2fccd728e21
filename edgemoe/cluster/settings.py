"""Settings for one machine and one model from what the machine has free: the expert memory
budget, compute threads and the experts' bitwidth (`edgemoe devices --detect MODEL`); the
coordinator's and each device's budget in a placement plan come from the same arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError, UnsupportedArchitectureError
from ..format.manifest import blob_tables, load_manifest, page_bytes
from ..format.quant import expert_nbytes
from ..models import get as architecture
from ..runtime.engine import load
from ..units import format_bytes

SUGGESTED_BITS = (8, 4)  # highest first
RESERVE_BYTES = 256 << 20  # left free for the OS and everything else running


@dataclass
class MemoryTerms:
    """What a model needs besides its expert budget (Model.memory_needed's other terms), the
    least budget it runs with, and its expert bytes (whole pages) as converted and at 8/4 bits."""

    other_bytes: int
    min_budget: int
    expert_bytes: dict[str, int]  # "as converted", "8", "4"
    context_tokens: int


def expert_shape(manifest: dict) -> tuple[int, int]:
    """(hidden, intermediate) of one expert, from the model config and its architecture."""
    cfg = manifest["config"]
    try:
        key = architecture(manifest["architecture"]).LAYOUT.intermediate_key
    except (UnsupportedArchitectureError, AttributeError):
        key = "moe_intermediate_size" if "moe_intermediate_size" in cfg else "intermediate_size"
    return int(cfg["hidden_size"]), int(cfg[key])


def memory_terms(model_dir: str | Path, context_tokens: int = 256) -> MemoryTerms:
    """Load the model without reading experts and read its memory terms."""
    manifest = load_manifest(model_dir)
    ex = manifest["experts"]
    _, lengths, _, _ = blob_tables(manifest)
    pages = page_bytes(lengths)
    top = int(ex["top_k"])
    min_budget = int((np.sort(pages, axis=1)[:, ::-1][:, :top].sum(axis=1)).max()) if pages.size else 0
    m = load(model_dir, memory_budget=max(min_budget, 1), preload="none")
    other = m.memory_needed(context_tokens) - m.budget
    q = manifest.get("quantization", {})
    group = int(q.get("group_size") or 64)
    hidden, inter = expert_shape(manifest)
    count = int((lengths > 0).sum())
    sizes = {"as converted": int(pages.sum())}
    for b in SUGGESTED_BITS:
        one = int(page_bytes(np.array([expert_nbytes(hidden, inter, b, group, bool(q.get("symmetric")))]))[0])
        sizes[str(b)] = one * count
    return MemoryTerms(int(other), min_budget, sizes, context_tokens)


@dataclass
class Suggestion:
    """Settings for a machine: memory_budget for the experts (0: the model does not fit),
    threads, and bits, the highest of SUGGESTED_BITS whose experts fit the budget whole
    (streaming False), else the lowest with the experts streamed under the budget."""

    memory_budget: int
    threads: int
    bits: int
    streaming: bool
    terms: MemoryTerms
    available_bytes: int
    notes: list[str] = field(default_factory=list)

    def flags(self) -> str:
        return f"--memory-budget {self.memory_budget} --threads {self.threads}"


def suggest(terms: MemoryTerms, available_bytes: int, cores: int, reserve_bytes: int = RESERVE_BYTES) -> Suggestion:
    """The suggestion for a machine with `available_bytes` free and `cores` physical cores."""
    budget = max(0, int(available_bytes) - terms.other_bytes - int(reserve_bytes))
    notes: list[str] = []
    for b in SUGGESTED_BITS:
        if terms.expert_bytes[str(b)] <= budget:
            return Suggestion(terms.expert_bytes[str(b)], cores, b, False, terms, int(available_bytes), notes)
    b = SUGGESTED_BITS[-1]
    # the least budget at b bits: the model's own, scaled to b-bit experts
    scale = terms.expert_bytes[str(b)] / max(1, terms.expert_bytes["as converted"])
    need = int(terms.min_budget * min(1.0, scale))
    if budget < need:
        notes.append(
            f"{format_bytes(available_bytes)} available is too little: the model needs {format_bytes(terms.other_bytes)} "
            f"besides its experts and at least {format_bytes(need)} for {b}-bit experts; "
            f"free {format_bytes(terms.other_bytes + need + reserve_bytes - available_bytes)} more or use a bigger device"
        )
        return Suggestion(0, cores, b, True, terms, int(available_bytes), notes)
    notes.append(
        f"the {b}-bit experts ({format_bytes(terms.expert_bytes[str(b)])}) do not fit: they stream from flash "
        f"through a {format_bytes(budget)} cache"
    )
    return Suggestion(budget, cores, b, True, terms, int(available_bytes), notes)


def coordinator_budget(model_dir: str | Path, available_bytes: int, context_tokens: int = 256) -> int:
    """The expert cache a coordinator with `available_bytes` free can give the model."""
    terms = memory_terms(model_dir, context_tokens)
    budget = int(available_bytes) - terms.other_bytes - RESERVE_BYTES
    if budget < terms.min_budget:
        raise EdgeMoEError(
            f"the coordinator has {format_bytes(available_bytes)} free, which leaves "
            f"{format_bytes(max(0, budget))} for experts after the backbone and the rest "
            f"({format_bytes(terms.other_bytes)}); the model needs at least {format_bytes(terms.min_budget)}: "
            f"give the coordinator a budget (--coordinator-budget) or more RAM"
        )
    return min(budget, terms.expert_bytes["as converted"])
