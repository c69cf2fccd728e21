"""Hugging Face checkpoints: open one, and map its tensors to FORMAT.md names.

One table per architecture says which HF tensor becomes which canonical
backbone tensor; experts are found in either layout seen in the wild:

- per expert: `model.layers.L.{mlp|block_sparse_moe}.experts.E.<proj>.weight`,
  proj = w1/w3/w2 (Mixtral) or gate_proj/up_proj/down_proj (Qwen, OLMoE);
- fused 3D (transformers >= 5 in memory, some re-exports):
  `experts.gate_up_proj` [E, 2I, H] (gate = rows [0, I), up = rows [I, 2I), as
  transformers' `.chunk(2, dim=-1)` after the linear) and `experts.down_proj`
  [E, H, I]. The transposed orientation [E, H, 2I] / [E, I, H] is recognised
  by shape when it is unambiguous.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.errors import CheckpointError, UnsupportedArchitectureError

from .safetensors_io import SafetensorsFile

# ---------------------------------------------------------------- architecture tables

_ATTN = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_o",
    "post_attention_layernorm.weight": "ffn_norm",
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q_bias",
    "self_attn.k_proj.bias": "attn_k_bias",
    "self_attn.v_proj.bias": "attn_v_bias",
}
_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm"}
_DENSE_MLP = {"mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
_SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj.weight": "ffn_shared_gate",
    "mlp.shared_expert.up_proj.weight": "ffn_shared_up",
    "mlp.shared_expert.down_proj.weight": "ffn_shared_down",
    "mlp.shared_expert_gate.weight": "ffn_shared_router",
}
_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_ROLES_MIXTRAL = {"w1": "gate", "w3": "up", "w2": "down"}
_ROLES_GLU = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# tensors some exporters add that carry nothing the model needs
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ArchSpec:
    name: str                       # canonical architecture (manifest "architecture")
    layer_tensors: dict[str, str]   # HF name after "model.layers.L." -> canonical after "layers.L."
    expert_roles: dict[str, str]    # per-expert projection name -> gate/up/down
    num_experts_keys: tuple[str, ...]  # config keys naming the expert count, first present wins
    intermediate_key: str           # config key of one expert's intermediate size
    moe_block: str = "mlp"          # module holding router + experts in HF names
    sparse_step: bool = False       # honours decoder_sparse_step / mlp_only_layers
    shared_expert: bool = False
    qk_norm: bool = False
    bias_key: tuple[str, bool] | None = None  # config key switching q/k/v biases on, and its default

    def attn_tensors(self, config: dict) -> list[str]:
        """Canonical per-layer attention tensors this config requires."""
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm"]
        if self.qk_norm:
            names += ["attn_q_norm", "attn_k_norm"]
        if self.bias_key and config.get(self.bias_key[0], self.bias_key[1]):
            names += ["attn_q_bias", "attn_k_bias", "attn_v_bias"]
        return names

    def num_experts(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                return int(config[key])
        raise CheckpointError(f"config.json of this {self.name} checkpoint has none of "
                              f"{', '.join(map(repr, self.num_experts_keys))}: download config.json again")

    def moe_layers(self, config: dict) -> list[int]:
        n = int(config["num_hidden_layers"])
        if not self.sparse_step:
            return list(range(n))
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        if self.num_experts(config) <= 0:
            return []
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


# transformers 5 writes qwen3_moe's count as num_local_experts; released checkpoints say num_experts
_EXPERT_KEYS = ("num_experts", "num_local_experts")

ARCHS: dict[str, ArchSpec] = {
    "mixtral": ArchSpec(
        "mixtral", {**_ATTN, "block_sparse_moe.gate.weight": "ffn_router", "mlp.gate.weight": "ffn_router"},
        _ROLES_MIXTRAL, _EXPERT_KEYS, "intermediate_size", moe_block="block_sparse_moe"),
    "qwen2_moe": ArchSpec(
        "qwen2_moe", {**_ATTN, **_QKV_BIAS, **_DENSE_MLP, **_SHARED_EXPERT, "mlp.gate.weight": "ffn_router"},
        _ROLES_GLU, _EXPERT_KEYS, "moe_intermediate_size", sparse_step=True, shared_expert=True,
        bias_key=("qkv_bias", True)),
    "qwen3_moe": ArchSpec(
        "qwen3_moe", {**_ATTN, **_QKV_BIAS, **_QK_NORM, **_DENSE_MLP, "mlp.gate.weight": "ffn_router"},
        _ROLES_GLU, _EXPERT_KEYS, "moe_intermediate_size", sparse_step=True, qk_norm=True,
        bias_key=("attention_bias", False)),
    "olmoe": ArchSpec(
        "olmoe", {**_ATTN, **_QKV_BIAS, **_QK_NORM, "mlp.gate.weight": "ffn_router"},
        _ROLES_GLU, _EXPERT_KEYS, "intermediate_size", qk_norm=True, bias_key=("attention_bias", False)),
}
# HF model_type -> canonical architecture
ALIASES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe"}


def arch_spec(config: dict, where="the checkpoint") -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in ALIASES:
        raise UnsupportedArchitectureError(
            f"{where} is a {model_type!r} model; edgemoe converts these architectures: "
            f"{', '.join(sorted(ALIASES))}. Use a checkpoint of one of them (or add the architecture)")
    return ARCHS[ALIASES[model_type]]


# ---------------------------------------------------------------- checkpoint files

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A Hugging Face checkpoint directory: config.json plus safetensors (sharded or not).

    Every shard's header is read and checked on open, so a missing or truncated
    file is reported before any conversion work starts.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory: pass the folder of a Hugging Face checkpoint "
                                  f"(the one holding config.json and *.safetensors)")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path} is not a Hugging Face checkpoint: it has no config.json. "
                                  f"Pass the folder that holds config.json and the *.safetensors files")
        try:
            self.config: dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): download it again") from None
        self.tensors: dict[str, SafetensorsFile] = {}  # tensor name -> the file holding it
        self.files: list[SafetensorsFile] = []
        index = self.path / INDEX
        if index.is_file():
            self._open_index(index)
        elif (self.path / WEIGHTS).is_file():
            self._open_files([self.path / WEIGHTS])
        else:
            found = sorted(self.path.glob("*.safetensors"))
            if found:
                self._open_files(found)
            else:
                torch_files = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                    p.name for p in self.path.glob("*.pt*"))
                hint = (f" It has PyTorch weights ({', '.join(torch_files[:3])}); re-save them as safetensors "
                        f"(save_pretrained(..., safe_serialization=True)) or download the .safetensors files."
                        if torch_files else " Download the model's *.safetensors files into it.")
                raise CheckpointError(f"{self.path} has no {WEIGHTS}, no {INDEX} and no *.safetensors files, "
                                      f"so there are no weights edgemoe can read.{hint}")

    def _open_index(self, index: Path) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}): download it again") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.path / s).is_file()]
        if missing:
            n = sum(1 for s in weight_map.values() if s in missing)
            raise CheckpointError(
                f"{self.path} is incomplete: {INDEX} lists {len(shards)} shard files but "
                f"{len(missing)} are missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), "
                f"holding {n} tensors. Download the missing files into {self.path}")
        by_name = {s: SafetensorsFile(self.path / s) for s in shards}
        self.files = list(by_name.values())
        for name, shard in weight_map.items():
            st = by_name[shard]
            if name not in st:
                raise CheckpointError(f"{INDEX} says tensor {name} is in {shard}, but that file does not hold it: "
                                      f"the shard and the index come from different downloads; download both again")
            self.tensors[name] = st

    def _open_files(self, paths) -> None:
        self.files = [SafetensorsFile(p) for p in paths]
        for st in self.files:
            for name in st.names():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} is in both {self.tensors[name].path.name} and "
                                          f"{st.path.name}: remove the stray file (or add the index)")
                self.tensors[name] = st

    @property
    def bytes(self) -> int:
        return sum(st.file_bytes for st in self.files)


# ---------------------------------------------------------------- the mapping plan


@dataclass
class TensorRef:
    file: SafetensorsFile
    name: str

    @property
    def dtype(self) -> str:
        return self.file.dtype(self.name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.name)


@dataclass
class FusedRef:
    """One layer's 3D expert tensor; `transposed` marks [E, in, out] instead of [E, out, in]."""
    ref: TensorRef
    transposed: bool


@dataclass
class Plan:
    """Where every tensor of the canonical model comes from."""
    arch: ArchSpec
    config: dict
    backbone: dict[str, TensorRef] = field(default_factory=dict)   # canonical name -> source
    per_expert: dict[tuple[int, int, str], TensorRef] = field(default_factory=dict)  # (layer, expert, role)
    fused: dict[tuple[int, str], FusedRef] = field(default_factory=dict)  # (layer, "gate_up"|"down")
    num_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    hidden: int = 0
    intermediate: int = 0
    moe_layers: list[int] = field(default_factory=list)

    @property
    def layout(self) -> str:
        if self.fused and self.per_expert:
            return "mixed"
        return "fused" if self.fused else "per-expert"

    @property
    def expert_dtype(self) -> str:
        refs = [r for r in self.per_expert.values()] + [f.ref for f in self.fused.values()]
        dtypes = {r.dtype for r in refs}
        if len(dtypes) > 1:
            raise CheckpointError(f"the expert weights mix dtypes {sorted(dtypes)}; edgemoe stores one float "
                                  f"dtype for all experts: re-save the checkpoint in one dtype")
        return dtypes.pop() if dtypes else "BF16"

    def expert(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate [I, H], up [I, H], down [H, I]) as stored (bf16 as uint16 bits), read from disk."""
        I = self.intermediate
        if (layer, "gate_up") in self.fused:
            gate_up = self._fused_slice(layer, "gate_up", expert)   # [2I, H]
            gate, up = np.ascontiguousarray(gate_up[:I]), np.ascontiguousarray(gate_up[I:])
        else:
            gate, up = (self._per_expert(layer, expert, r) for r in ("gate", "up"))
        if (layer, "down") in self.fused:
            down = np.ascontiguousarray(self._fused_slice(layer, "down", expert))  # [H, I]
        else:
            down = self._per_expert(layer, expert, "down")
        return gate, up, down

    def _per_expert(self, layer: int, expert: int, role: str) -> np.ndarray:
        ref = self.per_expert[(layer, expert, role)]
        return ref.file.read(ref.name)

    def _fused_slice(self, layer: int, kind: str, expert: int) -> np.ndarray:
        f = self.fused[(layer, kind)]
        part = f.ref.file.read(f.ref.name, expert)  # one expert is one contiguous range
        return part.T if f.transposed else part


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PER_EXPERT_RE = re.compile(r"^(\w+)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_RE = re.compile(r"^(\w+)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")


def _config_int(config: dict, key: str, arch: str) -> int:
    if config.get(key) is None:
        raise CheckpointError(f"config.json of this {arch} checkpoint has no {key!r}: download config.json again")
    return int(config[key])


def plan_conversion(ckpt: Checkpoint) -> Plan:
    """Classify every tensor of `ckpt` and check that the model is complete and consistent."""
    cfg = ckpt.config
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(f"{ckpt.path} holds pre-quantized weights ({method}); edgemoe converts "
                              f"bf16/f16/f32 checkpoints: use the original unquantized model")
    spec = arch_spec(cfg, where=str(ckpt.path))
    p = Plan(spec, cfg)
    p.num_layers = _config_int(cfg, "num_hidden_layers", spec.name)
    p.num_experts = spec.num_experts(cfg)
    p.top_k = _config_int(cfg, "num_experts_per_tok", spec.name)
    p.hidden = _config_int(cfg, "hidden_size", spec.name)
    p.intermediate = _config_int(cfg, spec.intermediate_key, spec.name)
    p.moe_layers = spec.moe_layers(cfg)
    tied = bool(cfg.get("tie_word_embeddings", False))
    moe_blocks = {spec.moe_block, "mlp"}

    for name, st in ckpt.tensors.items():
        ref = TensorRef(st, name)
        if _IGNORED.search(name):
            continue
        if name in _GLOBAL:
            if name == "lm_head.weight" and tied:
                continue  # tied: the runtime uses tok_embeddings
            p.backbone[_GLOBAL[name]] = ref
            continue
        m = _LAYER_RE.match(name)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= p.num_layers:
                raise CheckpointError(f"tensor {name} belongs to layer {layer}, but config.json says the model "
                                      f"has {p.num_layers} layers: config and weights do not match")
            if rest in spec.layer_tensors:
                canonical = f"layers.{layer}.{spec.layer_tensors[rest]}"
                if canonical in p.backbone:
                    raise CheckpointError(f"tensors {p.backbone[canonical].name} and {name} both give {canonical}: "
                                          f"the checkpoint mixes two namings; keep one")
                p.backbone[canonical] = ref
                continue
            e = _PER_EXPERT_RE.match(rest)
            if e and e.group(1) in moe_blocks and e.group(3) in spec.expert_roles:
                p.per_expert[(layer, int(e.group(2)), spec.expert_roles[e.group(3)])] = ref
                continue
            f = _FUSED_RE.match(rest)
            if f and f.group(1) in moe_blocks:
                p.fused[(layer, "gate_up" if f.group(2) == "gate_up_proj" else "down")] = FusedRef(ref, False)
                continue
        raise CheckpointError(f"tensor {name} ({ckpt.tensors[name].path.name}) has no place in a {spec.name} "
                              f"model as edgemoe knows it (adapter, vision tower or quantized weights?): "
                              f"convert a plain {spec.name} checkpoint")
    _check_complete(p, tied)
    return p


def _check_complete(p: Plan, tied: bool) -> None:
    spec, H, I, E = p.arch, p.hidden, p.intermediate, p.num_experts
    reverse = {v: k for k, v in spec.layer_tensors.items()}

    def need(canonical: str, hf: str) -> None:
        if canonical not in p.backbone:
            raise CheckpointError(f"the checkpoint has no tensor {hf} (edgemoe's {canonical}): "
                                  f"a shard is missing or the checkpoint is not a complete {spec.name} model")

    need("tok_embeddings", "model.embed_tokens.weight")
    need("output_norm", "model.norm.weight")
    if not tied:
        need("output", "lm_head.weight (and tie_word_embeddings is false)")
    moe = set(p.moe_layers)
    for layer in range(p.num_layers):
        per_layer = spec.attn_tensors(p.config)
        if layer in moe:
            per_layer.append("ffn_router")
            if spec.shared_expert and int(p.config.get("shared_expert_intermediate_size") or 0) > 0:
                per_layer += ["ffn_shared_gate", "ffn_shared_up", "ffn_shared_down", "ffn_shared_router"]
        else:
            per_layer += ["ffn_gate", "ffn_up", "ffn_down"]
        for c in per_layer:
            need(f"layers.{layer}.{c}", f"model.layers.{layer}.{reverse.get(c, c)}")

    expert_layers = {k[0] for k in p.per_expert} | {k[0] for k in p.fused}
    both = sorted({k[0] for k in p.per_expert} & {k[0] for k in p.fused})
    if both:
        raise CheckpointError(f"layers {both} have experts both as per-expert tensors and as fused 3D tensors: "
                              f"the checkpoint mixes two exports; keep one")
    extra = sorted(expert_layers - moe)
    if extra:
        raise CheckpointError(f"layers {extra} hold expert weights but config.json makes them dense layers "
                              f"(decoder_sparse_step / mlp_only_layers): config and weights do not match")
    want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    for layer in p.moe_layers:
        for kind, full in (("gate_up", (E, 2 * I, H)), ("down", (E, H, I))):
            f = p.fused.get((layer, kind))
            if f is None:
                continue
            shape = tuple(f.ref.shape)
            transposed = (full[0], full[2], full[1])
            if shape == full:
                f.transposed = False
            elif shape == transposed:
                f.transposed = True
            else:
                raise CheckpointError(f"{f.ref.name} is {list(shape)}, expected {list(full)} "
                                      f"(num_experts={E}, hidden={H}, intermediate={I} from config.json)")
        for e in range(E):
            for role, fused_kind in (("gate", "gate_up"), ("up", "gate_up"), ("down", "down")):
                if (layer, fused_kind) in p.fused:
                    continue
                r = p.per_expert.get((layer, e, role))
                if r is None:
                    raise CheckpointError(f"expert {e} of layer {layer} has no {role} projection in the "
                                          f"checkpoint: a shard is missing or incomplete; download it again")
                if tuple(r.shape) != want[role]:
                    raise CheckpointError(f"{r.name} is {list(r.shape)}, expected {list(want[role])} "
                                          f"(hidden={H}, intermediate={I} from config.json)")
    bad = sorted({k[1] for k in p.per_expert if k[1] >= E})
    if bad:
        raise CheckpointError(f"the checkpoint has experts {bad} but config.json says {E} experts per layer: "
                              f"config and weights do not match")
