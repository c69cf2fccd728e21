"""Phi-3.5-MoE (transformers' PhimoeForCausalLM): Mixtral's layout (`block_sparse_moe`, experts
w1/w3/w2) with LayerNorms that carry a bias, optional attention biases (q, k, v and o) and an
lm_head bias, LongRoPE, and sparse-mixer routing.

Sparse mixer (inference): the first expert is the router's argmax, weighted by the softmax of the
logits close enough to the top one; the second is the argmax of the rest, weighted by the softmax
of the rest's logits close enough to it. "Close enough": (top - logit) / max(|logit|, top) at most
2 * router_jitter_noise. So it picks exactly two experts whatever num_experts_per_tok says, and
the two weights do not sum to one.

LongRoPE (blocks.Rope): a sequence within the original context (original_max_position_embeddings)
rotates with the short factors and short_mscale, a longer one with the long factors and long_mscale
at every position, so the step that takes a generation past it computes the cached positions again
(DecoderLM.forward), as transformers' Phi-MoE drops its cache there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelDirectoryError
from .blocks import MoE
from .checkpoint import ATTENTION, ATTENTION_TENSORS, GLOBAL, QKV_BIAS, CheckpointLayout
from .decoder import DecoderConfig, DecoderLM

NORM_BIAS = {"input_layernorm.bias": "attn_norm_bias", "post_attention_layernorm.bias": "ffn_norm_bias"}
O_BIAS = {"self_attn.o_proj.bias": "attn_o_bias"}


@dataclasses.dataclass(frozen=True)
class Layout(CheckpointLayout):
    """The LayerNorms' biases in every layer, and q/k/v/o biases with attention_bias."""

    def attn_tensors(self, config: dict[str, Any]) -> list[str]:
        names = [*ATTENTION_TENSORS, "attn_norm_bias", "ffn_norm_bias"]
        if config.get("attention_bias", False):
            names += ["attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_o_bias"]
        return names


LAYOUT = Layout(
    layer_tensors={**ATTENTION, **NORM_BIAS, **QKV_BIAS, **O_BIAS, "block_sparse_moe.gate.weight": "ffn_router"},
    expert_roles={"w1": "gate", "w3": "up", "w2": "down"},
    intermediate_key="intermediate_size",
    num_experts_keys=("num_local_experts",),
    moe_block="block_sparse_moe",
    global_tensors={**GLOBAL, "model.norm.bias": "output_norm_bias", "lm_head.bias": "output_bias"},
    global_required_by={"output_norm_bias": (None, True), "output_bias": ("lm_head_bias", False)},
)


@dataclasses.dataclass
class Config(DecoderConfig):
    router_jitter_noise: float = 0.01  # the sparse mixer's threshold is twice this

    rope_types: ClassVar[tuple[str, ...]] = ("default", "longrope")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = {**d, "rms_norm_eps": d.get("rms_norm_eps", 1e-5), "num_experts": cls._get(d, "num_local_experts")}
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if rope and d.get("original_max_position_embeddings"):  # Phi-3 configs keep it at the top level
            d["rope_parameters"] = {"original_max_position_embeddings": d["original_max_position_embeddings"], **rope}
        fields = cls.fields_from_dict(d)
        if fields["num_experts_per_tok"] != 2:
            raise ModelDirectoryError(
                f"the model config routes to {fields['num_experts_per_tok']} experts (num_experts_per_tok), but "
                f"Phi-MoE's sparse-mixer routing always picks two: the checkpoint's config.json is inconsistent"
            )
        if fields["sliding_window"] and not fields["layer_types"]:  # transformers masks every layer then
            fields["layer_types"] = ["sliding_attention"] * fields["num_hidden_layers"]
        return cls(**fields, router_jitter_noise=float(d.get("router_jitter_noise") or 0.0))

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        H = self.hidden_size
        return {
            "attn_norm_bias": (H,),
            "ffn_norm_bias": (H,),
            "attn_o_bias": (H,),
            "output_norm_bias": (H,),
            "output_bias": (self.vocab_size,),
        }


def _close_softmax(scores: np.ndarray, candidates: np.ndarray, top: np.ndarray, eps: float) -> np.ndarray:
    """softmax over the candidate logits within the sparse mixer's threshold of `top` [T, 1],
    the others masked out: [T, E]."""
    factor = np.maximum(np.abs(scores), top)
    far = (top - scores) / factor > np.float32(2 * eps)
    masked = np.where(far, np.float32(-np.inf), candidates)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sparse_mixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Phi-MoE's routing at inference: router logits [T, E] -> (ids int32 [T, 2], weights float32 [T, 2])."""
    scores = logits.astype(np.float32)
    first = scores.argmax(-1)[:, None]  # [T, 1]; the lower id on a tie
    top = np.take_along_axis(scores, first, -1)
    w1 = np.take_along_axis(_close_softmax(scores, scores, top, eps), first, -1)
    rest = scores.copy()
    np.put_along_axis(rest, first, np.float32(-np.inf), -1)
    second = rest.argmax(-1)[:, None]
    top2 = np.take_along_axis(rest, second, -1)
    w2 = np.take_along_axis(_close_softmax(scores, rest, top2, eps), second, -1)
    ids = np.concatenate([first, second], -1).astype(np.int32)  # ffn_moe_topk [T, 2]
    return ids, np.ascontiguousarray(np.concatenate([w1, w2], -1), dtype=np.float32)


class Model(DecoderLM):
    config_class = Config
    cfg: Config
    layer_norm = True

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        return sparse_mixer(router_logits, self.cfg.router_jitter_noise)
