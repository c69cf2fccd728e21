"""OLMoE: RMSNorm on the whole q and k projections (before the head split),
optional clip_qkv; softmax -> top-k with norm_topk_prob false by default."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import DecoderConfig, DecoderLM, route_softmax_topk


def config_from_dict(d: dict[str, Any]) -> DecoderConfig:
    d = dict(d)
    d.setdefault("norm_topk_prob", False)
    return DecoderConfig.from_dict(d)


class Model(DecoderLM):
    route_is_softmax_topk = True

    def route(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return route_softmax_topk(router_logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
