"""Granite-MoE (transformers' GraniteMoeForCausalLM) and Granite-MoE with a shared expert
(GraniteMoeSharedForCausalLM): Llama attention, every layer MoE, top-k of the router logits
softmaxed among themselves (softmax -> top-k renormalized), and four scalars from the config:

- embedding_multiplier scales the token embeddings;
- residual_multiplier scales what attention and the feed-forward add to the residual stream;
- attention_multiplier is the softmax scale of q . k (instead of 1/sqrt(head_dim));
- logits_scaling divides the logits.

Experts come fused as `block_sparse_moe.input_linear` [E, 2I, H] (gate rows first) and
`output_linear` [E, H, I]; the shared expert (shared_intermediate_size > 0) as
`shared_mlp.input_linear` [2S, H] and `output_linear` [H, S], kept as one gate_up matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .blocks import GateUpMLP, KVCache, MoE, SharedExpert, route_softmax_topk
from .checkpoint import (
    ATTENTION,
    FUSED_EXPERTS,
    GGUF_ATTENTION,
    GGUF_QKV_BIAS,
    GGUF_ROUTER,
    GLU_ROLES,
    QKV_BIAS,
    CheckpointLayout,
    GGUFLayout,
)
from .decoder import DecoderConfig, DecoderLM, Weights

SHARED = {
    "shared_mlp.input_linear.weight": "ffn_shared_gate_up",
    "shared_mlp.output_linear.weight": "ffn_shared_down",
}


@dataclasses.dataclass(frozen=True)
class Layout(CheckpointLayout):
    """attention_bias puts a bias on o as well as on q, k and v (Llama attention)."""

    def attn_tensors(self, config: dict[str, Any]) -> list[str]:
        names = super().attn_tensors(config)
        return names + (["attn_o_bias"] if config.get("attention_bias", False) else [])


LAYOUT = Layout(
    layer_tensors={
        **ATTENTION,
        **QKV_BIAS,
        "self_attn.o_proj.bias": "attn_o_bias",
        "block_sparse_moe.router.layer.weight": "ffn_router",
        **SHARED,
    },
    expert_roles=GLU_ROLES,
    intermediate_key="intermediate_size",
    num_experts_keys=("num_local_experts",),
    moe_block="block_sparse_moe",
    bias_key=("attention_bias", False),
    moe_extras=tuple(SHARED.values()),
    moe_extras_key="shared_intermediate_size",
    fused_experts={"input_linear.weight": "gate_up", "output_linear.weight": "down", **FUSED_EXPERTS},
)


def _gguf_config(meta: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The four multipliers from granitemoe.* metadata (llama.cpp calls them scales), and which
    of the two models the file holds."""

    def g(key: str, default: float) -> float:
        v = meta.get(f"granitemoe.{key}")
        return default if v is None else float(v)

    shared = int(meta.get("granitemoe.expert_shared_feed_forward_length") or 0)
    cfg.update(
        model_type="granitemoeshared" if shared else "granitemoe",
        num_local_experts=cfg["num_experts"],
        shared_intermediate_size=shared,
        embedding_multiplier=g("embedding_scale", 1.0),
        residual_multiplier=g("residual_scale", 1.0),
        attention_multiplier=g("attention.scale", 1.0),
        logits_scaling=g("logit_scale", 1.0),
    )


# llama.cpp's converter splits the shared expert's gate_up into ffn_gate_shexp and ffn_up_shexp
# and permutes q/k rows for its interleaved RoPE, as for llama
GGUF = GGUFLayout(
    arch="granitemoe",
    model_type="granitemoe",
    tensors={
        **GGUF_ATTENTION,
        **GGUF_QKV_BIAS,
        "attn_output.bias": "attn_o_bias",
        **GGUF_ROUTER,
        "ffn_down_shexp.weight": "ffn_shared_down",
    },
    rope_interleaved=True,
    derive=_gguf_config,
    merged={
        "ffn_shared_gate_up": (
            ("ffn_gate_shexp.weight", "ffn_up_shexp.weight"),
            lambda gate, up: np.concatenate([gate, up]),
        ),
    },
)


@dataclasses.dataclass
class Config(DecoderConfig):
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0
    shared_intermediate_size: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        # the router's softmax runs over the top-k logits alone: softmax -> top-k, renormalized
        fields = cls.fields_from_dict({**d, "num_experts": cls._get(d, "num_local_experts"), "norm_topk_prob": True})
        return cls(
            **fields,
            embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(d.get("residual_multiplier", 1.0)),
            attention_multiplier=float(d.get("attention_multiplier", 1.0)),
            logits_scaling=float(d.get("logits_scaling", 1.0)),
            shared_intermediate_size=int(d.get("shared_intermediate_size") or 0),
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        H = self.hidden_size
        return {"attn_o_bias": (H,), "ffn_shared_gate_up": (2 * self.shared_intermediate_size, H)}


class Model(DecoderLM):
    config_class = Config
    cfg: Config

    def attention_scale(self) -> float | None:
        return self.cfg.attention_multiplier

    def moe_block(self, w: Weights, prefix: str) -> MoE:
        shared = None
        if prefix + "ffn_shared_gate_up" in w:
            mlp = GateUpMLP(w.linear(prefix + "ffn_shared_gate_up"), w.linear(prefix + "ffn_shared_down"))
            shared = SharedExpert(mlp)
        return MoE(w.linear(prefix + "ffn_router"), shared)

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, normalize=True)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        h = super().embed_tokens(ids)
        h *= np.float32(self.cfg.embedding_multiplier)
        return h

    def block(self, i: int, h: np.ndarray, kv: KVCache, start: int) -> np.ndarray:
        L, r = self.layers[i], np.float32(self.cfg.residual_multiplier)
        h = h + r * self.self_attention(L.attn, self.normalize(h, L.attn.norm), i, kv, start)
        return h + r * self._ffn(L, self.normalize(h, L.ffn_norm), h)

    def head(self, h: np.ndarray) -> np.ndarray:
        logits = super().head(h)
        logits /= np.float32(self.cfg.logits_scaling)
        return logits
