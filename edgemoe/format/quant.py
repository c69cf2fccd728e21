"""The QMatrix and expert blob layouts of docs/format.md, in numpy.

The converter writes with these functions and the native kernels (edgemoe._core)
read what they write. Everything here is plain numpy and favours clarity.

Group quantization, per group of `group_size` consecutive columns of a row,
with unsigned codes q in [0, 2^bits):

- asymmetric (kind 3): `w = scale * q + min`, min = group min,
  scale = (max - min) / (2^bits - 1); f16 scales and mins are stored.
- symmetric (kind 4): `w = scale * (q - 2^(bits-1))` (llama.cpp Q4_0 style):
  `m` is the group's value of largest magnitude (with its sign) and
  scale = m / -2^(bits-1), so `m` lands exactly on code 0; the code range
  [-2^(bits-1), 2^(bits-1)) is used in full, and only a value of the opposite
  sign and equal magnitude is clipped (by one step). The scale can therefore be
  negative. Only the f16 scales are stored; format version 1 wrote these as
  kind 3 with min = -2^(bits-1) * scale, the same values w.

Codes are computed from the f16-rounded scales (and mins) so that
dequantization reproduces what the quantizer intended.

MXFP4 (kind 5, OCP microscaling): per block of 32 consecutive columns of a row, 4-bit
e2m1 codes (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
negatives) and one E8M0 byte e: `w = e2m1(q) * 2^(e - 127)`. Never quantized here: the
converters carry gpt-oss's MXFP4 experts (and llama.cpp's MXFP4 tensors) over as they are.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from .. import _core

KIND_F32, KIND_F16, KIND_BF16, KIND_Q, KIND_QS, KIND_MXFP4 = 0, 1, 2, 3, 4, 5
FLOAT_KINDS = {"f32": KIND_F32, "f16": KIND_F16, "bf16": KIND_BF16}
KIND_NAMES = {v: k for k, v in FLOAT_KINDS.items()} | {KIND_Q: "q", KIND_QS: "qs", KIND_MXFP4: "mxfp4"}
QUANT_KINDS = (KIND_Q, KIND_QS)
QBITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
CHUNK = 32  # codes are packed per chunk of 32 consecutive values of a row
CHUNK_BYTES = {8: 32, 4: 16, 3: 12, 2: 8}

MATRIX_HEADER = struct.Struct("<IIBBHIIIII")  # 32 bytes, see docs/format.md
BLOB_MAGIC = b"EXPB"
BLOB_HEADER_BYTES = 64
EXPERTS_MAGIC = b"EDGEMOEX"
EXPERTS_HEADER_BYTES = 4096
FORMAT_VERSION = _core.FORMAT_VERSION  # the native store's; 2: symmetric matrices are kind 4 (no mins); 3: expert biases, activation and two-matrix (ReLU) experts; 4: MXFP4 matrices (kind 5)
ALIGN = 64
# the e2m1 (FP4) values of the 16 MXFP4 codes: sign bit 3, then 2 exponent bits and 1 mantissa bit
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
E8M0_NAN = 255  # the one E8M0 byte that is not a power of two


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


# ---------------------------------------------------------------- bf16 / f16


def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = np.isnan(w)
    out = rounded.astype(np.uint16)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep it a quiet NaN
    return out


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- packing


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """codes [rows, cols] (uint8, < 2^bits) -> packed bytes [rows, cols/32 * chunk_bytes]."""
    rows, cols = q.shape
    v = q.astype(np.uint8).reshape(rows, cols // CHUNK, CHUNK)
    p: np.ndarray
    if bits == 8:
        p = v
    elif bits == 4:
        p = v[..., :16] | (v[..., 16:] << 4)
    elif bits == 2:
        p = v[..., 0:8] | (v[..., 8:16] << 2) | (v[..., 16:24] << 4) | (v[..., 24:32] << 6)
    elif bits == 3:
        lo = pack_codes((q & 3).astype(np.uint8), 2).reshape(rows, cols // CHUNK, 8)
        hi = ((v >> 2) & 1).astype(np.uint32) << np.arange(CHUNK, dtype=np.uint32)
        word = np.bitwise_or.reduce(hi, axis=-1).astype("<u4")
        p = np.concatenate([lo, word[..., None].view(np.uint8)], axis=-1)
    else:
        raise ValueError(f"bits must be one of {QBITS}, got {bits}")
    return np.ascontiguousarray(p, dtype=np.uint8).reshape(rows, -1)


def unpack_codes(p: np.ndarray, bits: int, rows: int, cols: int) -> np.ndarray:
    """Inverse of pack_codes: packed bytes -> codes [rows, cols] uint8."""
    c = p.reshape(rows, cols // CHUNK, CHUNK_BYTES[bits])
    if bits == 8:
        v = c
    elif bits == 4:
        v = np.concatenate([c & 0xF, c >> 4], axis=-1)
    elif bits == 2:
        v = np.concatenate([(c >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    elif bits == 3:
        lo = unpack_codes(np.ascontiguousarray(c[..., :8]), 2, rows, cols).reshape(c.shape[:2] + (CHUNK,))
        word = np.ascontiguousarray(c[..., 8:12]).view("<u4")  # [rows, chunks, 1]
        hi = (word >> np.arange(CHUNK, dtype=np.uint32)) & 1
        v = lo | (hi.astype(np.uint8) << 2)
    else:
        raise ValueError(f"bits must be one of {QBITS}, got {bits}")
    return np.ascontiguousarray(v, dtype=np.uint8).reshape(rows, cols)


# ---------------------------------------------------------------- QMatrix


def _header(rows, cols, kind, bits, group_size, codes_off, scales_off, mins_off, total) -> bytes:
    return MATRIX_HEADER.pack(rows, cols, kind, bits, 0, group_size, codes_off, scales_off, mins_off, total)


def _quantize_codes(w: np.ndarray, bits: int, group_size: int, symmetric: bool):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size).astype(np.float32)
    levels = (1 << bits) - 1
    half = 1 << (bits - 1)
    if symmetric:
        idx = np.argmax(np.abs(g), axis=-1)[..., None]
        m = np.take_along_axis(g, idx, axis=-1)[..., 0]
        scale = (m / -half).astype(np.float16)
        mins = (np.float32(-half) * scale.astype(np.float32)).astype(np.float16)
    else:
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        mins = lo.astype(np.float16)
        scale = ((hi - mins.astype(np.float32)) / levels).astype(np.float16)
    s32, m32 = scale.astype(np.float32), mins.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(s32 != 0, 1.0 / s32, 0.0).astype(np.float32)  # zero-range group: all codes 0
    q = np.rint((g - m32[..., None]) * inv[..., None])
    q = np.clip(q, 0, levels).astype(np.uint8).reshape(rows, cols)
    return q, scale.reshape(rows, -1), mins.reshape(rows, -1)


def quantize_matrix(w: np.ndarray, bits: int, group_size: int, symmetric: bool, kind: int | None = None) -> np.ndarray:
    """float32 W[rows, cols] -> serialized group-quantized QMatrix: kind 4 when symmetric, else kind 3.

    kind=KIND_Q with symmetric=True writes format version 1's layout of the same values
    (kind 3, min = -2^(bits-1) * scale stored), for tests of old model directories.
    """
    if kind is None:
        kind = KIND_QS if symmetric else KIND_Q
    if kind not in QUANT_KINDS or (kind == KIND_QS and not symmetric):
        raise ValueError(f"kind must be {KIND_Q} (any quantization) or {KIND_QS} (symmetric only), got {kind}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if bits not in QBITS:
        raise ValueError(f"bits must be one of {QBITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"cols ({cols}) must be a multiple of group_size ({group_size})")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or inf")
    q, scale, mins = _quantize_codes(w, bits, group_size, symmetric)
    return _serialize(pack_codes(q, bits), scale, mins, rows, cols, kind, bits, group_size)


def symmetric_matrix(packed: np.ndarray, scales: np.ndarray, rows: int, cols: int, bits: int) -> np.ndarray:
    """A kind 4 QMatrix, groups of 32, from codes already packed as pack_codes does ([rows, cols/32 *
    chunk bytes] uint8) and one f16 scale per group ([rows, cols/32]): `w = scale * (q - 2^(bits-1))`.
    The GGUF importer carries llama.cpp's Q4_0 and Q8_0 blocks over with it, value for value."""
    if bits not in QBITS:
        raise ValueError(f"bits must be one of {QBITS}, got {bits}")
    if (
        cols % CHUNK
        or packed.shape != (rows, cols // CHUNK * CHUNK_BYTES[bits])
        or scales.shape != (rows, cols // CHUNK)
    ):
        raise ValueError(
            f"codes {packed.shape} and scales {scales.shape} do not make a [{rows}, {cols}] {bits}-bit matrix"
        )
    return _serialize(packed, scales.astype(np.float16), None, rows, cols, KIND_QS, bits, CHUNK)


def mxfp4_matrix(packed: np.ndarray, scales: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A kind 5 (MXFP4) QMatrix from e2m1 codes packed as pack_codes packs 4-bit codes ([rows, cols/2]
    uint8: per block of 32, byte j holds value j in its low and value j + 16 in its high nibble, as
    llama.cpp's MXFP4 blocks do) and one E8M0 byte per block ([rows, cols/32]): `w = e2m1(q) *
    2^(e - 127)`. No value changes: the converters carry MXFP4 weights over with it."""
    packed, scales = np.asarray(packed), np.asarray(scales)
    if cols % CHUNK or packed.shape != (rows, cols // 2) or scales.shape != (rows, cols // CHUNK):
        raise ValueError(f"codes {packed.shape} and scales {scales.shape} do not make a [{rows}, {cols}] MXFP4 matrix")
    if packed.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 codes and scales are uint8, got {packed.dtype} and {scales.dtype}")
    if (scales == E8M0_NAN).any():
        raise ValueError("an MXFP4 scale is NaN (E8M0 255): the weights are damaged")
    return _serialize(packed, scales, None, rows, cols, KIND_MXFP4, 4, CHUNK)


def mxfp4_to_float32(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The values of MXFP4 codes packed as mxfp4_matrix takes them ([rows, cols/2] uint8, [rows,
    cols/32] E8M0) -> float32 [rows, cols]."""
    rows, n = scales.shape
    codes = unpack_codes(np.ascontiguousarray(packed, np.uint8), 4, rows, n * CHUNK).reshape(rows, n, CHUNK)
    w = FP4_VALUES[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return w.reshape(rows, n * CHUNK)


def _serialize(packed, scale, mins, rows: int, cols: int, kind: int, bits: int, group_size: int) -> np.ndarray:
    codes_off = _align(MATRIX_HEADER.size)
    scales_off = _align(codes_off + packed.nbytes)
    if kind in (KIND_QS, KIND_MXFP4):  # no mins: kind 4's is -2^(bits-1) * scale, MXFP4 has none
        mins_off, total = 0, scales_off + scale.nbytes
    else:
        mins_off = _align(scales_off + scale.nbytes)
        total = mins_off + mins.nbytes
    buf = np.zeros(total, dtype=np.uint8)
    buf[:32] = np.frombuffer(
        _header(rows, cols, kind, bits, group_size, codes_off, scales_off, mins_off, total), np.uint8
    )
    buf[codes_off : codes_off + packed.nbytes] = packed.reshape(-1)
    if kind == KIND_MXFP4:
        buf[scales_off : scales_off + scale.nbytes] = scale.reshape(-1)
    else:
        buf[scales_off : scales_off + scale.nbytes] = scale.astype("<f2").reshape(-1).view(np.uint8)
    if kind == KIND_Q:
        assert mins is not None  # kind 3 stores its mins
        buf[mins_off : mins_off + mins.nbytes] = mins.astype("<f2").reshape(-1).view(np.uint8)
    return buf


def float_matrix(w: np.ndarray, kind: str) -> np.ndarray:
    """W[rows, cols] -> serialized float QMatrix of kind 'f32', 'f16' or 'bf16'.

    For 'bf16', a uint16 array is taken as bf16 bits and stored as is (lossless
    from bf16 checkpoints); a float array is rounded to nearest even.
    """
    if kind not in FLOAT_KINDS:
        raise ValueError(f"kind must be one of {sorted(FLOAT_KINDS)}, got {kind!r}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if kind == "f32":
        data, bits = w.astype("<f4"), 32
    elif kind == "f16":
        data = w.view("<f2") if w.dtype == np.uint16 else w.astype("<f2")
        bits = 16
    else:
        data = w.astype("<u2") if w.dtype == np.uint16 else f32_to_bf16_bits(w.astype(np.float32))
        bits = 16
    rows, cols = w.shape
    data_off = _align(MATRIX_HEADER.size)
    total = data_off + data.nbytes
    buf = np.zeros(total, dtype=np.uint8)
    buf[:32] = np.frombuffer(_header(rows, cols, FLOAT_KINDS[kind], bits, 0, data_off, 0, 0, total), np.uint8)
    buf[data_off:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return buf


def matrix_header(buf: np.ndarray, offset: int = 0) -> dict:
    """The QMatrix header at buf[offset:] as a dict (names as in docs/format.md)."""
    buf = np.asarray(buf, dtype=np.uint8)
    if offset + MATRIX_HEADER.size > buf.size:
        raise ValueError(f"buffer too small for a QMatrix header at offset {offset}")
    rows, cols, kind, bits, _zero, gs, codes, scales, mins, total = MATRIX_HEADER.unpack(
        buf[offset : offset + MATRIX_HEADER.size].tobytes()
    )
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown QMatrix kind {kind}")
    if offset + total > buf.size:
        raise ValueError(f"QMatrix at offset {offset} claims {total} bytes, buffer has {buf.size - offset}")
    return {
        "rows": rows,
        "cols": cols,
        "kind": kind,
        "kind_name": KIND_NAMES[kind],
        "bits": bits,
        "group_size": gs,
        "codes_offset": codes,
        "scales_offset": scales,
        "mins_offset": mins,
        "total_bytes": total,
    }


def dequantize_matrix(buf: np.ndarray, offset: int = 0) -> np.ndarray:
    """Serialized QMatrix (any kind) -> float32 W[rows, cols]."""
    buf = np.asarray(buf, dtype=np.uint8)
    h = matrix_header(buf, offset)
    rows, cols, kind = h["rows"], h["cols"], h["kind"]
    start = offset + h["codes_offset"]
    if kind == KIND_F32:
        return buf[start : start + rows * cols * 4].view("<f4").astype(np.float32).reshape(rows, cols)
    if kind == KIND_F16:
        return buf[start : start + rows * cols * 2].view("<f2").astype(np.float32).reshape(rows, cols)
    if kind == KIND_BF16:
        return bf16_bits_to_f32(buf[start : start + rows * cols * 2].view("<u2")).reshape(rows, cols)
    if kind == KIND_MXFP4:
        so = offset + h["scales_offset"]
        packed = buf[start : start + rows * cols // 2].reshape(rows, cols // 2)
        return mxfp4_to_float32(packed, buf[so : so + rows * cols // CHUNK].reshape(rows, cols // CHUNK))
    bits, gs = h["bits"], h["group_size"]
    ngroups = rows * cols // gs
    packed = buf[start : start + rows * cols // CHUNK * CHUNK_BYTES[bits]]
    q = unpack_codes(packed, bits, rows, cols).astype(np.float32)
    so, mo = offset + h["scales_offset"], offset + h["mins_offset"]
    scale = buf[so : so + 2 * ngroups].view("<f2").astype(np.float32).reshape(rows, cols // gs, 1)
    if kind == KIND_QS:
        mins = np.float32(-(1 << (bits - 1))) * scale  # exact: a power of two times an f16
    else:
        mins = buf[mo : mo + 2 * ngroups].view("<f2").astype(np.float32).reshape(rows, cols // gs, 1)
    return (q.reshape(rows, cols // gs, gs) * scale + mins).reshape(rows, cols)


# ---------------------------------------------------------------- sizes without the weights


def qmatrix_nbytes(rows: int, cols: int, bits: int, group_size: int = 64, symmetric: bool = False) -> int:
    """Byte size of the group-quantized QMatrix quantize_matrix writes for W[rows, cols] (its
    header, codes, f16 scales and, asymmetric, f16 mins, each section 64-byte aligned)."""
    if bits not in QBITS:
        raise ValueError(f"bits must be one of {QBITS}, got {bits}")
    if group_size not in GROUP_SIZES or cols % group_size:
        raise ValueError(f"cols ({cols}) must be a multiple of a group size in {GROUP_SIZES}, got {group_size}")
    codes = rows * (cols // CHUNK) * CHUNK_BYTES[bits]
    scales = 2 * rows * (cols // group_size)  # f16 per group; the mins take as much again
    scales_off = _align(_align(MATRIX_HEADER.size) + codes)
    return scales_off + scales if symmetric else _align(scales_off + scales) + scales


def mxfp4_matrix_nbytes(rows: int, cols: int) -> int:
    """Byte size of the MXFP4 QMatrix mxfp4_matrix writes for W[rows, cols] (4.25 bits per weight)."""
    if cols % CHUNK:
        raise ValueError(f"cols ({cols}) must be a multiple of {CHUNK} for MXFP4")
    return _align(_align(MATRIX_HEADER.size) + rows * cols // 2) + rows * cols // CHUNK


def float_matrix_nbytes(rows: int, cols: int, kind: str = "bf16") -> int:
    """Byte size of the float QMatrix float_matrix writes for W[rows, cols]."""
    if kind not in FLOAT_KINDS:
        raise ValueError(f"kind must be one of {sorted(FLOAT_KINDS)}, got {kind!r}")
    return _align(MATRIX_HEADER.size) + rows * cols * (4 if kind == "f32" else 2)


def matrix_nbytes(
    rows: int, cols: int, bits: int, group_size: int = 64, symmetric: bool = False, float_dtype: str = "bf16"
) -> int:
    """A QMatrix's byte size at `bits`: 16 keeps float_dtype, 8/4/3/2 group-quantize."""
    if bits == 16:
        return float_matrix_nbytes(rows, cols, float_dtype)
    return qmatrix_nbytes(rows, cols, bits, group_size, symmetric)


def expert_blob_nbytes(*sizes: int, bias_values: int = 0) -> int:
    """Exact length of the blob pack_expert_blob makes from matrices of these byte sizes
    (gate, up, down of a gated expert; up, down of a ReLU one) and bias_values float32 biases."""
    pos = BLOB_HEADER_BYTES
    for size in sizes[:-1]:
        pos = _align(pos + size)
    return _align(pos + sizes[-1]) + 4 * bias_values if bias_values else pos + sizes[-1]


def expert_nbytes(
    hidden: int,
    intermediate: int,
    bits: int,
    group_size: int = 64,
    symmetric: bool = False,
    float_dtype: str = "bf16",
    glu: bool = True,
) -> int:
    """Length of one expert blob (gate/up [I, H], down [H, I]; no gate when not glu) at `bits`,
    as the converter writes it; the experts file pads it to whole pages (manifest.page_bytes)."""
    up = matrix_nbytes(intermediate, hidden, bits, group_size, symmetric, float_dtype)
    down = matrix_nbytes(hidden, intermediate, bits, group_size, symmetric, float_dtype)
    return expert_blob_nbytes(up, up, down) if glu else expert_blob_nbytes(up, down)


# ---------------------------------------------------------------- expert blobs

EXPERT_ROLES = {3: ("gate", "up", "down"), 2: ("up", "down")}  # matrices in a blob, by count

ACT_SWIGLU, ACT_CLAMPED_SWIGLU = 0, 1  # the blob header's activation (docs/format.md)


@dataclasses.dataclass(frozen=True)
class Glu:
    """What a gated expert blob holds besides its three matrices: biases (float32 [I] gate, [I]
    up, [H] down, concatenated) and how gate and up are joined (ACT_SWIGLU: silu(g) * u;
    ACT_CLAMPED_SWIGLU: gpt-oss's (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),
    g' = min(g, limit))."""

    bias: np.ndarray | None = None
    activation: int = ACT_SWIGLU
    alpha: float = 1.0
    limit: float = 0.0

    @property
    def plain(self) -> bool:
        return self.bias is None and self.activation == ACT_SWIGLU


def pack_expert_blob(layer: int, expert: int, *mats_in: np.ndarray, glu: Glu | None = None) -> np.ndarray:
    """Serialized QMatrices -> one expert blob (exact length, no trailing padding): gate, up,
    down (a gated expert: down(act(gate x, up x)), with the biases and activation of `glu`) or
    up, down (ReLU: down(relu(up x)))."""
    if len(mats_in) not in EXPERT_ROLES:
        raise ValueError(f"an expert blob holds 3 (gated) or 2 (ReLU) matrices, got {len(mats_in)}")
    if len(mats_in) == 2 and glu is not None and not glu.plain:
        raise ValueError("a two-matrix (ReLU) expert carries no biases and no activation")
    mats = [np.asarray(m, dtype=np.uint8).reshape(-1) for m in mats_in]
    n = len(mats)
    if glu is not None and glu.bias is not None:
        mats.append(np.ascontiguousarray(glu.bias, dtype="<f4").view(np.uint8).reshape(-1))
    offsets, pos = [], BLOB_HEADER_BYTES
    for m in mats:
        offsets.append(pos)
        pos = _align(pos + m.size)
    total = offsets[-1] + mats[-1].size
    blob = np.zeros(total, dtype=np.uint8)
    pad = [0] * (3 - n)  # unused slots of the header's three
    sizes = [m.size for m in mats[:n]]
    header = BLOB_MAGIC + struct.pack("<III3I3I", layer, expert, n, *offsets[:n], *pad, *sizes, *pad)
    if glu is not None:
        boff, blen = (offsets[n], mats[n].size) if len(mats) > n else (0, 0)
        header += struct.pack("<IIIff", boff, blen, glu.activation, glu.alpha, glu.limit)
    blob[: len(header)] = np.frombuffer(header, np.uint8)
    for off, m in zip(offsets, mats):
        blob[off : off + m.size] = m
    return blob


def parse_blob(blob: np.ndarray) -> dict:
    """An expert blob's header: layer, expert, roles, offsets and sizes of its matrices, and its Glu."""
    blob = np.asarray(blob, dtype=np.uint8)
    if blob.size < BLOB_HEADER_BYTES or blob[:4].tobytes() != BLOB_MAGIC:
        raise ValueError("not an expert blob (bad magic or too short)")
    layer, expert, n, *rest = struct.unpack("<III3I3I", blob[4:40].tobytes())
    if n not in EXPERT_ROLES:
        raise ValueError(f"expert blob has {n} matrices, expected 3 (SwiGLU) or 2 (ReLU)")
    offsets, sizes = list(rest[:n]), list(rest[3 : 3 + n])
    for name, o, s in zip(EXPERT_ROLES[n], offsets, sizes):
        if o + s > blob.size:
            raise ValueError(f"{name} matrix [{o}, {o + s}) lies outside the {blob.size}-byte blob")
    boff, blen, act, alpha, limit = struct.unpack("<IIIff", blob[40:60].tobytes())
    if boff + blen > blob.size:
        raise ValueError(f"biases [{boff}, {boff + blen}) lie outside the {blob.size}-byte blob")
    bias = blob[boff : boff + blen].view("<f4").astype(np.float32) if blen else None
    glu = Glu(bias, act, alpha, limit)
    return {"layer": layer, "expert": expert, "roles": EXPERT_ROLES[n], "offsets": offsets, "sizes": sizes, "glu": glu}


def input_rounds_to_int8(blob: np.ndarray) -> bool:
    """Whether the one-token decode kernels (AVX2, NEON) round an expert's input to int8 and
    nothing else: every matrix that reads x (gate and up, or up of a ReLU expert) holds 4-bit
    codes of kind q or qs. False for a blob it cannot parse."""
    try:
        heads = [matrix_header(blob, off) for off in parse_blob(blob)["offsets"][:-1]]  # the matrices before down
    except ValueError:
        return False
    return all(h["kind"] in (KIND_Q, KIND_QS) and h["bits"] == 4 for h in heads)


def expert_matrices(blob: np.ndarray) -> tuple[np.ndarray, ...]:
    """Dequantized matrices of an expert blob: (gate [I, H], up [I, H], down [H, I]), or
    (up, down) for a ReLU expert."""
    return tuple(dequantize_matrix(blob, off) for off in parse_blob(blob)["offsets"])


def experts_file_header(num_layers: int, num_experts: int, num_blobs: int, file_bytes: int) -> np.ndarray:
    """The 4096-byte header of experts.bin."""
    h = np.zeros(EXPERTS_HEADER_BYTES, dtype=np.uint8)
    raw = EXPERTS_MAGIC + struct.pack(
        "<IIIIQQ", FORMAT_VERSION, EXPERTS_HEADER_BYTES, num_layers, num_experts, num_blobs, file_bytes
    )
    h[: len(raw)] = np.frombuffer(raw, np.uint8)
    return h
