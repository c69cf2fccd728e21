"""Hugging Face checkpoints: open one, and map its tensors to docs/format.md names.

Each architecture file's LAYOUT (edgemoe/models) says which HF tensor becomes which
canonical backbone tensor; experts are found in either layout seen in the wild:

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

from edgemoe import models
from edgemoe.errors import CheckpointError
from edgemoe.format.safetensors import SafetensorsFile
from edgemoe.models.checkpoint import CheckpointLayout

# ---------------------------------------------------------------- architectures

# tensors some exporters add that carry nothing the model needs
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ArchSpec:
    """An architecture as the converter sees it: its name (manifest "architecture") and
    where its weights sit in a checkpoint (the architecture file's LAYOUT)."""

    name: str
    layout: CheckpointLayout

    def num_experts(self, config: dict) -> int:
        return self.layout.num_experts(config, self.name)

    def moe_layers(self, config: dict) -> list[int]:
        return self.layout.moe_layers(config, self.name)


def arch_spec(config: dict, where: str = "the checkpoint") -> ArchSpec:
    model_type = config.get("model_type")
    module = models.get(str(model_type), where)
    return ArchSpec(str(model_type), module.LAYOUT)  # the manifest names the model_type


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
            raise CheckpointError(
                f"{self.path} is not a directory: pass the folder of a Hugging Face checkpoint "
                f"(the one holding config.json and *.safetensors)"
            )
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{self.path} is not a Hugging Face checkpoint: it has no config.json. "
                f"Pass the folder that holds config.json and the *.safetensors files"
            )
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
                    p.name for p in self.path.glob("*.pt*")
                )
                hint = (
                    f" It has PyTorch weights ({', '.join(torch_files[:3])}); re-save them as safetensors "
                    f"(save_pretrained(..., safe_serialization=True)) or download the .safetensors files."
                    if torch_files
                    else " Download the model's *.safetensors files into it."
                )
                raise CheckpointError(
                    f"{self.path} has no {WEIGHTS}, no {INDEX} and no *.safetensors files, "
                    f"so there are no weights edgemoe can read.{hint}"
                )

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
                f"holding {n} tensors. Download the missing files into {self.path}"
            )
        by_name = {s: SafetensorsFile(self.path / s) for s in shards}
        self.files = list(by_name.values())
        for name, shard in weight_map.items():
            st = by_name[shard]
            if name not in st:
                raise CheckpointError(
                    f"{INDEX} says tensor {name} is in {shard}, but that file does not hold it: "
                    f"the shard and the index come from different downloads; download both again"
                )
            self.tensors[name] = st

    def _open_files(self, paths) -> None:
        self.files = [SafetensorsFile(p) for p in paths]
        for st in self.files:
            for name in st.names():
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor {name} is in both {self.tensors[name].path.name} and "
                        f"{st.path.name}: remove the stray file (or add the index)"
                    )
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
    backbone: dict[str, TensorRef] = field(default_factory=dict)  # canonical name -> source
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
            raise CheckpointError(
                f"the expert weights mix dtypes {sorted(dtypes)}; edgemoe stores one float "
                f"dtype for all experts: re-save the checkpoint in one dtype"
            )
        return dtypes.pop() if dtypes else "BF16"

    def expert(self, layer: int, expert: int) -> tuple[np.ndarray, ...]:
        """The expert's matrices as stored (bf16 as uint16 bits), read from disk: (gate [I, H],
        up [I, H], down [H, I]), or (up, down) for a ReLU expert (LAYOUT.glu False)."""
        I = self.intermediate
        if (layer, "gate_up") in self.fused:
            gate_up = self._fused_slice(layer, "gate_up", expert)  # [2I, H]
            gate, up = np.ascontiguousarray(gate_up[:I]), np.ascontiguousarray(gate_up[I:])
        elif self.arch.layout.glu:
            gate, up = (self._per_expert(layer, expert, r) for r in ("gate", "up"))
        else:
            up = self._per_expert(layer, expert, "up")
        if (layer, "down") in self.fused:
            down = np.ascontiguousarray(self._fused_slice(layer, "down", expert))  # [H, I]
        else:
            down = self._per_expert(layer, expert, "down")
        return (gate, up, down) if self.arch.layout.glu else (up, down)

    def _per_expert(self, layer: int, expert: int, role: str) -> np.ndarray:
        ref = self.per_expert[(layer, expert, role)]
        return ref.file.read(ref.name)

    def _fused_slice(self, layer: int, kind: str, expert: int) -> np.ndarray:
        f = self.fused[(layer, kind)]
        part = f.ref.file.read(f.ref.name, expert)  # one expert is one contiguous range
        return part.T if f.transposed else part


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
        raise CheckpointError(
            f"{ckpt.path} holds pre-quantized weights ({method}); edgemoe converts "
            f"bf16/f16/f32 checkpoints: use the original unquantized model"
        )
    spec = arch_spec(cfg, where=str(ckpt.path))
    p = Plan(spec, cfg)
    layout = spec.layout
    _config_int(cfg, layout.num_layers_key, spec.name)
    p.num_layers = layout.num_layers(cfg)
    p.num_experts = spec.num_experts(cfg)
    p.top_k = layout.top_k(cfg, spec.name)
    p.hidden = _config_int(cfg, layout.hidden_key, spec.name)
    p.intermediate = _config_int(cfg, layout.intermediate_key, spec.name)
    p.moe_layers = spec.moe_layers(cfg)
    tied = layout.tied(cfg)

    for name, st in ckpt.tensors.items():
        ref = TensorRef(st, name)
        if _IGNORED.search(name):
            continue
        if name in layout.global_tensors:
            canonical = layout.global_tensors[name]
            if canonical is None or (canonical == "output" and tied):
                continue  # a copy the layout skips; tied: the runtime uses tok_embeddings
            p.backbone[canonical] = ref
            continue
        m = layout.locate(name, cfg)
        if m:
            layer, rest = m
            if p.num_layers <= layer < p.num_layers + spec.layout.extra_layers(cfg):
                continue  # layers the model has besides generation's (LAYOUT.extra_layers_key)
            if layer >= p.num_layers:
                raise CheckpointError(
                    f"tensor {name} belongs to layer {layer}, but config.json says the model "
                    f"has {p.num_layers} layers: config and weights do not match"
                )
            if rest in spec.layout.layer_tensors:
                canonical = f"layers.{layer}.{spec.layout.layer_tensors[rest]}"
                if canonical in p.backbone:
                    raise CheckpointError(
                        f"tensors {p.backbone[canonical].name} and {name} both give {canonical}: "
                        f"the checkpoint mixes two namings; keep one"
                    )
                p.backbone[canonical] = ref
                continue
            e = layout.match_expert(rest)
            if e is not None:
                p.per_expert[(layer, e[0], layout.expert_roles[e[1]])] = ref
                continue
            f = _FUSED_RE.match(rest)
            if f and f.group(1) in (layout.moe_block, "mlp") and layout.glu:
                p.fused[(layer, "gate_up" if f.group(2) == "gate_up_proj" else "down")] = FusedRef(ref, False)
                continue
        raise CheckpointError(
            f"tensor {name} ({ckpt.tensors[name].path.name}) has no place in a {spec.name} "
            f"model as edgemoe knows it (adapter, vision tower or quantized weights?): "
            f"convert a plain {spec.name} checkpoint"
        )
    _check_complete(p, tied)
    return p


def _check_complete(p: Plan, tied: bool) -> None:
    spec, H, I, E = p.arch, p.hidden, p.intermediate, p.num_experts
    reverse = {v: k for k, v in spec.layout.layer_tensors.items()}

    def need(canonical: str, hf: str) -> None:
        if canonical not in p.backbone:
            raise CheckpointError(
                f"the checkpoint has no tensor {hf} (edgemoe's {canonical}): "
                f"a shard is missing or the checkpoint is not a complete {spec.name} model"
            )

    hf_global = {v: k for k, v in spec.layout.global_tensors.items() if v is not None}
    for c in spec.layout.required_globals(p.config):
        need(c, hf_global.get(c, c) + (" (and tie_word_embeddings is false)" if c == "output" else ""))
    moe = set(p.moe_layers)
    for layer in range(p.num_layers):
        for c in spec.layout.layer_tensor_names(p.config, layer in moe, layer):
            need(f"layers.{layer}.{c}", spec.layout.hf_layer_name(layer, reverse.get(c, c), p.config))

    expert_layers = {k[0] for k in p.per_expert} | {k[0] for k in p.fused}
    both = sorted({k[0] for k in p.per_expert} & {k[0] for k in p.fused})
    if both:
        raise CheckpointError(
            f"layers {both} have experts both as per-expert tensors and as fused 3D tensors: "
            f"the checkpoint mixes two exports; keep one"
        )
    extra = sorted(expert_layers - moe)
    if extra:
        raise CheckpointError(
            f"layers {extra} hold expert weights but config.json makes them dense layers "
            f"(decoder_sparse_step / mlp_only_layers): config and weights do not match"
        )
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
                raise CheckpointError(
                    f"{f.ref.name} is {list(shape)}, expected {list(full)} "
                    f"(num_experts={E}, hidden={H}, intermediate={I} from config.json)"
                )
        for e in range(E):
            for role in spec.layout.expert_role_order():
                fused_kind = "down" if role == "down" else "gate_up"
                if (layer, fused_kind) in p.fused:
                    continue
                r = p.per_expert.get((layer, e, role))
                if r is None:
                    raise CheckpointError(
                        f"expert {e} of layer {layer} has no {role} projection in the "
                        f"checkpoint: a shard is missing or incomplete; download it again"
                    )
                if tuple(r.shape) != want[role]:
                    raise CheckpointError(
                        f"{r.name} is {list(r.shape)}, expected {list(want[role])} "
                        f"(hidden={H}, intermediate={I} from config.json)"
                    )
    bad = sorted({k[1] for k in p.per_expert if k[1] >= E})
    if bad:
        raise CheckpointError(
            f"the checkpoint has experts {bad} but config.json says {E} experts per layer: "
            f"config and weights do not match"
        )
