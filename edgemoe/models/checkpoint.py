"""How a Hugging Face checkpoint's tensor names map to edgemoe's canonical names
(docs/format.md): the shared name tables architecture files combine, and the
`CheckpointLayout` each architecture declares. The converter (edgemoe.converters.hf)
reads checkpoints through it; nothing here reads a file."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError

# per-layer tensors: HF name after "model.layers.L." -> canonical name after "layers.L."
ATTENTION = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_o",
    "post_attention_layernorm.weight": "ffn_norm",
}
QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q_bias",
    "self_attn.k_proj.bias": "attn_k_bias",
    "self_attn.v_proj.bias": "attn_v_bias",
}
QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm"}
DENSE_MLP = {"mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
ROUTER = {"mlp.gate.weight": "ffn_router"}
# model-level tensors
GLOBAL = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
# fused 3D experts: name after "<moe_block>." -> "gate_up" [E, 2I, H] (gate rows first) or "down" [E, H, I]
FUSED_EXPERTS = {
    "experts.gate_up_proj": "gate_up",
    "experts.gate_up_proj.weight": "gate_up",
    "experts.down_proj": "down",
    "experts.down_proj.weight": "down",
}
# HF names of the per-layer tensors of a decoder stack, and of one expert's projections in them
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
PER_EXPERT_NAME = re.compile(r"^(\w+)\.experts\.(\d+)\.(\w+)\.weight$")
# per-expert projection names -> role
GLU_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# transformers 5 writes qwen3_moe's count as num_local_experts; released checkpoints say num_experts
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")
ATTENTION_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm"]
DENSE_MLP_TENSORS = ["ffn_gate", "ffn_up", "ffn_down"]

# The quantization policy of the backbone: per-layer roles whose matrices `--backbone-bits` may
# group-quantize, besides the output head. Routers, embeddings, norms and biases keep the
# checkpoint's precision, and so do multi-head latent attention's kv_a (its one latent feeds
# every head's keys and values: at 8 bits it raised the tiny DeepSeek models' median KL 6-fold)
# and kv_b (read as float to fold it into the queries and outputs).
QUANTIZABLE = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "cross_q",
    "cross_k",
    "cross_v",
    "cross_o",
    "attn_q_a",
    "attn_q_b",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "ffn_shared_gate",
    "ffn_shared_up",
    "ffn_shared_down",
    "ffn_shared_gate_up",
)


# Per-layer roles the converter stores as float32 whatever the checkpoint's float dtype: the
# runtime computes with them in numpy (multi-head latent attention's kv_b, folded into the
# queries and outputs), so a 16-bit copy would be widened at every load.
FLOAT32_ROLES = ("attn_kv_b",)


def float32_role(name: str) -> bool:
    """Whether the converter stores canonical backbone tensor `name` as float32 (FLOAT32_ROLES)."""
    return name.startswith("layers.") and name.split(".")[-1] in FLOAT32_ROLES


def quantized_role(name: str) -> bool:
    """Whether the policy quantizes canonical backbone tensor `name` (a QUANTIZABLE role or the output head)."""
    role = name.split(".")[-1] if name.startswith("layers.") else name
    return role in QUANTIZABLE or name == "output"


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether the converter group-quantizes backbone tensor `name` (canonical) of this shape:
    a matrix of a quantized role whose columns split into groups."""
    return quantized_role(name) and len(shape) == 2 and min(shape) > 0 and shape[1] % group_size == 0


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Where an architecture's weights sit in a Hugging Face checkpoint.

    Experts are found in either layout seen in the wild: one tensor per expert
    (`<moe_block>.experts.E.<proj>.weight`, proj a key of expert_roles) or fused 3D
    (`<moe_block>.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I]).
    """

    layer_tensors: dict[str, str]  # HF name after "model.layers.L." -> canonical after "layers.L."
    expert_roles: dict[str, str]  # per-expert projection name -> gate/up/down
    intermediate_key: str  # config key of one expert's intermediate size
    num_experts_keys: tuple[str, ...] = EXPERT_COUNT_KEYS  # first present wins
    moe_block: str = "mlp"  # module holding router + experts in HF names
    sparse_step: bool = False  # honours decoder_sparse_step / mlp_only_layers
    qk_norm: bool = False
    bias_key: tuple[str, bool] | None = None  # config key switching q/k/v biases on, and its default
    # canonical names of the extra backbone tensors an MoE layer of this config has (a shared expert)
    moe_extras: tuple[str, ...] = ()
    moe_extras_key: str | None = None  # config key whose value > 0 means the extras are there
    # config key counting layers after num_hidden_layers that checkpoints carry and generation
    # does not use (DeepSeek-V3's multi-token prediction): the converter leaves them out
    extra_layers_key: str | None = None
    # the fused 3D expert tensors' names after "<moe_block>." (Granite: input_linear, output_linear)
    fused_experts: dict[str, str] = dataclasses.field(default_factory=lambda: dict(FUSED_EXPERTS))
    # fused experts stored [E, in, out] (gpt-oss: gate_up [E, H, 2I], down [E, I, H]); None: told by
    # shape, which cannot tell a square down_proj's orientation
    fused_transposed: bool | None = None
    # the fused gate_up's rows alternate gate, up, gate, up... (gpt-oss) instead of all gate, then all up
    gate_up_interleaved: bool = False
    # experts carry biases (`experts.gate_up_proj_bias` [E, 2I], `experts.down_proj_bias` [E, H])
    expert_biases: bool = False
    # model-level tensors: HF name -> canonical name, or None for a copy the converter skips
    global_tensors: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(GLOBAL))
    # model-level tensors beyond the embeddings, the final norm and the head that a config makes
    # required: canonical -> (config key, its default), key None: always (Phi-MoE's norm and head biases)
    global_required_by: dict[str, tuple[str | None, bool]] = dataclasses.field(default_factory=dict)
    # experts are gated (gate, up, down) or, when False, ReLU (up, down: Switch Transformers)
    glu: bool = True
    # config keys of the layer count, the hidden size and the routed experts per token
    num_layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    top_k_key: str = "num_experts_per_tok"

    def expert_activation(self, config: dict[str, Any]) -> tuple[int, float, float]:
        """(activation, alpha, limit) of the expert blobs (format.quant.Glu): SwiGLU unless the
        architecture says otherwise."""
        return (0, 1.0, 0.0)

    def expert_role_order(self) -> tuple[str, ...]:
        """The roles of an expert's matrices in the order its blob stores them (docs/format.md)."""
        return ("gate", "up", "down") if self.glu else ("up", "down")

    def locate(self, name: str, config: dict[str, Any]) -> tuple[int, str] | None:
        """(layer, name within the layer) of a per-layer HF tensor, None for any other."""
        m = LAYER_NAME.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def hf_layer_name(self, layer: int, rest: str, config: dict[str, Any]) -> str:
        """The HF name of tensor `rest` of layer `layer` (locate's inverse), for error messages."""
        return f"model.layers.{layer}.{rest}"

    def match_expert(self, rest: str) -> tuple[int, str] | None:
        """(expert, projection) of a per-expert tensor named `rest` within its layer, or None."""
        e = PER_EXPERT_NAME.match(rest)
        if e and e.group(1) in (self.moe_block, "mlp") and e.group(3) in self.expert_roles:
            return int(e.group(2)), e.group(3)
        return None

    def tied(self, config: dict[str, Any]) -> bool:
        """Whether the output head is the embedding table (no lm_head in the checkpoint)."""
        return bool(config.get("tie_word_embeddings", False))

    def required_globals(self, config: dict[str, Any]) -> list[str]:
        """Canonical model-level tensors a checkpoint of this config must hold."""
        extra = [c for c, (key, default) in self.global_required_by.items() if key is None or config.get(key, default)]
        return ["tok_embeddings", "output_norm"] + ([] if self.tied(config) else ["output"]) + extra

    def top_k(self, config: dict[str, Any], name: str) -> int:
        """Routed experts per token."""
        if config.get(self.top_k_key) is None:
            raise CheckpointError(
                f"config.json of this {name} checkpoint has no {self.top_k_key!r}: download config.json again"
            )
        return int(config[self.top_k_key])

    def num_layers(self, config: dict[str, Any]) -> int:
        """Layers of the model, numbered as canonical names and the experts file number them."""
        return int(config[self.num_layers_key])

    def extra_layers(self, config: dict[str, Any]) -> int:
        return int(config.get(self.extra_layers_key) or 0) if self.extra_layers_key else 0

    def attn_tensors(self, config: dict[str, Any]) -> list[str]:
        """Canonical per-layer attention tensors this config requires."""
        names = list(ATTENTION_TENSORS)
        if self.qk_norm:
            names += ["attn_q_norm", "attn_k_norm"]
        if self.bias_key and config.get(self.bias_key[0], self.bias_key[1]):
            names += ["attn_q_bias", "attn_k_bias", "attn_v_bias"]
        return names

    def moe_tensors(self, config: dict[str, Any]) -> list[str]:
        """Canonical backbone tensors an MoE layer of this config requires."""
        extras = self.moe_extras if self.moe_extras_key and int(config.get(self.moe_extras_key) or 0) > 0 else ()
        return ["ffn_router", *extras]

    def layer_tensor_names(self, config: dict[str, Any], moe: bool, layer: int = 0) -> list[str]:
        """Canonical backbone tensors (after "layers.N.") of an MoE or a dense layer of this config
        (layer: its index, for architectures whose layers differ by more than that)."""
        return self.attn_tensors(config) + (self.moe_tensors(config) if moe else list(DENSE_MLP_TENSORS))

    def num_experts(self, config: dict[str, Any], name: str) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                return int(config[key])
        raise CheckpointError(
            f"config.json of this {name} checkpoint has none of "
            f"{', '.join(map(repr, self.num_experts_keys))}: download config.json again"
        )

    def moe_layers(self, config: dict[str, Any], name: str) -> list[int]:
        n = self.num_layers(config)
        if not self.sparse_step:
            return list(range(n))
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        if self.num_experts(config, name) <= 0:
            return []
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


# ---------------------------------------------------------------- GGUF (llama.cpp's files)

# per-layer tensors: GGUF name after "blk.L." -> canonical name after "layers.L."
GGUF_ATTENTION = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "attn_q",
    "attn_k.weight": "attn_k",
    "attn_v.weight": "attn_v",
    "attn_output.weight": "attn_o",
    "ffn_norm.weight": "ffn_norm",
}
GGUF_QKV_BIAS = {"attn_q.bias": "attn_q_bias", "attn_k.bias": "attn_k_bias", "attn_v.bias": "attn_v_bias"}
GGUF_QK_NORM = {"attn_q_norm.weight": "attn_q_norm", "attn_k_norm.weight": "attn_k_norm"}
GGUF_DENSE_MLP = {"ffn_gate.weight": "ffn_gate", "ffn_up.weight": "ffn_up", "ffn_down.weight": "ffn_down"}
GGUF_ROUTER = {"ffn_gate_inp.weight": "ffn_router"}
GGUF_GLOBAL = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "output_norm", "output.weight": "output"}
# the experts of a layer, stacked: [E, I, H] for gate and up, [E, H, I] for down (expert outermost)
GGUF_EXPERTS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
# HF config key -> GGUF metadata key after "<arch>.", read by every architecture
GGUF_CONFIG = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "num_experts_per_tok": "expert_used_count",
    "max_position_embeddings": "context_length",
    "intermediate_size": "feed_forward_length",
}


@dataclasses.dataclass(frozen=True)
class GGUFLayout:
    """Where an architecture's weights and settings sit in a GGUF file written by llama.cpp's
    convert_hf_to_gguf.py (metadata keys `<arch>.*`, tensors `blk.L.*`).

    `config` turns the metadata into the Hugging Face config the architecture file reads
    (DecoderConfig.from_dict), so a model converted from GGUF runs through the same code.
    """

    arch: str  # general.architecture
    model_type: str  # the config's model_type
    tensors: dict[str, str]  # GGUF name after "blk.L." -> canonical name after "layers.L."
    config_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # more HF key -> GGUF key
    # settings llama.cpp's graph for this architecture fixes instead of reading them (its build_moe_ffn call)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    # convert_hf_to_gguf.py reorders the rows of q and k for llama.cpp's interleaved ("normal") RoPE;
    # edgemoe's RoPE rotates halves, as transformers does, so the import puts them back
    rope_interleaved: bool = False
    experts_key: str = "num_experts"  # the HF config key of the expert count
    # canonical [1, n] matrices llama.cpp may store as vectors of n (its quantizer writes them so)
    row_vectors: tuple[str, ...] = ()
    # config values that are not a plain copy of one metadata key (an enum to a name, a count to a
    # list): derive(metadata, config) edits the config in place after the copies
    derive: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    # derive sets the RoPE (rope_parameters) itself: a scaled or partial RoPE the architecture runs
    own_rope: bool = False
    # canonical per-layer tensors llama.cpp splits: role -> (its GGUF names after "blk.L.", a function
    # of their float32 values [numpy shapes] that gives the canonical float32 tensor)
    merged: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = dataclasses.field(default_factory=dict)

    def meta(self, metadata: dict[str, Any], key: str) -> Any:
        return metadata.get(f"{self.arch}.{key}")

    def config(self, metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
        """The Hugging Face config of the model in a GGUF file, from its metadata and tensor names."""
        cfg: dict[str, Any] = {"model_type": self.model_type}
        for hf, key in {**GGUF_CONFIG, **self.config_keys}.items():
            v = self.meta(metadata, key)
            if v is not None:
                cfg[hf] = v
        cfg[self.experts_key] = int(self.meta(metadata, "expert_count") or 0)
        tokens = metadata.get("tokenizer.ggml.tokens")
        cfg["vocab_size"] = int(self.meta(metadata, "vocab_size") or (len(tokens) if tokens else 0))
        theta = float(self.meta(metadata, "rope.freq_base") or 10000.0)
        scaling = self.meta(metadata, "rope.scaling.type")
        if not self.own_rope and (
            scaling not in (None, "none", "linear")
            or (scaling == "linear" and self.meta(metadata, "rope.scaling.factor") not in (None, 1.0))
        ):
            raise CheckpointError(
                f"the GGUF file's RoPE is scaled ({scaling}); edgemoe runs the default RoPE only: "
                f"use a GGUF of the model without RoPE scaling"
            )
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        heads = cfg.get("num_attention_heads")
        hidden = cfg.get("hidden_size")
        head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
        rot = self.meta(metadata, "rope.dimension_count")
        if not self.own_rope and rot is not None and head_dim is not None and int(rot) != int(head_dim):
            raise CheckpointError(
                f"the GGUF file rotates {rot} of each head's {head_dim} dimensions (partial RoPE), which "
                f"edgemoe does not do: use a model that rotates whole heads"
            )
        cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
        cfg["attention_bias"] = cfg["qkv_bias"] = "blk.0.attn_q.bias" in tensor_names
        n = int(cfg.get("num_hidden_layers") or 0)
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = [i for i in range(n) if f"blk.{i}.ffn_gate_exps.weight" not in tensor_names]
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            tid = metadata.get(f"tokenizer.ggml.{name}_token_id")
            if tid is not None:
                cfg[key] = int(tid)
        if self.derive is not None:
            self.derive(metadata, cfg)
        cfg.update(self.fixed)
        return cfg
