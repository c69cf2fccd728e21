"""Qwen3-MoE: RMSNorm on q and k per head (before RoPE), an explicit head_dim, optional
attention biases; softmax -> top-k renormalized only with norm_topk_prob; MoE every
decoder_sparse_step layers except mlp_only_layers; no shared expert."""

from __future__ import annotations

import numpy as np

from .blocks import MoE, route_softmax_topk
from .checkpoint import (
    ATTENTION,
    DENSE_MLP,
    GGUF_ATTENTION,
    GGUF_DENSE_MLP,
    GGUF_QK_NORM,
    GGUF_QKV_BIAS,
    GGUF_ROUTER,
    GLU_ROLES,
    QK_NORM,
    QKV_BIAS,
    ROUTER,
    CheckpointLayout,
    GGUFLayout,
)
from .decoder import DecoderConfig, DecoderLM

LAYOUT = CheckpointLayout(
    layer_tensors={**ATTENTION, **QKV_BIAS, **QK_NORM, **DENSE_MLP, **ROUTER},
    expert_roles=GLU_ROLES,
    intermediate_key="moe_intermediate_size",
    sparse_step=True,
    qk_norm=True,
    bias_key=("attention_bias", False),
)
GGUF = GGUFLayout(
    arch="qwen3moe",
    model_type="qwen3_moe",
    tensors={**GGUF_ATTENTION, **GGUF_QKV_BIAS, **GGUF_QK_NORM, **GGUF_DENSE_MLP, **GGUF_ROUTER},
    config_keys={"moe_intermediate_size": "expert_feed_forward_length"},
    fixed={"norm_topk_prob": True},  # llama.cpp's qwen3moe graph renormalizes the top-k weights
)


class Model(DecoderLM):
    config_class = DecoderConfig
    qk_norm = "per_head"

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
