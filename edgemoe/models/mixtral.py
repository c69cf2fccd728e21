"""Mixtral: softmax over all experts, top-k, always renormalized."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import DecoderConfig, DecoderLM, route_softmax_topk


def config_from_dict(d: dict[str, Any]) -> DecoderConfig:
    cfg = DecoderConfig.from_dict(d)
    cfg.norm_topk_prob = True  # Mixtral always renormalizes its top-k
    return cfg


class Model(DecoderLM):
    route_is_softmax_topk = True

    def route(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, normalize=True)
