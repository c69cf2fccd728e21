"""Mixtral: every layer MoE (`block_sparse_moe`), softmax over all experts, top-k, always
renormalized; experts w1/w3/w2 (gate/up/down). The fused native decode step serves it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .blocks import MoE, route_softmax_topk
from .checkpoint import ATTENTION, GGUF_ATTENTION, GGUF_ROUTER, CheckpointLayout, GGUFLayout
from .decoder import DecoderConfig, DecoderLM

LAYOUT = CheckpointLayout(
    layer_tensors={**ATTENTION, "block_sparse_moe.gate.weight": "ffn_router", "mlp.gate.weight": "ffn_router"},
    expert_roles={"w1": "gate", "w3": "up", "w2": "down"},
    intermediate_key="intermediate_size",
    moe_block="block_sparse_moe",
)
# llama.cpp stores Mixtral as "llama" with an expert count, q/k rows permuted for its interleaved RoPE
GGUF = GGUFLayout(
    arch="llama",
    model_type="mixtral",
    tensors={**GGUF_ATTENTION, **GGUF_ROUTER},
    rope_interleaved=True,
    experts_key="num_local_experts",
)


class Config(DecoderConfig):
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(**{**cls.fields_from_dict(d), "norm_topk_prob": True})  # Mixtral always renormalizes


class Model(DecoderLM):
    config_class = Config
    fused_decode = True

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, normalize=True)
