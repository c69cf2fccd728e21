"""Qwen3-MoE: RMSNorm on q and k per head (before RoPE), an explicit head_dim, optional
attention biases; softmax -> top-k renormalized only with norm_topk_prob; MoE every
decoder_sparse_step layers except mlp_only_layers; no shared expert."""

from __future__ import annotations

import numpy as np

from .blocks import MoE, route_softmax_topk
from .checkpoint import ATTENTION, DENSE_MLP, GLU_ROLES, QK_NORM, QKV_BIAS, ROUTER, CheckpointLayout
from .decoder import DecoderConfig, DecoderLM

LAYOUT = CheckpointLayout(
    layer_tensors={**ATTENTION, **QKV_BIAS, **QK_NORM, **DENSE_MLP, **ROUTER},
    expert_roles=GLU_ROLES,
    intermediate_key="moe_intermediate_size",
    sparse_step=True,
    qk_norm=True,
    bias_key=("attention_bias", False),
)


class Model(DecoderLM):
    config_class = DecoderConfig
    qk_norm = "per_head"

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
