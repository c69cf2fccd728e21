"""DeepSeek-V2 / V3 (and V2-Lite): multi-head latent attention (blocks.LatentAttention; the
KV cache holds one compressed latent per token), YaRN RoPE whose mscale_all_dim also scales
the softmax, dense MLPs in the first first_k_dense_replace layers, then MoE every
moe_layer_freq layers with n_shared_experts shared experts (one MLP beside the router).

Routing: V2 takes softmax scores, top-k over all experts ("greedy") or within the topk_group
groups holding the highest single score ("group_limited_greedy"); V3 ("noaux_tc") takes
sigmoid scores, ranks groups by the sum of their two best biased scores, picks the top k of
the biased scores within the chosen groups and weights them by the unbiased ones. Both scale
the weights by routed_scaling_factor, after renormalizing them when norm_topk_prob.
V2 renormalizes as DeepSeek's own code does (top-k > 1 and norm_topk_prob; transformers'
V2 never does, and no released V2 config asks for it), and MoE layers follow
moe_layer_freq as there (transformers assumes 1, as every released config says).

The fused native decode step does not serve this architecture (its attention is GQA): every
token takes the per-op path of DecoderLM.block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from ..errors import CheckpointError, ModelDirectoryError, UnsupportedConfigError
from .blocks import Attention, DenseMLP, KVCache, LatentAttention, MoE, SharedExpert, softmax, yarn_mscale
from .checkpoint import DENSE_MLP, GGUF_DENSE_MLP, GGUF_ROUTER, GLU_ROLES, CheckpointLayout, GGUFLayout
from .decoder import DecoderConfig, DecoderLM, Weights

MLA = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",  # without q_lora_rank
    "self_attn.q_a_proj.weight": "attn_q_a",
    "self_attn.q_a_proj.bias": "attn_q_a_bias",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm",
    "self_attn.q_b_proj.weight": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a",
    "self_attn.kv_a_proj_with_mqa.bias": "attn_kv_a_bias",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm",
    "self_attn.kv_b_proj.weight": "attn_kv_b",
    "self_attn.o_proj.weight": "attn_o",
    "self_attn.o_proj.bias": "attn_o_bias",
    "post_attention_layernorm.weight": "ffn_norm",
}
MOE = {
    "mlp.gate.weight": "ffn_router",
    "mlp.gate.e_score_correction_bias": "ffn_router_bias",  # V3's selection bias
    "mlp.shared_experts.gate_proj.weight": "ffn_shared_gate",
    "mlp.shared_experts.up_proj.weight": "ffn_shared_up",
    "mlp.shared_experts.down_proj.weight": "ffn_shared_down",
}
SHARED = ("ffn_shared_gate", "ffn_shared_up", "ffn_shared_down")


def _v3(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "deepseek_v3"


def _topk_method(config: dict[str, Any]) -> str:
    return str(config.get("topk_method") or ("noaux_tc" if _v3(config) else "greedy"))


@dataclasses.dataclass(frozen=True)
class Layout(CheckpointLayout):
    """MLA's tensors instead of q/k/v, and MoE layers from first_k_dense_replace on."""

    def attn_tensors(self, config: dict[str, Any]) -> list[str]:
        q = ["attn_q_a", "attn_q_a_norm", "attn_q_b"] if config.get("q_lora_rank") else ["attn_q"]
        names = ["attn_norm", *q, "attn_kv_a", "attn_kv_a_norm", "attn_kv_b", "attn_o", "ffn_norm"]
        if config.get("attention_bias"):
            names += ["attn_q_a_bias"] if config.get("q_lora_rank") else []
            names += ["attn_kv_a_bias", "attn_o_bias"]
        return names

    def moe_tensors(self, config: dict[str, Any]) -> list[str]:
        bias = ["ffn_router_bias"] if _topk_method(config) == "noaux_tc" else []
        shared = list(SHARED) if int(config.get("n_shared_experts") or 0) > 0 else []
        return ["ffn_router", *bias, *shared]

    def moe_layers(self, config: dict[str, Any], name: str) -> list[int]:
        first = int(config.get("first_k_dense_replace") or 0)
        step = int(config.get("moe_layer_freq") or 1)
        if self.num_experts(config, name) <= 0:
            return []
        return [i for i in range(int(config["num_hidden_layers"])) if i >= first and i % step == 0]


LAYOUT = Layout(
    layer_tensors={**MLA, **DENSE_MLP, **MOE},
    expert_roles=GLU_ROLES,
    intermediate_key="moe_intermediate_size",
    num_experts_keys=("n_routed_experts",),
    extra_layers_key="num_nextn_predict_layers",
)


# llama.cpp's deepseek2 (V2, V2-Lite, V3): MLA's tensors by its names; kv_b comes split per head as
# k_b [heads, rank, nope] (transposed) and v_b [heads, v_dim, rank] from its converter, whole from older ones
GGUF_MLA = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "attn_q",
    "attn_q_a.weight": "attn_q_a",
    "attn_q_a_norm.weight": "attn_q_a_norm",
    "attn_q_b.weight": "attn_q_b",
    "attn_kv_a_mqa.weight": "attn_kv_a",
    "attn_kv_a_norm.weight": "attn_kv_a_norm",
    "attn_kv_b.weight": "attn_kv_b",
    "attn_output.weight": "attn_o",
    "ffn_norm.weight": "ffn_norm",
    "exp_probs_b.bias": "ffn_router_bias",
    "ffn_gate_shexp.weight": "ffn_shared_gate",
    "ffn_up_shexp.weight": "ffn_shared_up",
    "ffn_down_shexp.weight": "ffn_shared_down",
}


def _kv_b_from_split(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """kv_b [heads * (nope + v_dim), rank] from llama.cpp's k_b [heads, rank, nope] and v_b [heads, v_dim, rank]."""
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])


def _gguf_config(meta: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The DeepSeek config keys from deepseek2.* metadata. llama.cpp keeps one YaRN temperature
    (yarn_log_multiplier = 0.1 * mscale_all_dim) and no separate mscale: its graph computes as if
    mscale == mscale_all_dim, which is what this config says."""

    def g(key: str, default: Any = None) -> Any:
        v = meta.get(f"deepseek2.{key}")
        return default if v is None else v

    rope = int(g("rope.dimension_count"))
    mla_key, mla_value = g("attention.key_length_mla"), g("attention.value_length_mla")
    key = int(mla_key if mla_key is not None else g("attention.key_length"))
    value = int(mla_value if mla_value is not None else g("attention.value_length"))
    sigmoid = int(g("expert_gating_func", 1)) == 2  # llama.cpp: 1 softmax, 2 sigmoid
    groups, kept = int(g("expert_group_count", 1)), int(g("expert_group_used_count", 1))
    q_rank = g("attention.q_lora_rank")
    cfg.update(
        model_type="deepseek_v3" if sigmoid else "deepseek_v2",
        qk_rope_head_dim=rope,
        qk_nope_head_dim=key - rope,
        v_head_dim=value,
        kv_lora_rank=int(g("attention.kv_lora_rank")),
        q_lora_rank=int(q_rank) if q_rank else None,
        first_k_dense_replace=int(g("leading_dense_block_count", 0)),
        n_shared_experts=int(g("expert_shared_count", 0)),
        routed_scaling_factor=float(g("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(g("expert_weights_norm", False)),
        scoring_func="sigmoid" if sigmoid else "softmax",
        topk_method="noaux_tc" if sigmoid else ("group_limited_greedy" if groups > 1 else "greedy"),
        n_group=groups,
        topk_group=kept,
    )
    theta = float(g("rope.freq_base", 10000.0))
    scaling = g("rope.scaling.type")
    if scaling in (None, "none"):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    elif scaling == "yarn":
        temperature = float(g("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        cfg["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": float(g("rope.scaling.factor")),
            "original_max_position_embeddings": int(g("rope.scaling.original_context_length")),
            "beta_fast": float(g("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(g("rope.scaling.yarn_beta_slow", 1.0)),
            "mscale": temperature,
            "mscale_all_dim": temperature,
        }
    else:
        raise CheckpointError(
            f"the GGUF file's RoPE is scaled as {scaling!r}; edgemoe runs DeepSeek with the default RoPE or "
            f"YaRN: use a GGUF of the model with one of them"
        )


GGUF = GGUFLayout(
    arch="deepseek2",
    model_type="deepseek_v2",
    tensors={**GGUF_MLA, **GGUF_DENSE_MLP, **GGUF_ROUTER},
    config_keys={"moe_intermediate_size": "expert_feed_forward_length"},
    experts_key="n_routed_experts",
    derive=_gguf_config,
    own_rope=True,
    merged={"attn_kv_b": (("attn_k_b.weight", "attn_v_b.weight"), _kv_b_from_split)},
)


@dataclasses.dataclass
class Config(DecoderConfig):
    kv_value_bytes: ClassVar[int] = 4  # the latent cache is read in numpy: float32

    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    intermediate_size: int = 0  # the dense layers' MLP
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    scoring: str = "softmax"  # or "sigmoid"
    topk_method: str = "greedy"  # "group_limited_greedy", "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    rope_interleave: bool = True
    softmax_scale: float = 1.0

    rope_types: ClassVar[tuple[str, ...]] = ("default", "yarn")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        get = cls._get
        if not isinstance(d, dict):
            raise ModelDirectoryError("the model config is not a JSON object: convert the model again")
        v3 = _v3(d)
        rope_dim = cls._int(d, "qk_rope_head_dim")
        heads = cls._int(d, "num_attention_heads")
        # the RoPE covers qk_rope_head_dim; one latent key head serves every query head
        fields = cls.fields_from_dict(
            {
                **d,
                "head_dim": rope_dim,
                "num_key_value_heads": heads,
                "num_experts": get(d, "n_routed_experts"),
                "norm_topk_prob": d.get("norm_topk_prob", v3),
            }
        )
        nope = cls._int(d, "qk_nope_head_dim", least=0)
        scale = (nope + rope_dim) ** -0.5
        scaling = fields["rope_scaling"]
        if scaling is not None and scaling.get("mscale_all_dim"):  # YaRN scales the whole q . k as well
            scale *= yarn_mscale(scaling["factor"], cls._float(scaling, "mscale_all_dim")) ** 2
        method = _topk_method(d)
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UnsupportedConfigError(f"DeepSeek routing topk_method '{method}' is not supported yet")
        scoring = str(d.get("scoring_func") or ("sigmoid" if v3 else "softmax"))
        if scoring not in ("softmax", "sigmoid"):
            raise UnsupportedConfigError(f"DeepSeek routing scoring_func '{scoring}' is not supported yet")
        E, k = int(fields["num_experts"]), int(fields["num_experts_per_tok"])
        groups = cls._int({"n_group": d.get("n_group") or 1}, "n_group")
        kept = cls._int({"topk_group": d.get("topk_group") or 1}, "topk_group")
        if method != "greedy" and (E % groups or not 1 <= kept <= groups or k > kept * (E // groups)):
            raise ModelDirectoryError(
                f"the model config routes top-{k} of {E} experts in {groups} groups keeping {kept} "
                f"(n_routed_experts, n_group, topk_group): the groups must split the experts evenly and "
                f"the kept ones hold at least top-k experts; the checkpoint's config.json is inconsistent"
            )
        q_rank = d.get("q_lora_rank")
        return cls(
            **fields,
            q_lora_rank=cls._int(d, "q_lora_rank") if q_rank else None,
            kv_lora_rank=cls._int(d, "kv_lora_rank"),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=cls._int(d, "v_head_dim"),
            intermediate_size=cls._int(d, "intermediate_size"),
            moe_intermediate_size=cls._int(d, "moe_intermediate_size"),
            n_shared_experts=cls._int(d, "n_shared_experts", 0, least=0),
            scoring=scoring,
            topk_method=method,
            n_group=groups,
            topk_group=kept,
            routed_scaling_factor=cls._float(d, "routed_scaling_factor", 1.0) or 1.0,
            # V2 pairs its rotary dims as (x0, x1), (x2, x3), ...; V3 does unless rope_interleave is false
            rope_interleave=bool(d.get("rope_interleave", True)) if v3 else True,
            softmax_scale=scale,
        )

    def kv_values_per_token(self) -> int:
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)  # the latent, not k and v

    def attention_values_per_token(self) -> int:
        # per head: q folded into the latent, attention's output there, and the expanded output
        width = self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_attention_heads * (2 * width + self.v_head_dim)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        H, heads, rank, rope = self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.qk_rope_head_dim
        q, q_rank = heads * (self.qk_nope_head_dim + rope), self.q_lora_rank or 0
        shared = self.n_shared_experts * self.moe_intermediate_size
        return {
            "attn_q": (q, H),
            "attn_q_a": (q_rank, H),
            "attn_q_a_bias": (q_rank,),
            "attn_q_a_norm": (q_rank,),
            "attn_q_b": (q, q_rank),
            "attn_kv_a": (rank + rope, H),
            "attn_kv_a_bias": (rank + rope,),
            "attn_kv_a_norm": (rank,),
            "attn_kv_b": (heads * (self.qk_nope_head_dim + self.v_head_dim), rank),
            "attn_o": (H, heads * self.v_head_dim),
            "attn_o_bias": (H,),
            "ffn_router_bias": (self.num_experts,),
            "ffn_shared_gate": (shared, H),
            "ffn_shared_up": (shared, H),
            "ffn_shared_down": (H, shared),
            "ffn_gate": (self.intermediate_size, H),
            "ffn_up": (self.intermediate_size, H),
            "ffn_down": (H, self.intermediate_size),
        }


class Model(DecoderLM):
    config_class = Config
    cfg: Config

    def build_attention(self, w: Weights, p: str, i: int) -> LatentAttention:
        cfg = self.cfg
        heads, nope, vd, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim
        kv_b = w.vec(p + "attn_kv_b").reshape(heads, nope + vd, cfg.kv_lora_rank)  # float32 as converted
        low_rank = cfg.q_lora_rank is not None
        return LatentAttention(
            norm=w.vec(p + "attn_norm"),
            q=None if low_rank else w.linear(p + "attn_q"),
            q_a=w.linear(p + "attn_q_a", p + "attn_q_a_bias") if low_rank else None,
            q_a_norm=w.vec(p + "attn_q_a_norm") if low_rank else None,
            q_b=w.linear(p + "attn_q_b") if low_rank else None,
            kv_a=w.linear(p + "attn_kv_a", p + "attn_kv_a_bias"),
            kv_a_norm=w.vec(p + "attn_kv_a_norm"),
            k_b=kv_b[:, :nope],  # views: each head's block is contiguous
            v_b=kv_b[:, nope:],
            o=w.linear(p + "attn_o", p + "attn_o_bias"),
            heads=heads,
            nope=nope,
            rope_dim=rope,
            scale=cfg.softmax_scale,
            rope_order=np.r_[0:rope:2, 1:rope:2] if cfg.rope_interleave else None,
        )

    def self_attention(
        self, a: Attention | LatentAttention, x: np.ndarray, layer: int, kv: KVCache, start: int
    ) -> np.ndarray:
        assert isinstance(a, LatentAttention)
        return a(x, self.rope, kv, layer, start, self.cfg.rms_norm_eps)

    def moe_block(self, w: Weights, prefix: str) -> MoE:
        shared = None
        if self.cfg.n_shared_experts > 0:  # transformers writes empty tensors for none
            shared = SharedExpert(DenseMLP(*(w.linear(prefix + n) for n in SHARED)))
        return MoE(w.linear(prefix + "ffn_router"), shared, w.opt_vec(prefix + "ffn_router_bias"))

    def new_kv_cache(self) -> KVCache:
        cfg = self.cfg  # one latent per token and layer: [c (kv_lora_rank), k_rope (qk_rope_head_dim)]
        return KVCache(cfg.num_hidden_layers, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, values=False)

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        T, E = router_logits.shape
        logits = router_logits.astype(np.float32)
        scores = 1 / (1 + np.exp(-logits)) if cfg.scoring == "sigmoid" else softmax(logits)  # [T, E]
        choice = scores if moe.score_bias is None else scores + moe.score_bias  # what ranks experts
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
            if cfg.topk_method == "noaux_tc":  # a group's two best
                group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
            else:
                group_scores = grouped.max(-1)
            groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]  # [T, topk_group]
            keep = np.zeros((T, cfg.n_group), bool)
            np.put_along_axis(keep, groups, True, axis=-1)
            masked = -np.inf if cfg.topk_method == "noaux_tc" else 0.0
            choice = np.where(np.repeat(keep, E // cfg.n_group, axis=-1), choice, np.float32(masked))
        ids = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]  # ffn_moe_topk [T, k]
        weights = np.take_along_axis(scores, ids, axis=-1)
        if cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.topk_method == "noaux_tc"):
            weights = weights / (weights.sum(-1, keepdims=True) + np.float32(1e-20))
        weights = weights * np.float32(cfg.routed_scaling_factor)
        return ids.astype(np.int32), np.ascontiguousarray(weights, dtype=np.float32)
