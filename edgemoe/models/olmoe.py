"""OLMoE: RMSNorm on the whole q and k projections (before the head split), optional
clip_qkv and attention biases; softmax -> top-k with norm_topk_prob false by default;
every layer MoE."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .blocks import MoE, route_softmax_topk
from .checkpoint import (
    ATTENTION,
    GGUF_ATTENTION,
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
    layer_tensors={**ATTENTION, **QKV_BIAS, **QK_NORM, **ROUTER},
    expert_roles=GLU_ROLES,
    intermediate_key="intermediate_size",
    qk_norm=True,
    bias_key=("attention_bias", False),
)
# llama.cpp's olmoe graph keeps the softmax top-k weights as they are and clips nothing
GGUF = GGUFLayout(
    arch="olmoe",
    model_type="olmoe",
    tensors={**GGUF_ATTENTION, **GGUF_QKV_BIAS, **GGUF_QK_NORM, **GGUF_ROUTER},
    fixed={"norm_topk_prob": False, "clip_qkv": None},
)


@dataclasses.dataclass
class Config(DecoderConfig):
    clip_qkv: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        fields = cls.fields_from_dict({**d, "norm_topk_prob": d.get("norm_topk_prob", False)})
        clip = d.get("clip_qkv")
        return cls(**fields, clip_qkv=None if clip is None else cls._float(d, "clip_qkv"))


class Model(DecoderLM):
    config_class = Config
    qk_norm = "full"

    def clip_qkv(self) -> float | None:
        return self.cfg.clip_qkv  # type: ignore[attr-defined]

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
