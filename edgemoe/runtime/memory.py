"""The terms of a process's memory while it generates (docs/memory.md), from numbers alone, so
that a loaded Model (Model.memory_needed) and a plan from config.json (edgemoe.planning.fit)
count the same things."""

from __future__ import annotations

from .. import _core
from ..models.blocks import KVCache

# What the process holds beyond the expert budget, the backbone and the context-dependent
# terms: Python with numpy, tokenizers and the native core (~30 MB resident, measured), the
# per-token activations of decode, and headroom for the allocator.
RUNTIME_OVERHEAD_BYTES = 48 << 20
# per expert in the file, resident or not: a blob's malloc chunk header and its page-table share
BLOB_BOOKKEEPING_BYTES = 64 + 128


def memory_terms(
    *,
    experts: int,
    backbone: int,
    expert_slots: int,
    kv_values_per_token: int,
    heads: int,
    hidden: int,
    top_k: int,
    context_tokens: int,
    attention_values_per_token: int = 0,
    sequences: int = 1,
    kv_value_bytes: int = 4,
) -> dict[str, int]:
    """Bytes per term of an upper bound of the process's memory while it generates up to
    context_tokens (prompt included, prefilled in one pass).

    experts: the expert budget (all expert bytes when unbounded); backbone: the non-expert
    weights held in RAM; expert_slots: the cache's table size (layers x experts, twice with
    low-bit copies); kv_values_per_token: values the KV cache holds per token over all
    layers (2 x layers x kv_heads x head_dim for grouped-query attention, layers x
    (kv_lora_rank + qk_rope_head_dim) for multi-head latent attention's latents), of
    kv_value_bytes each (2: float16, 4: float32; 4 bounds either);
    attention_values_per_token: float32 values per prefilled token that one layer's attention
    holds besides the cache (multi-head latent attention's queries and outputs in the latent space);
    sequences: how many generations hold a KV cache at once (a decode batch), each prefilled alone.
    """
    T = int(context_tokens)
    kv_cap = -(-T // KVCache.CHUNK) * KVCache.CHUNK  # the cache grows in chunks of tokens
    return {
        "experts": int(experts),
        "backbone": int(backbone),
        "expert_entries": expert_slots * _core.ExpertCache.entry_overhead_bytes,
        "expert_blobs": expert_slots * BLOB_BOOKKEEPING_BYTES,
        "kv_cache": int(sequences) * kv_cap * kv_values_per_token * int(kv_value_bytes),
        "prefill_scores": 2 * heads * T * T * 4,  # probabilities and a temporary [heads, T, T]
        "moe_scratch": (top_k + 2) * T * hidden * 4,  # [T, K, H] slot outputs, gathered x, y
        "attention_scratch": T * attention_values_per_token * 4,
        "runtime": RUNTIME_OVERHEAD_BYTES,
    }
