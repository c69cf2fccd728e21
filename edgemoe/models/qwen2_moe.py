"""Qwen2-MoE: q/k/v biases (qkv_bias), softmax -> top-k renormalized only with
norm_topk_prob, MoE every decoder_sparse_step layers except mlp_only_layers, and a shared
expert every token runs, scaled by sigmoid(shared_expert_gate x), added to the routed output."""

from __future__ import annotations

import numpy as np

from .blocks import DenseMLP, MoE, SharedExpert, route_softmax_topk
from .checkpoint import (
    ATTENTION,
    DENSE_MLP,
    GGUF_ATTENTION,
    GGUF_DENSE_MLP,
    GGUF_QKV_BIAS,
    GGUF_ROUTER,
    GLU_ROLES,
    QKV_BIAS,
    ROUTER,
    CheckpointLayout,
    GGUFLayout,
)
from .decoder import DecoderConfig, DecoderLM, Weights

SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj.weight": "ffn_shared_gate",
    "mlp.shared_expert.up_proj.weight": "ffn_shared_up",
    "mlp.shared_expert.down_proj.weight": "ffn_shared_down",
    "mlp.shared_expert_gate.weight": "ffn_shared_expert_gate",
}
# what model directories converted by earlier versions call the shared expert's sigmoid gate
OLD_SHARED_GATE = "ffn_shared_router"

LAYOUT = CheckpointLayout(
    layer_tensors={**ATTENTION, **QKV_BIAS, **DENSE_MLP, **SHARED_EXPERT, **ROUTER},
    expert_roles=GLU_ROLES,
    intermediate_key="moe_intermediate_size",
    sparse_step=True,
    bias_key=("qkv_bias", True),
    moe_extras=tuple(SHARED_EXPERT.values()),
    moe_extras_key="shared_expert_intermediate_size",
)
GGUF = GGUFLayout(
    arch="qwen2moe",
    model_type="qwen2_moe",
    tensors={
        **GGUF_ATTENTION,
        **GGUF_QKV_BIAS,
        **GGUF_DENSE_MLP,
        **GGUF_ROUTER,
        "ffn_gate_shexp.weight": "ffn_shared_gate",
        "ffn_up_shexp.weight": "ffn_shared_up",
        "ffn_down_shexp.weight": "ffn_shared_down",
        "ffn_gate_inp_shexp.weight": "ffn_shared_expert_gate",
    },
    config_keys={
        "moe_intermediate_size": "expert_feed_forward_length",
        "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    },
    fixed={"norm_topk_prob": False},  # llama.cpp's qwen2moe graph does not renormalize the top-k weights
    row_vectors=("ffn_shared_expert_gate",),
)


class Model(DecoderLM):
    config_class = DecoderConfig

    def moe_block(self, w: Weights, prefix: str) -> MoE:
        shared = None
        if prefix + "ffn_shared_gate" in w:
            mlp = DenseMLP(
                w.linear(prefix + "ffn_shared_gate"),
                w.linear(prefix + "ffn_shared_up"),
                w.linear(prefix + "ffn_shared_down"),
            )
            gate = w.opt_linear(prefix + "ffn_shared_expert_gate") or w.opt_linear(prefix + OLD_SHARED_GATE)
            shared = SharedExpert(mlp, gate)
        return MoE(w.linear(prefix + "ffn_router"), shared)

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
