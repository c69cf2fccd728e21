"""Parameter counts and stored byte sizes of a model from its config.json alone, per architecture.

For the architectures edgemoe runs, the tensors are those the architecture file's LAYOUT makes
the converter require, shaped by its config class: the size model and the converter read the
same declaration. Families edgemoe cannot run yet are sized by a small formula each (FAMILIES),
from their config keys alone.

    sm = size_model(json.load(open("config.json")))
    sm.params()["total"], sm.expert_nbytes(4), sm.backbone_nbytes(8)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ..errors import EdgeMoEError, UnsupportedArchitectureError
from ..format import quant
from . import ALIASES, get
from .checkpoint import CheckpointLayout, float32_role, quantized_role

FLOAT_BYTES = 2  # tensors kept as stored: a bf16 or f16 checkpoint (float32 ones keep 4 bytes per value)
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A backbone tensor: canonical name, shape, and whether the backbone policy quantizes it."""

    name: str
    shape: Shape
    quantize: bool = False
    float32: bool = False  # stored as float32 whatever the checkpoint's dtype (checkpoint.FLOAT32_ROLES)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, bits: int, group_size: int = 64, symmetric: bool = False) -> int:
        """Bytes as the converter stores it with `--backbone-bits bits`: a QMatrix when the policy
        quantizes it and its columns split into groups, else as stored."""
        if bits != 16 and self.quantize and len(self.shape) == 2 and self.shape[1] % group_size == 0:
            return quant.qmatrix_nbytes(self.shape[0], self.shape[1], bits, group_size, symmetric)
        return self.numel * (4 if self.float32 else FLOAT_BYTES)


@dataclasses.dataclass
class SizeModel:
    """What a model holds, from its config: backbone tensors, experts, and what attention keeps."""

    architecture: str  # the registry's name, or the family's model_type
    supported: bool  # edgemoe runs it
    why_not: str | None  # when not supported: what edgemoe lacks
    layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    vocab_size: int
    expert_shapes: tuple[Shape, ...]  # gate [I, H], up [I, H], down [H, I]; no gate for ReLU experts
    backbone: list[Tensor]
    tied: bool  # the output head is the embedding table
    heads: int
    kv_values_per_token: int  # values the KV cache holds per token, all layers
    kv_value_bytes: int  # bytes each takes with load's defaults (float16 or float32)
    attention_values_per_token: int  # float32 scratch values per prefilled token of one layer's attention
    expert_extra: int = 0  # values per expert besides its three matrices (biases), kept in float32
    notes: list[str] = dataclasses.field(default_factory=list)

    def expert_params(self) -> int:
        return sum(math.prod(s) for s in self.expert_shapes) + self.expert_extra

    def params(self) -> dict[str, int]:
        """Parameter counts: total, active per token (the backbone, embedding table included,
        and top_k experts of each MoE layer), the embedding table, and the expert and
        backbone shares of the total."""
        backbone = sum(t.numel for t in self.backbone)
        slots = len(self.moe_layers) * self.num_experts
        experts = slots * self.expert_params()
        idle = len(self.moe_layers) * (self.num_experts - self.top_k) * self.expert_params()
        return {
            "total": backbone + experts,
            "active": backbone + experts - idle,
            "embedding": self.vocab_size * self.hidden_size,
            "experts": experts,
            "backbone": backbone,
        }

    def expert_nbytes(self, bits: int, group_size: int = 64, symmetric: bool = False) -> int:
        """One expert as stored at `bits`: its blob (docs/format.md), biases included."""
        sizes = [quant.matrix_nbytes(r, c, bits, group_size, symmetric) for r, c in self.expert_shapes]
        return quant.expert_blob_nbytes(*sizes, bias_values=self.expert_extra)

    def experts_nbytes(self, bits: int, group_size: int = 64, symmetric: bool = False) -> int:
        """Every expert at `bits` (blob lengths, as `edgemoe info` sums them)."""
        return len(self.moe_layers) * self.num_experts * self.expert_nbytes(bits, group_size, symmetric)

    def backbone_nbytes(self, bits: int, group_size: int = 64, symmetric: bool = False) -> int:
        """The whole backbone as the converter stores it with `--backbone-bits bits`."""
        return sum(t.nbytes(bits, group_size, symmetric) for t in self.backbone)

    def embedding_nbytes(self) -> int:
        return self.vocab_size * self.hidden_size * FLOAT_BYTES


# ---------------------------------------------------------------- reading a config


class _Keys:
    """A config's keys, read so that a missing one is named."""

    def __init__(self, config: dict[str, Any], family: str):
        self.config, self.family = config, family

    def need(self, key: str, *alternatives: str) -> int:
        for k in (key, *alternatives):
            if self.config.get(k) is not None:
                return int(self.config[k])
        names = " or ".join(repr(k) for k in (key, *alternatives))
        raise EdgeMoEError(
            f"config.json has no {names}, which sizing a {self.family} model needs: "
            f"download the model's config.json again (it is incomplete)"
        )

    def opt(self, key: str, default: int = 0) -> int:
        value = self.config.get(key)
        return default if value is None else int(value)


def _notes(config: dict[str, Any]) -> list[str]:
    q = config.get("quantization_config")
    if not q:
        return []
    method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
    if method == "mxfp4":
        return [
            "the published experts are MXFP4; `edgemoe convert --bits 4` keeps them as they are, at 4.25 "
            "bits per weight (a little under the 4-bit column's groups of 64 with mins); 16 decodes them "
            "exactly to bf16, 8 quantizes them again (docs/gguf.md)"
        ]
    return [
        f"the published weights are quantized ({method}); `edgemoe convert` reads bf16, f16 or f32 "
        f"checkpoints, so it needs a dequantized copy; these sizes are what edgemoe stores"
    ]


# ---------------------------------------------------------------- architectures edgemoe runs


def _canonical_shapes(cfg: Any, layout: CheckpointLayout, qk_norm: str | None, keys: _Keys) -> Callable[[str], Shape]:
    """Shape of a canonical per-layer tensor (docs/format.md) of this config."""
    H, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_head = qk_norm == "per_head"
    fixed: dict[str, Shape] = {
        "attn_norm": (H,),
        "ffn_norm": (H,),
        "attn_q": (q, H),
        "attn_k": (kv, H),
        "attn_v": (kv, H),
        "attn_o": (H, q),
        "attn_q_bias": (q,),
        "attn_k_bias": (kv,),
        "attn_v_bias": (kv,),
        "attn_q_norm": (hd if per_head else q,),
        "attn_k_norm": (hd if per_head else kv,),
        "ffn_router": (cfg.num_experts, H),
        "ffn_shared_expert_gate": (1, H),
        **cfg.tensor_shapes(),  # the architecture's own tensors, and where its shapes differ
    }

    def shape(role: str) -> Shape:
        if role in fixed:
            return fixed[role]
        if role in ("ffn_gate", "ffn_up", "ffn_down"):  # a dense layer's MLP
            i = keys.need("intermediate_size")
        elif role in ("ffn_shared_gate", "ffn_shared_up", "ffn_shared_down") and layout.moe_extras_key:
            i = keys.need(layout.moe_extras_key)
        else:
            raise NotImplementedError(f"edgemoe.models.sizes has no shape for the canonical tensor {role!r}: add it")
        return (H, i) if role.endswith("down") else (i, H)

    return shape


def _decoder(config: dict[str, Any]) -> SizeModel:
    """An architecture of the registry: tensors from its LAYOUT, shapes from its config class."""
    module = get(str(config["model_type"]))
    name = str(config["model_type"])
    layout: CheckpointLayout = module.LAYOUT
    keys = _Keys(config, name)
    why_not = None
    try:
        cfg = module.Model.config_class.from_dict(config)
    except NotImplementedError as e:  # e.g. a RoPE scaling the runtime lacks: the shapes do not depend on it
        why_not = f"edgemoe cannot run this {name} config yet: {e}"
        cfg = module.Model.config_class.from_dict({**config, "rope_scaling": None, "rope_parameters": None})
    moe_layers = layout.moe_layers(config, name)
    shape = _canonical_shapes(cfg, layout, module.Model.qk_norm, keys)

    H, V = cfg.hidden_size, cfg.vocab_size
    globals_: dict[str, Shape] = {
        "tok_embeddings": (V, H),
        "output_norm": (H,),
        "output": (V, H),
        **cfg.tensor_shapes(),
    }
    backbone = [Tensor(n, globals_[n], quantized_role(n)) for n in layout.required_globals(config)]
    moe = set(moe_layers)
    for layer in range(cfg.num_hidden_layers):
        for role in layout.layer_tensor_names(config, layer in moe, layer):
            full = f"layers.{layer}.{role}"
            backbone.append(Tensor(full, shape(role), quantized_role(full), float32_role(full)))
    I = keys.need(layout.intermediate_key)
    notes = _notes(config)
    if layout.extra_layers(config):
        notes.append(
            f"the {layout.extra_layers(config)} layer(s) after num_hidden_layers ({layout.extra_layers_key}: "
            f"multi-token prediction) are left out: generating text does not use them"
        )
    return SizeModel(
        architecture=name,
        supported=why_not is None,
        why_not=why_not,
        layers=cfg.num_hidden_layers,
        moe_layers=moe_layers,
        num_experts=layout.num_experts(config, name),
        top_k=cfg.num_experts_per_tok,
        hidden_size=H,
        vocab_size=V,
        expert_shapes=((I, H), (I, H), (H, I)) if layout.glu else ((I, H), (H, I)),
        backbone=backbone,
        tied=cfg.tie_word_embeddings,
        heads=cfg.num_attention_heads,
        kv_values_per_token=cfg.kv_values_per_token(),
        kv_value_bytes=cfg.kv_value_bytes,
        attention_values_per_token=cfg.attention_values_per_token(),
        expert_extra=2 * I + H if layout.expert_biases else 0,
        notes=notes,
    )


# model_type -> size formula of a family edgemoe cannot run yet (none at present)
FAMILIES: dict[str, Callable[[dict[str, Any]], SizeModel]] = {}

SIZEABLE = sorted(set(ALIASES) | set(FAMILIES))


def size_model(config: dict[str, Any], where: str = "config.json") -> SizeModel:
    """The size model of a Hugging Face config dict, or a clear error naming what can be sized."""
    model_type = config.get("model_type")
    if model_type is None:
        raise EdgeMoEError(f"{where} has no 'model_type': it is not a Hugging Face model config")
    if model_type in ALIASES:
        return _decoder(config)
    if model_type in FAMILIES:
        return FAMILIES[str(model_type)](config)
    raise UnsupportedArchitectureError(
        f"{where} is a {model_type!r} model; edgemoe can size these model types: {', '.join(SIZEABLE)} "
        f"(and runs {', '.join(sorted(ALIASES))})"
    )
