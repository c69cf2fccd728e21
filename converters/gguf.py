"""GGUF files (llama.cpp's format): open one, and map its tensors to docs/format.md names.

Read with the `gguf` package (llama.cpp's own reader). The architecture file's GGUF layout
(edgemoe/models) says which metadata becomes which config key and which `blk.L.*` tensor
becomes which canonical backbone tensor; a layer's experts are the stacked
`ffn_{gate,up,down}_exps` tensors ([E, I, H], [E, I, H], [E, H, I], expert outermost, so one
expert is one contiguous range of the file).

A tensor stored as Q4_0 or Q8_0 is carried over into edgemoe's symmetric 32-column groups
(docs/format.md, kind 4) byte for byte: same codes, same f16 scales, so the same values;
one stored as MXFP4 becomes an MXFP4 matrix (kind 5) at 4 bits the same way. Every other
type (K-quants, IQ, ...) is dequantized with the gguf package and quantized again; `Report`
records the error that adds.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe import models
from edgemoe.errors import CheckpointError
from edgemoe.format import quant
from edgemoe.models.checkpoint import GGUF_EXPERTS, GGUF_GLOBAL, GGUFLayout

from .hf import ArchSpec, Plan

MAGIC = b"GGUF"

# bytes of one value of each GGUF metadata type (8: string, 9: array have their own rules)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4  # GGML_MAX_DIMS


def check_header(path: Path) -> None:
    """Walk a GGUF file's header (metadata and tensor table) and refuse one whose counts or
    lengths run past the end of the file, before the gguf package reads it: that reader trusts
    them, so a damaged count made it loop for minutes while its memory grew."""
    size = path.stat().st_size

    def bad(what: str, at: int) -> CheckpointError:
        return CheckpointError(
            f"{path} is damaged or truncated: {what} at byte {at} runs past the end of the file ({size} bytes); "
            f"download it again"
        )

    with open(path, "rb") as f:
        if size < 24:
            raise bad("the header", 0)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos = 0

            def take(fmt: str, what: str) -> Any:
                nonlocal pos
                n = struct.calcsize(fmt)
                if pos + n > size:
                    raise bad(what, pos)
                v = struct.unpack_from(fmt, m, pos)[0]
                pos += n
                return v

            def skip(n: int, what: str) -> None:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise bad(what, pos)
                pos += n

            def string(what: str) -> None:
                skip(take("<Q", what), what)

            def value(kind: int, what: str, depth: int = 0) -> None:
                if kind in _SCALAR_BYTES:
                    skip(_SCALAR_BYTES[kind], what)
                elif kind == 8:
                    string(what)
                elif kind == 9 and depth < 3:
                    item, count = take("<I", what), take("<Q", what)
                    if item in _SCALAR_BYTES:
                        skip(count * _SCALAR_BYTES[item], what)
                    elif item in (8, 9):
                        if count * 8 > size - pos:  # every item takes at least 8 bytes
                            raise bad(what, pos)
                        for _ in range(count):
                            value(item, what, depth + 1)
                    else:
                        raise CheckpointError(
                            f"{path}: {what} has an unknown array item type {item}: the file is damaged"
                        )
                else:
                    raise CheckpointError(f"{path}: {what} has an unknown value type {kind}: the file is damaged")

            skip(4, "the magic")
            take("<I", "the version")
            n_tensors, n_kv = take("<Q", "the tensor count"), take("<Q", "the metadata count")
            if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
                raise bad(f"a header of {n_kv} metadata entries and {n_tensors} tensors", pos)
            for i in range(n_kv):
                string(f"metadata entry {i}'s key")
                value(take("<I", f"metadata entry {i}'s type"), f"metadata entry {i}")
            for i in range(n_tensors):
                string(f"tensor {i}'s name")
                dims = take("<I", f"tensor {i}'s dimensions")
                if not 1 <= dims <= _MAX_DIMS:
                    raise CheckpointError(
                        f"{path}: tensor {i} has {dims} dimensions (GGUF allows 1 to 4): the file is damaged"
                    )
                skip(8 * dims + 4 + 8, f"tensor {i}'s shape, type and offset")


# ggml types edgemoe's kernels represent exactly (symmetric groups of 32, f16 scales) -> bits
EXACT = {"Q4_0": 4, "Q8_0": 8}
FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
# the bitwidth a conversion keeps by default for a type it must quantize again: the nearest
# edgemoe bitwidth at or above the type's own (5 and 6 bits go to 8)
NOMINAL_BITS = {
    "Q4_0": 4,
    "Q4_1": 4,
    "Q5_0": 8,
    "Q5_1": 8,
    "Q8_0": 8,
    "Q8_1": 8,
    "Q2_K": 2,
    "Q3_K": 3,
    "Q4_K": 4,
    "Q5_K": 8,
    "Q6_K": 8,
    "Q8_K": 8,
    "IQ1_S": 2,
    "IQ1_M": 2,
    "IQ2_XXS": 2,
    "IQ2_XS": 2,
    "IQ2_S": 2,
    "IQ3_XXS": 3,
    "IQ3_S": 3,
    "IQ4_NL": 4,
    "IQ4_XS": 4,
    "TQ1_0": 2,
    "TQ2_0": 2,
    "MXFP4": 4,
    "F16": 16,
    "BF16": 16,
    "F32": 16,
}


def is_gguf(path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile:
    """A GGUF file: its metadata and tensors, checked on open (a truncated file is reported here)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is not a file: pass a .gguf file or a Hugging Face checkpoint folder")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != MAGIC:
            raise CheckpointError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}): pass a .gguf file "
                f"written by llama.cpp, or a Hugging Face checkpoint folder"
            )
        try:
            from gguf import GGUFReader  # deferred: HF conversions and the runtime do not need it
        except ImportError:
            raise CheckpointError(
                f"reading {self.path.name} needs the gguf package, which edgemoe installs: pip install gguf"
            ) from None

        check_header(self.path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, IndexError, OverflowError, UnicodeDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{self.path} cannot be read as GGUF ({type(e).__name__}: {e}): the file is truncated or damaged "
                f"({size} bytes); download it again"
            ) from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, the file "
                    f"has {size}; download it again"
                )
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise CheckpointError(
                    f"{self.path}: metadata {key} cannot be read ({e}): the file is damaged"
                ) from None

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name


# ---------------------------------------------------------------- what the conversion added


@dataclasses.dataclass
class _Class:
    tensors: int = 0
    carried: int = 0  # stored values kept exactly (Q4_0/Q8_0 carried over, or a float type kept)
    err2: float = 0.0  # sum of squared differences to the GGUF's values
    ref2: float = 0.0  # sum of squares of the GGUF's values
    types: dict[str, int] = dataclasses.field(default_factory=dict)
    stored_as: dict[str, int] = dataclasses.field(default_factory=dict)


class Report:
    """Per tensor class (experts.gate, attn_q, tok_embeddings, ...): the GGUF types read, what
    they were stored as, and the relative RMS error the conversion added to their values."""

    def __init__(self) -> None:
        self.classes: dict[str, _Class] = {}

    def add(self, cls: str, gguf_type: str, stored_as: str, src: np.ndarray | None, ours: np.ndarray | None) -> None:
        c = self.classes.setdefault(cls, _Class())
        c.tensors += 1
        c.types[gguf_type] = c.types.get(gguf_type, 0) + 1
        c.stored_as[stored_as] = c.stored_as.get(stored_as, 0) + 1
        if src is None or ours is None:
            c.carried += 1
            return
        src64 = src.astype(np.float64)
        c.err2 += float(np.sum((ours.astype(np.float64) - src64) ** 2))
        c.ref2 += float(np.sum(src64**2))

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(self.classes):
            c = self.classes[name]
            out[name] = {
                "tensors": c.tensors,
                "gguf_types": dict(sorted(c.types.items())),
                "stored_as": dict(sorted(c.stored_as.items())),
                "exact": c.carried,
                "relative_rms_error": (c.err2 / c.ref2) ** 0.5 if c.ref2 > 0 else 0.0,
            }
        return out


def format_gguf_report(manifest: dict) -> str:
    """What a GGUF conversion did to each tensor class, from the manifest it wrote."""
    lines = ["from GGUF: tensor class, GGUF types -> stored as, error added to the GGUF's values"]
    for name, s in manifest["source"].get("tensors", {}).items():
        types = ", ".join(f"{t} x{n}" for t, n in s["gguf_types"].items())
        stored = ", ".join(f"{t} x{n}" for t, n in s["stored_as"].items())
        err = "exact" if s["exact"] == s["tensors"] else f"relative RMS error {s['relative_rms_error']:.2e}"
        lines.append(f"  {name:<24} {types:<16} -> {stored:<30} {err}")
    again = sorted(
        {
            t
            for n, s in manifest["source"].get("tensors", {}).items()
            if n.startswith("experts.") and s["exact"] < s["tensors"]
            for t in s["gguf_types"]
        }
    )
    if again and manifest["quantization"]["bits"] not in (8, 16):
        lines.append(
            f"  the experts ({', '.join(again)}) were quantized again at {manifest['quantization']['bits']} bits: "
            f"--bits 8 keeps them closer to the file at twice the bytes"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- one weight as stored


class GGUFWeight:
    """One tensor of a GGUF file, or one expert's slice of a stacked one, as stored: raw bytes
    [..., row bytes] of ggml type `gguf_type`, `shape` in numpy order (rows, cols).

    `rows` reorders the rows (llama's q/k, see GGUFLayout.rope_interleaved); whole rows move, so
    a quantized tensor stays exact."""

    def __init__(self, cls: str, gguf_type: str, raw: np.ndarray, shape: tuple[int, ...], report: Report, rows=None):
        self.cls, self.gguf_type, self.raw, self.shape, self.report = cls, gguf_type, raw, shape, report
        self.rows = rows

    def _raw(self) -> np.ndarray:
        r = np.asarray(self.raw)
        return r[self.rows] if self.rows is not None else r

    def float32(self) -> np.ndarray:
        """The values llama.cpp computes with, dequantized by the gguf package: float32 [shape]."""
        from gguf import GGMLQuantizationType, quants  # deferred (see GGUFFile)

        raw = np.ascontiguousarray(self._raw())
        if self.gguf_type == "F32":
            return raw.view(np.float32).reshape(self.shape).copy()
        if self.gguf_type == "F16":
            return raw.view(np.float16).astype(np.float32).reshape(self.shape)
        try:
            out = quants.dequantize(raw, GGMLQuantizationType[self.gguf_type])
        except NotImplementedError:
            raise CheckpointError(
                f"{self.cls} is stored as {self.gguf_type}, which the installed gguf package cannot dequantize: "
                f"upgrade it (pip install -U gguf), or requantize the file with llama-quantize to a type such as "
                f"Q8_0, Q4_0 or Q4_K_M"
            ) from None
        return np.asarray(out, dtype=np.float32).reshape(self.shape)

    def stored_float(self) -> tuple[np.ndarray, str] | None:
        """(array, safetensors dtype) when the tensor is stored as a float type; else None."""
        raw = np.ascontiguousarray(self._raw())
        if self.gguf_type == "F32":
            return raw.view("<f4").reshape(self.shape), "F32"
        if self.gguf_type == "F16":
            return raw.view("<f2").reshape(self.shape), "F16"
        if self.gguf_type == "BF16":
            return raw.view("<u2").reshape(self.shape), "BF16"
        return None

    def exact_matrix(self, bits: int, group_size: int) -> np.ndarray | None:
        """The tensor as a QMatrix holding exactly its values: kind 4 when its type is Q4_0 at 4 bits or
        Q8_0 at 8 bits with groups of 32, kind 5 when it is MXFP4 at 4 bits (its blocks are 32 wide
        whatever the group size); else None."""
        if self.gguf_type == "MXFP4" and bits == 4 and len(self.shape) == 2:
            rows, cols = self.shape
            # llama.cpp's block_mxfp4: the E8M0 byte, then 16 bytes with value j in the low and
            # j + 16 in the high nibble of byte j: pack_codes' layout
            blocks = np.ascontiguousarray(self._raw()).reshape(rows, cols // quant.CHUNK, 1 + quant.CHUNK_BYTES[4])
            scales = np.ascontiguousarray(blocks[..., 0])
            if (scales == quant.E8M0_NAN).any():
                raise CheckpointError(f"{self.cls} has a NaN MXFP4 scale (E8M0 255): the file is damaged")
            return quant.mxfp4_matrix(np.ascontiguousarray(blocks[..., 1:]).reshape(rows, -1), scales, rows, cols)
        if EXACT.get(self.gguf_type) != bits or group_size != quant.CHUNK or len(self.shape) != 2:
            return None
        rows, cols = self.shape
        block = 2 + quant.CHUNK_BYTES[bits]  # f16 scale, then the codes of 32 values
        blocks = np.ascontiguousarray(self._raw()).reshape(rows, cols // quant.CHUNK, block)
        scales = blocks[..., :2].copy().view("<f2")[..., 0]
        codes = blocks[..., 2:]
        if bits == 8:  # Q8_0 codes are int8 q with w = d * q; kind 4 stores q + 128 with w = d * (code - 128)
            codes = codes ^ np.uint8(0x80)
        # Q4_0's byte j holds value j (low nibble) and value j + 16 (high nibble): pack_codes' layout
        return quant.symmetric_matrix(codes.reshape(rows, -1), scales, rows, cols, bits)

    def encode(self, bits: int, group_size: int, symmetric: bool, record: bool = True) -> np.ndarray:
        """The weight as a serialized QMatrix at `bits` (16: a float matrix), exact when it can be;
        `record` adds what was done to the report (off for the low-bit fallback copies)."""
        report = self.report if record else Report()
        if bits == 16:
            stored = self.stored_float()
            if stored is not None:
                report.add(self.cls, self.gguf_type, stored[1], None, None)
                return quant.float_matrix(stored[0], {"F32": "f32", "F16": "f16", "BF16": "bf16"}[stored[1]])
            w = self.float32()
            buf = quant.float_matrix(w, "f16")
            report.add(self.cls, self.gguf_type, "F16", w, w.astype(np.float16).astype(np.float32))
            return buf
        exact = self.exact_matrix(bits, group_size)
        if exact is not None:
            how = "MXFP4" if self.gguf_type == "MXFP4" else f"{bits}-bit g{group_size}"
            report.add(self.cls, self.gguf_type, f"{how} (carried over)", None, None)
            return exact
        w = self.float32()
        buf = quant.quantize_matrix(w, bits, group_size, symmetric)
        kind = "symmetric" if symmetric else "asymmetric"
        report.add(self.cls, self.gguf_type, f"{bits}-bit g{group_size} {kind}", w, quant.dequantize_matrix(buf))
        return buf

    def backbone_float(self, float32: bool = False) -> tuple[np.ndarray, str]:
        """The weight for a float backbone tensor: as stored when it is a float type, else dequantized
        to f16 (routers, embeddings and norms are never group-quantized); float32 (FLOAT32_ROLES):
        always float32, exact from any type."""
        if float32:
            w = self.float32()
            self.report.add(self.cls, self.gguf_type, "F32", None, None)
            return w, "F32"
        stored = self.stored_float()
        if stored is not None:
            self.report.add(self.cls, self.gguf_type, stored[1], None, None)
            return stored
        w = self.float32()
        half = w.astype(np.float16)
        self.report.add(self.cls, self.gguf_type, "F16", w, half.astype(np.float32))
        return half, "F16"


# ---------------------------------------------------------------- the mapping plan


@dataclasses.dataclass
class GGUFPlan(Plan):
    """Where every tensor of the canonical model comes from in a GGUF file (Plan's fields; experts
    are read per expert from the stacked tensors)."""

    file: GGUFFile | None = None
    gguf: GGUFLayout | None = None
    report: Report = dataclasses.field(default_factory=Report)
    stacked: dict[tuple[int, str], str] = dataclasses.field(default_factory=dict)  # (layer, role) -> tensor name
    # (layer, role) -> the stacked experts' biases [E, rows] (gpt-oss)
    stacked_bias: dict[tuple[int, str], str] = dataclasses.field(default_factory=dict)
    weights: dict[str, GGUFWeight] = dataclasses.field(default_factory=dict)  # canonical backbone name -> weight

    @property
    def layout(self) -> str:
        return "gguf"

    @property
    def expert_dtype(self) -> str:
        """The float dtype of 16-bit experts: as stored for a float GGUF, else f16."""
        assert self.file is not None
        types = {self.file.type_name(n) for n in self.stacked.values()}
        return FLOATS[types.pop()] if len(types) == 1 and next(iter(types)) in FLOATS else "F16"

    def expert(self, layer: int, expert: int) -> tuple[GGUFWeight, GGUFWeight, GGUFWeight]:
        assert self.file is not None
        out = []
        for role in ("gate", "up", "down"):
            name = self.stacked[(layer, role)]
            t = self.file.tensors[name]
            shape = (self.intermediate, self.hidden) if role != "down" else (self.hidden, self.intermediate)
            raw = t.data[expert].view(np.uint8)  # [rows, row bytes]: one contiguous range of the file
            out.append(GGUFWeight(f"experts.{role}", t.tensor_type.name, raw, shape, self.report))
        return out[0], out[1], out[2]

    def glu(self, layer: int, expert: int) -> quant.Glu | None:
        """The expert's biases (float32 as the file stores them) and the layout's activation."""
        assert self.file is not None
        act, alpha, limit = self.arch.layout.expert_activation(self.config)
        if not self.arch.layout.expert_biases:
            return None if act == 0 else quant.Glu(None, act, alpha, limit)
        parts = []
        for role in ("gate", "up", "down"):
            t = self.file.tensors[self.stacked_bias[(layer, role)]]
            if t.tensor_type.name not in ("F32", "F16"):
                raise CheckpointError(f"{t.name} is {t.tensor_type.name}; expert biases are read as F32 or F16")
            parts.append(np.asarray(t.data[expert], np.float32))
        return quant.Glu(np.concatenate(parts), act, alpha, limit)

    @property
    def has_mxfp4_experts(self) -> bool:
        assert self.file is not None
        return any(self.file.type_name(n) == "MXFP4" for n in self.stacked.values())

    def carries_over(self, bits: int | str, group_size: int) -> bool:
        """Whether every expert tensor is exactly representable at `bits` with groups of `group_size`."""
        assert self.file is not None
        types = {self.file.type_name(n) for n in self.stacked.values()}
        return group_size == quant.CHUNK and bool(types) and all(EXACT.get(t) == bits for t in types)

    def type_counts(self, names) -> dict[str, int]:
        assert self.file is not None
        counts: dict[str, int] = {}
        for n in names:
            t = self.file.type_name(n)
            counts[t] = counts.get(t, 0) + 1
        return counts

    def default_bits(self) -> int:
        """The experts' bitwidth when none is asked: their gate/up type's (Q4_0 -> 4, Q8_0 -> 8, F16 -> 16,
        Q4_K -> 4, Q6_K -> 8, ...), the most common over the layers."""
        counts = self.type_counts(n for (_, role), n in self.stacked.items() if role != "down")
        top = max(counts, key=lambda t: counts[t]) if counts else "F16"
        return NOMINAL_BITS.get(top, 8)

    def backbone_bits_for(self, weight: GGUFWeight) -> int:
        """A backbone matrix's bitwidth when none is asked, from its own type: Q4_0 and Q8_0 carry over
        at 4 and 8, float types stay 16, the others go to the nearest of 4 and 8 at or above their own
        (llama.cpp's quantizer keeps the output head and some attention matrices above the rest)."""
        bits = NOMINAL_BITS.get(weight.gguf_type, 8)
        return 16 if bits == 16 else 4 if bits <= 4 else 8

    def default_backbone_bits(self, expert_bits: int) -> int:
        """The backbone's bitwidth the manifest names when none is asked: the attention matrices' type's
        (16, 8 or 4); each matrix follows its own type (backbone_bits_for)."""
        names = (
            [n for n in self.file.tensors if n.endswith(("attn_q.weight", "attn_output.weight"))] if self.file else []
        )
        counts = self.type_counts(names)
        if not counts:
            return 16 if expert_bits == 16 else 8
        bits = NOMINAL_BITS.get(max(counts, key=lambda t: counts[t]), 8)
        return 16 if bits == 16 else 8 if bits == 8 else 4

    def source_section(self) -> dict[str, Any]:
        assert self.file is not None
        meta = self.file.metadata
        return {
            "path": str(self.file.path.resolve()),
            "format": "gguf",
            "dtype": self.expert_dtype.lower(),
            "layout": "gguf",
            "gguf_architecture": meta.get("general.architecture"),
            "gguf_file_type": meta.get("general.file_type"),
            "tensors": self.report.summary(),
        }


_BLK = "blk."


def _weight(file: GGUFFile, name: str, cls: str, report: Report, rows=None, row_vector: bool = False) -> GGUFWeight:
    t = file.tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if row_vector and len(shape) == 1:
        shape = (1, shape[0])
    raw = t.data.view(np.uint8) if t.data.dtype != np.uint8 else t.data
    raw = raw.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else raw.reshape(-1)
    if t.tensor_type.name not in NOMINAL_BITS:
        raise CheckpointError(
            f"tensor {name} of {file.path.name} is stored as {t.tensor_type.name}, a type edgemoe cannot read: "
            f"requantize the file with llama-quantize to one such as Q8_0, Q4_0 or Q4_K_M"
        )
    return GGUFWeight(cls, t.tensor_type.name, raw, shape, report, rows)


def interleaved_to_halves(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes convert_hf_to_gguf's q/k permutation: llama.cpp's RoPE rotates pairs of
    adjacent dimensions, transformers' (and edgemoe's) the two halves of each head."""
    hd = rows // heads
    return np.arange(rows).reshape(heads, hd // 2, 2).swapaxes(1, 2).reshape(-1)


def plan_gguf(path) -> GGUFPlan:
    """Classify every tensor of the GGUF file at `path` and check the model is complete."""
    f = GGUFFile(path)
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{f.path} has no general.architecture: it is not a model file llama.cpp wrote")
    _, module = models.get_gguf(arch, str(f.path))
    layout: GGUFLayout = module.GGUF
    names = set(f.tensors)
    cfg = layout.config(f.metadata, names)
    spec = ArchSpec(layout.model_type, module.LAYOUT)  # the manifest names the model_type
    p = GGUFPlan(spec, cfg, file=f, gguf=layout)

    def need(key: str) -> int:
        if cfg.get(key) in (None, 0):
            raise CheckpointError(
                f"{f.path.name} has no {arch}.{dict(GGUF_KEYS_HINT).get(key, key)} in its metadata "
                f"(edgemoe's {key}): the file is damaged or not a complete {arch} model"
            )
        return int(cfg[key])

    p.num_layers = need("num_hidden_layers")
    p.hidden = need("hidden_size")
    if not cfg.get(layout.experts_key):
        raise CheckpointError(
            f"{f.path.name} is a dense {arch} model ({arch}.expert_count is missing or 0): edgemoe runs "
            f"Mixture-of-Experts models; use a MoE GGUF (Mixtral, Qwen-MoE, OLMoE)"
        )
    p.num_experts = spec.num_experts(cfg)
    p.top_k = need("num_experts_per_tok")
    p.intermediate = need(module.LAYOUT.intermediate_key)
    p.moe_layers = spec.moe_layers(cfg)
    heads, kv_heads = need("num_attention_heads"), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])

    merged_from = {name: role for role, (sources, _) in layout.merged.items() for name in sources}
    parts: dict[tuple[int, str], dict[str, str]] = {}  # (layer, merged role) -> {GGUF name after blk.L.: tensor}
    for tname in sorted(names):
        if tname in GGUF_GLOBAL:
            p.weights[GGUF_GLOBAL[tname]] = _weight(f, tname, GGUF_GLOBAL[tname], p.report)
            continue
        if tname.startswith(_BLK):
            layer_s, _, rest = tname[len(_BLK) :].partition(".")
            if layer_s.isdigit():
                layer = int(layer_s)
                if layer >= p.num_layers:
                    raise CheckpointError(
                        f"tensor {tname} belongs to layer {layer}, but {arch}.block_count says {p.num_layers} "
                        f"layers: the file is damaged"
                    )
                if rest in GGUF_EXPERTS:
                    p.stacked[(layer, GGUF_EXPERTS[rest])] = tname
                    continue
                if rest in merged_from:
                    parts.setdefault((layer, merged_from[rest]), {})[rest] = tname
                    continue
                if rest.endswith(".bias") and rest[:-5] + ".weight" in GGUF_EXPERTS and module.LAYOUT.expert_biases:
                    p.stacked_bias[(layer, GGUF_EXPERTS[rest[:-5] + ".weight"])] = tname
                    continue
                if rest in layout.tensors:
                    role = layout.tensors[rest]
                    rows = None
                    if layout.rope_interleaved and role in ("attn_q", "attn_k"):
                        n = int(f.tensors[tname].shape[1])  # GGUF shapes list columns first
                        rows = interleaved_to_halves(n, heads if role == "attn_q" else kv_heads)
                    vec = role in layout.row_vectors
                    p.weights[f"layers.{layer}.{role}"] = _weight(f, tname, role, p.report, rows, vec)
                    continue
        raise CheckpointError(
            f"tensor {tname} of {f.path.name} has no place in a {layout.model_type} model as edgemoe knows it "
            f"(RoPE frequency factors, a vision tower or another architecture's tensor?): "
            f"use a plain {arch} MoE GGUF"
        )
    for (layer, role), found in sorted(parts.items()):
        sources, merge = layout.merged[role]
        missing = [n for n in sources if n not in found]
        if missing:
            raise CheckpointError(
                f"{f.path.name} has no tensor blk.{layer}.{missing[0]} (part of edgemoe's layers.{layer}.{role}): "
                f"the file is not a complete {arch} model"
            )
        values = [_weight(f, found[n], n.split(".")[0], p.report).float32() for n in sources]
        w = np.ascontiguousarray(merge(*values), dtype=np.float32)
        p.weights[f"layers.{layer}.{role}"] = GGUFWeight(role, "F32", w.view(np.uint8), w.shape, p.report)
    _check_complete(p, cfg, arch)
    return p


GGUF_KEYS_HINT = (
    ("num_hidden_layers", "block_count"),
    ("hidden_size", "embedding_length"),
    ("num_experts_per_tok", "expert_used_count"),
    ("num_attention_heads", "attention.head_count"),
    ("intermediate_size", "feed_forward_length"),
    ("moe_intermediate_size", "expert_feed_forward_length"),
)


def _check_complete(p: GGUFPlan, cfg: dict, arch: str) -> None:
    assert p.file is not None and p.gguf is not None
    reverse = {v: k for k, v in p.gguf.tensors.items()}
    for canonical, gguf_name in (("tok_embeddings", "token_embd.weight"), ("output_norm", "output_norm.weight")):
        if canonical not in p.weights:
            raise CheckpointError(
                f"{p.file.path.name} has no tensor {gguf_name}: the file is not a complete {arch} model"
            )
    moe = set(p.moe_layers)
    for layer in range(p.num_layers):
        for c in p.arch.layout.layer_tensor_names(cfg, layer in moe):
            if f"layers.{layer}.{c}" not in p.weights:
                raise CheckpointError(
                    f"{p.file.path.name} has no tensor blk.{layer}.{reverse.get(c, c)} (edgemoe's layers.{layer}.{c}): "
                    f"the file is not a complete {arch} model"
                )
    H, I, E = p.hidden, p.intermediate, p.num_experts
    want = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
    for layer in p.moe_layers:
        for role, shape in want.items():
            name = p.stacked.get((layer, role))
            if name is None:
                raise CheckpointError(
                    f"{p.file.path.name} has no blk.{layer}.ffn_{role}_exps.weight: the file is not a complete {arch} model"
                )
            have = tuple(int(d) for d in reversed(p.file.tensors[name].shape.tolist()))
            if have != shape:
                raise CheckpointError(
                    f"{name} is {list(have)}, expected {list(shape)} (experts={E}, hidden={H}, intermediate={I} "
                    f"from the metadata): the file is damaged"
                )
            if p.arch.layout.expert_biases:
                bias = p.stacked_bias.get((layer, role))
                if bias is None:
                    raise CheckpointError(
                        f"{p.file.path.name} has no blk.{layer}.ffn_{role}_exps.bias: the file is not a complete {arch} model"
                    )
                have = tuple(int(d) for d in reversed(p.file.tensors[bias].shape.tolist()))
                if have != shape[:2]:
                    raise CheckpointError(f"{bias} is {list(have)}, expected {list(shape[:2])}: the file is damaged")
    extra = sorted({layer for layer, _ in p.stacked} - moe)
    if extra:
        raise CheckpointError(f"layers {extra} hold experts the metadata does not account for: the file is damaged")
