"""gpt-oss: grouped-query attention with q/k/v/o biases and a learned sink per head (one more
logit in each softmax's denominator), sliding-window and full layers alternating (layer_types),
YaRN RoPE; every layer MoE, the router with a bias, top-k of its logits, then softmax over those k.

Experts are fused in the checkpoint: gate_up [E, H, 2I] with gate and up rows interleaved and a
bias, down [E, I, H] with a bias (the converter splits, transposes and keeps the biases in each
expert blob), or MXFP4 blocks and scales as released (decoded to bf16 exactly). An expert is the
clamped SwiGLU: g = min(gate x + bg, limit), u = clamp(up x + bu, -limit, limit),
down((u + 1) * g * sigmoid(alpha * g)) + bd, computed natively from the blob (docs/format.md).

The fused native decode step does not serve this architecture (attention biases and sinks).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, ClassVar

import numpy as np

from ..errors import CheckpointError
from ..format.quant import ACT_CLAMPED_SWIGLU
from .blocks import MoE, softmax, yarn_mscale
from .checkpoint import (
    ATTENTION,
    GGUF_ATTENTION,
    GGUF_QKV_BIAS,
    GGUF_ROUTER,
    QKV_BIAS,
    CheckpointLayout,
    GGUFLayout,
)
from .decoder import DecoderConfig, DecoderLM, Weights

LAYER_TENSORS = {
    **ATTENTION,
    **QKV_BIAS,
    "self_attn.o_proj.bias": "attn_o_bias",
    "self_attn.sinks": "attn_sinks",
    "mlp.router.weight": "ffn_router",
    "mlp.router.bias": "ffn_router_bias",
}
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # transformers' defaults; released configs give the limit only


@dataclasses.dataclass(frozen=True)
class Layout(CheckpointLayout):
    """Attention with biases and sinks, a router with a bias, experts with biases and the clamped SwiGLU."""

    def attn_tensors(self, config: dict[str, Any]) -> list[str]:
        biases = (
            ["attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_o_bias"] if config.get("attention_bias", True) else []
        )
        return [*super().attn_tensors(config), *biases, "attn_sinks"]

    def moe_tensors(self, config: dict[str, Any]) -> list[str]:
        return ["ffn_router", "ffn_router_bias"]

    def expert_activation(self, config: dict[str, Any]) -> tuple[int, float, float]:
        alpha, limit = config.get("swiglu_alpha"), config.get("swiglu_limit")
        return (
            ACT_CLAMPED_SWIGLU,
            float(SWIGLU_ALPHA if alpha is None else alpha),
            float(SWIGLU_LIMIT if limit is None else limit),
        )


LAYOUT = Layout(
    layer_tensors=LAYER_TENSORS,
    expert_roles={},  # experts come fused only
    intermediate_key="intermediate_size",
    num_experts_keys=("num_local_experts",),
    fused_transposed=True,
    gate_up_interleaved=True,
    expert_biases=True,
)


# what llama.cpp runs for a gpt-oss file's YaRN whatever its metadata says: the defaults of its
# hparams (the gpt-oss loader reads no yarn_* key) and a full ramp (yarn_ext_factor 1)
GGUF_YARN_FIXED = {"yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_ext_factor": 1.0}


def _gguf_rope(metadata: dict[str, Any], config: dict[str, Any]) -> None:
    """rope_parameters from gpt-oss.rope.* as llama.cpp computes them: YaRN with its correction range
    rounded out to whole dimensions (ggml_rope_yarn_corr_dims; the file does not carry transformers'
    `truncate`, which released gpt-oss configs set to false) and cos and sin scaled by
    0.1 ln(factor) + 1 times rope.scaling.attn_factor (llama_context replaces the file's
    yarn_attn_factor by that)."""

    def g(key: str) -> Any:
        return metadata.get(f"gpt-oss.{key}")

    theta = float(g("rope.freq_base") or 10000.0)
    scaling = g("rope.scaling.type")
    factor = g("rope.scaling.factor")
    if scaling in (None, "none") or (scaling == "linear" and factor in (None, 1.0)):
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        return
    if scaling != "yarn" or factor is None or g("rope.scaling.original_context_length") is None:
        raise CheckpointError(
            f"the GGUF file's RoPE is scaled as {scaling!r} (factor {factor}); edgemoe runs gpt-oss with the "
            f"default RoPE or YaRN with a factor and an original context length: convert the model's "
            f"Hugging Face checkpoint instead"
        )
    factor = float(factor)
    attention_factor = yarn_mscale(factor) * float(g("rope.scaling.attn_factor") or 1.0)
    for key, used in {**GGUF_YARN_FIXED, "yarn_attn_factor": attention_factor}.items():
        said = g(f"rope.scaling.{key}")
        if said is not None and not math.isclose(float(said), used, rel_tol=1e-6):
            print(
                f"edgemoe convert: warning: the GGUF file says rope.scaling.{key} = {said}; llama.cpp's gpt-oss "
                f"graph runs {used:.6g} whatever the file says, and so does this conversion",
                file=sys.stderr,
            )
    config["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": int(g("rope.scaling.original_context_length")),
        "beta_fast": GGUF_YARN_FIXED["yarn_beta_fast"],
        "beta_slow": GGUF_YARN_FIXED["yarn_beta_slow"],
        "truncate": True,
        "attention_factor": attention_factor,
    }


def _gguf_derive(metadata: dict[str, Any], config: dict[str, Any]) -> None:
    # llama.cpp's gpt-oss graph: sliding-window attention on even layers (its SWA pattern of 2)
    n = int(config.get("num_hidden_layers") or 0)
    config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    _gguf_rope(metadata, config)


GGUF = GGUFLayout(
    arch="gpt-oss",
    model_type="gpt_oss",
    tensors={
        **{k: v for k, v in GGUF_ATTENTION.items() if v != "ffn_norm"},
        "post_attention_norm.weight": "ffn_norm",
        **GGUF_QKV_BIAS,
        "attn_output.bias": "attn_o_bias",
        "attn_sinks.weight": "attn_sinks",
        **GGUF_ROUTER,
        "ffn_gate_inp.bias": "ffn_router_bias",
    },
    config_keys={"intermediate_size": "expert_feed_forward_length", "sliding_window": "attention.sliding_window"},
    experts_key="num_local_experts",
    # llama.cpp's swiglu_oai fixes gpt-oss's alpha and limit instead of reading them
    fixed={"swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT},
    derive=_gguf_derive,
    own_rope=True,
)


@dataclasses.dataclass
class Config(DecoderConfig):
    rope_types: ClassVar[tuple[str, ...]] = ("default", "yarn")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        # gpt-oss picks top-k of the logits and softmaxes those k: normalized weights by construction
        fields = cls.fields_from_dict({**d, "num_experts": cls._get(d, "num_local_experts")})
        return cls(**{**fields, "norm_topk_prob": True})

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "attn_o_bias": (self.hidden_size,),
            "attn_sinks": (self.num_attention_heads,),
            "ffn_router_bias": (self.num_experts,),
        }


class Model(DecoderLM):
    config_class = Config

    def moe_block(self, w: Weights, prefix: str) -> MoE:
        return MoE(w.linear(prefix + "ffn_router", prefix + "ffn_router_bias"))

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        k = self.cfg.num_experts_per_tok
        logits = router_logits.astype(np.float32)  # the router's bias is in them
        ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # ffn_moe_topk [T, k], lower id first on a tie
        weights = softmax(np.take_along_axis(logits, ids, axis=-1))  # over the k chosen logits only
        return ids.astype(np.int32), np.ascontiguousarray(weights, dtype=np.float32)
