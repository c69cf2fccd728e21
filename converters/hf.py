"""Hugging Face checkpoints: open one, and map its tensors to docs/format.md names.

Each architecture file's LAYOUT (edgemoe/models) says which HF tensor becomes which
canonical backbone tensor; experts are found in either layout seen in the wild:

- per expert: `model.layers.L.{mlp|block_sparse_moe}.experts.E.<proj>.weight`,
  proj = w1/w3/w2 (Mixtral) or gate_proj/up_proj/down_proj (Qwen, OLMoE);
- fused 3D (transformers >= 5 in memory, some re-exports):
  `experts.gate_up_proj` [E, 2I, H] (gate = rows [0, I), up = rows [I, 2I), as
  transformers' `.chunk(2, dim=-1)` after the linear) and `experts.down_proj`
  [E, H, I]. The transposed orientation [E, H, 2I] / [E, I, H] is recognised
  by shape when it is unambiguous, or declared by the layout (gpt-oss: [E, H, 2I] and [E, I, H],
  gate and up rows interleaved, with `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H]);
- MXFP4 (gpt-oss as released): `<proj>_blocks` [E, out, in/32, 16] (two e2m1 codes per byte, the
  even element in the low nibble) and `<proj>_scales` [E, out, in/32] (E8M0 exponents, bias 127).
  At 4 bits they are carried over as they are (docs/format.md kind 5, the codes repacked); at 16
  bits decoded to bf16, which holds every MXFP4 value exactly; at other bitwidths quantized again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe import models
from edgemoe.errors import CheckpointError
from edgemoe.format import quant
from edgemoe.format.quant import FP4_VALUES, Glu, f32_to_bf16_bits
from edgemoe.format.safetensors import SafetensorsFile, to_float32
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
    fused_bias: dict[tuple[int, str], TensorRef] = field(default_factory=dict)  # (layer, "gate_up"|"down")
    # (layer, "gate_up"|"down") -> {"blocks": ref, "scales": ref}: MXFP4 experts
    mxfp4: dict[tuple[int, str], dict[str, TensorRef]] = field(default_factory=dict)
    num_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    hidden: int = 0
    intermediate: int = 0
    moe_layers: list[int] = field(default_factory=list)

    @property
    def layout(self) -> str:
        if self.mxfp4:
            return "fused-mxfp4"
        if self.fused and self.per_expert:
            return "mixed"
        return "fused" if self.fused else "per-expert"

    @property
    def has_mxfp4_experts(self) -> bool:
        """Whether experts are stored in MXFP4: at 4 bits they are carried over as such (kind 5)."""
        return bool(self.mxfp4)

    @property
    def expert_dtype(self) -> str:
        refs = [r for r in self.per_expert.values()] + [f.ref for f in self.fused.values()]
        dtypes = {r.dtype for r in refs} | ({"BF16"} if self.mxfp4 else set())  # MXFP4 decodes to bf16 exactly
        if len(dtypes) > 1:
            raise CheckpointError(
                f"the expert weights mix dtypes {sorted(dtypes)}; edgemoe stores one float "
                f"dtype for all experts: re-save the checkpoint in one dtype"
            )
        return dtypes.pop() if dtypes else "BF16"

    def expert(self, layer: int, expert: int) -> tuple[Any, ...]:
        """The expert's matrices as stored (bf16 as uint16 bits; MXFP4 as MXFP4Weight), read from
        disk: (gate [I, H], up [I, H], down [H, I]), or (up, down) for a ReLU expert (LAYOUT.glu False)."""
        if (layer, "gate_up") in self.fused or (layer, "gate_up") in self.mxfp4:
            gate, up = (_contiguous(m) for m in self._split(self._fused_slice(layer, "gate_up", expert)))
        elif self.arch.layout.glu:
            gate, up = (self._per_expert(layer, expert, r) for r in ("gate", "up"))
        else:
            up = self._per_expert(layer, expert, "up")
        if (layer, "down") in self.fused or (layer, "down") in self.mxfp4:
            down = _contiguous(self._fused_slice(layer, "down", expert))  # [H, I]
        else:
            down = self._per_expert(layer, expert, "down")
        return (gate, up, down) if self.arch.layout.glu else (up, down)

    def _split(self, gate_up):
        # gate_up: an array or an MXFP4Weight, both cut by rows
        """gate_up [2I, ...] -> (gate, up): halves, or alternate rows when the layout interleaves them."""
        if self.arch.layout.gate_up_interleaved:
            return gate_up[0::2], gate_up[1::2]
        return gate_up[: self.intermediate], gate_up[self.intermediate :]

    def glu(self, layer: int, expert: int) -> Glu | None:
        """The expert's biases and activation as its blob stores them, or None for a plain SwiGLU expert."""
        layout = self.arch.layout
        act, alpha, limit = layout.expert_activation(self.config)
        bias = None
        if layout.expert_biases:
            parts = {}
            for kind in ("gate_up", "down"):
                ref = self.fused_bias[(layer, kind)]
                parts[kind] = to_float32(ref.file.read(ref.name, expert), ref.dtype)
            gate, up = self._split(parts["gate_up"])
            bias = np.concatenate([gate, up, parts["down"]]).astype(np.float32)
        if bias is None and act == 0:
            return None
        return Glu(bias, act, alpha, limit)

    def _per_expert(self, layer: int, expert: int, role: str) -> np.ndarray:
        ref = self.per_expert[(layer, expert, role)]
        return ref.file.read(ref.name)

    def _fused_slice(self, layer: int, kind: str, expert: int):
        """One expert's [out, in] matrix of a fused tensor, as stored (an MXFP4Weight for MXFP4)."""
        if (layer, kind) in self.mxfp4:
            refs = self.mxfp4[(layer, kind)]
            blocks, scales = (refs[n].file.read(refs[n].name, expert) for n in ("blocks", "scales"))
            return MXFP4Weight(np.asarray(blocks), np.asarray(scales))
        f = self.fused[(layer, kind)]
        part = f.ref.file.read(f.ref.name, expert)  # one expert is one contiguous range
        return part.T if f.transposed else part


_FUSED_RE = re.compile(r"^(\w+)\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?(?:\.weight)?$")


def _contiguous(m):
    return m if isinstance(m, MXFP4Weight) else np.ascontiguousarray(m)


def _mxfp4_codes(blocks: np.ndarray) -> np.ndarray:
    """transformers' MXFP4 blocks [rows, n, 16] (element 2j in byte j's low nibble, 2j+1 in its high
    nibble) -> the codes [rows, n, 32] in element order."""
    rows, n, _ = blocks.shape
    codes = np.empty((rows, n, 32), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = blocks & 0x0F, blocks >> 4
    return codes


def mxfp4_to_float32(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 as transformers stores gpt-oss: blocks [rows, n, 16] (element 2j in byte j's low nibble,
    2j+1 in its high nibble), scales [rows, n] (E8M0: 2^(s-127) per block of 32) -> [rows, 32 n]."""
    rows, n = scales.shape
    w = FP4_VALUES[_mxfp4_codes(blocks)] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return w.reshape(rows, n * 32)


@dataclass(frozen=True)
class MXFP4Weight:
    """One expert's matrix [rows, 32 n] as an MXFP4 checkpoint stores it: blocks [rows, n, 16] in
    transformers' layout, E8M0 scales [rows, n]."""

    blocks: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scales.shape[0]), int(self.scales.shape[1]) * 32

    def __getitem__(self, rows) -> MXFP4Weight:  # a selection of whole rows (gpt-oss's interleaved gate/up)
        return MXFP4Weight(self.blocks[rows], self.scales[rows])

    def float32(self) -> np.ndarray:
        return mxfp4_to_float32(self.blocks, self.scales)

    def encode(self, bits: int, group_size: int, symmetric: bool, record: bool = True) -> np.ndarray:
        """The matrix as a serialized QMatrix: at 4 bits kind 5 with the same codes and scales (exact), at
        16 bf16 (exact), else quantized again at `bits` from its values."""
        rows, cols = self.shape
        if bits == 4:
            if (self.scales == quant.E8M0_NAN).any():
                raise CheckpointError("an MXFP4 expert has a NaN scale (E8M0 255): the checkpoint is damaged")
            packed = quant.pack_codes(_mxfp4_codes(self.blocks).reshape(rows, cols), 4)
            return quant.mxfp4_matrix(packed, np.ascontiguousarray(self.scales, np.uint8), rows, cols)
        if bits == 16:
            return quant.float_matrix(f32_to_bf16_bits(self.float32()), "bf16")
        return quant.quantize_matrix(self.float32(), bits, group_size, symmetric)


def _config_int(config: dict, key: str, arch: str) -> int:
    if config.get(key) is None:
        raise CheckpointError(f"config.json of this {arch} checkpoint has no {key!r}: download config.json again")
    return int(config[key])


def plan_conversion(ckpt: Checkpoint) -> Plan:
    """Classify every tensor of `ckpt` and check that the model is complete and consistent."""
    cfg = ckpt.config
    quant = cfg.get("quantization_config")
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if quant and method != "mxfp4":  # MXFP4 experts are decoded (Plan.expert); nothing else is quantized then
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
    moe_blocks = {spec.layout.moe_block, "mlp"}

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
            block, _, tail = rest.partition(".")
            if block in moe_blocks and tail in spec.layout.fused_experts and layout.glu:
                p.fused[(layer, spec.layout.fused_experts[tail])] = FusedRef(ref, False)
                continue
            f = _FUSED_RE.match(rest)
            if f and f.group(1) in moe_blocks and f.group(3):  # gpt-oss: expert biases, MXFP4 blocks and scales
                kind, part = "gate_up" if f.group(2) == "gate_up_proj" else "down", f.group(3)
                if part == "_bias":
                    p.fused_bias[(layer, kind)] = ref
                else:
                    p.mxfp4.setdefault((layer, kind), {})[part[1:]] = ref
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

    expert_layers = {k[0] for k in p.per_expert} | {k[0] for k in p.fused} | {k[0] for k in p.mxfp4}
    both = sorted({k[0] for k in p.per_expert} & ({k[0] for k in p.fused} | {k[0] for k in p.mxfp4}))
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
    declared = spec.layout.fused_transposed
    for layer in p.moe_layers:
        for kind, full in (("gate_up", (E, 2 * I, H)), ("down", (E, H, I))):
            _check_fused_extras(p, layer, kind, full)
            f = p.fused.get((layer, kind))
            if f is None:
                continue
            shape = tuple(f.ref.shape)
            transposed = (full[0], full[2], full[1])
            if shape == full and declared is not True:
                f.transposed = False
            elif shape == transposed and declared is not False:
                f.transposed = True
            else:
                raise CheckpointError(
                    f"{f.ref.name} is {list(shape)}, expected {list(full)} "
                    f"(num_experts={E}, hidden={H}, intermediate={I} from config.json)"
                )
        for e in range(E):
            for role in spec.layout.expert_role_order():
                fused_kind = "down" if role == "down" else "gate_up"
                if (layer, fused_kind) in p.fused or (layer, fused_kind) in p.mxfp4:
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


def _check_fused_extras(p: Plan, layer: int, kind: str, full: tuple[int, int, int]) -> None:
    """Layer `layer`'s MXFP4 blocks and scales and its expert biases for `kind` (gate_up or down,
    [E, out, in] = full): present where the layout needs them, shaped by config.json."""
    E, out, cols = full
    hf = f"model.layers.{layer}.{p.arch.layout.moe_block}.experts.{kind}_proj"
    refs = p.mxfp4.get((layer, kind))
    if refs is not None:
        if (layer, kind) in p.fused:
            raise CheckpointError(f"{hf} is there both as a float tensor and in MXFP4 blocks: keep one export")
        for part, shape in (("blocks", (E, out, cols // 32, 16)), ("scales", (E, out, cols // 32))):
            ref = refs.get(part)
            if ref is None:
                raise CheckpointError(
                    f"the checkpoint has no {hf}_{part} beside its MXFP4 {hf}_blocks/_scales: download it again"
                )
            if tuple(ref.shape) != shape or ref.dtype != "U8":
                raise CheckpointError(
                    f"{ref.name} is {ref.dtype} {list(ref.shape)}, expected U8 {list(shape)} (MXFP4 of "
                    f"num_experts={E}, [{out}, {cols}] per expert from config.json)"
                )
    bias = p.fused_bias.get((layer, kind))
    if p.arch.layout.expert_biases:
        if bias is None:
            raise CheckpointError(
                f"the checkpoint has no {hf}_bias: a shard is missing or incomplete; download it again"
            )
        if tuple(bias.shape) != (E, out):
            raise CheckpointError(f"{bias.name} is {list(bias.shape)}, expected {[E, out]} (from config.json)")
    elif bias is not None:
        raise CheckpointError(f"{bias.name} has no place in a {p.arch.name} model (its experts have no biases)")
