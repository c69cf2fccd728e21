"""Qwen2-MoE: softmax -> top-k, renormalized only with norm_topk_prob; a shared
expert scaled by sigmoid(shared_expert_gate(x)) is added to the routed output
(the shared expert and its gate are backbone weights, see DecoderLM._ffn)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import DecoderConfig, DecoderLM, route_softmax_topk


def config_from_dict(d: dict[str, Any]) -> DecoderConfig:
    return DecoderConfig.from_dict(d)


class Model(DecoderLM):
    route_is_softmax_topk = True

    def route(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
