"""Hugging Face checkpoint -> edgemoe model directory (docs/format.md), numpy only.

    manifest = convert("Mixtral-8x7B", "mixtral-q4", bits=4)

The checkpoint is read one tensor (one expert) at a time with plain file
reads, so a checkpoint larger than RAM converts. Everything is written into a
hidden sibling directory that is renamed into place at the very end: an
interrupted conversion never leaves a directory with a manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edgemoe import _core
from edgemoe.errors import CheckpointError, EdgeMoEError
from edgemoe.format import quant
from edgemoe.format.manifest import BLOB_COLUMNS, FALLBACK_VERSION, FORMAT_VERSION, load_manifest, write_manifest
from edgemoe.format.safetensors import FLOAT_KIND, TORCH_NAME, SafetensorsWriter, fsync_path, to_float32
from edgemoe.models.checkpoint import float32_role, quantizable

from .gguf import GGUFPlan, GGUFWeight, is_gguf, plan_gguf
from .gguf_vocab import write_tokenizer
from .hf import Checkpoint, MXFP4Weight, Plan, plan_conversion

ALIGNMENT = 4096
EXPERTS_FILE = "experts.bin"
FALLBACK_FILE = "experts.fallback.bin"  # low-bit copies of the experts (HOBBIT's fallback on a miss)
FALLBACK_BITS = (4, 3, 2)
BACKBONE_FILE = "backbone.safetensors"
BITS = (16, 8, 4, 3, 2)
BACKBONE_BITS = (16, 8, 4)
# copied verbatim when present
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named chat templates beside the default one


class Progress:
    """A one-line progress bar on stderr (no dependency); silent when disabled."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.done, self.nbytes = 0, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last > 0.2:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        rate = self.nbytes / max(now - self.start, 1e-9) / 1e6
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:7.1f} MB/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


def convert(
    src,
    dst,
    bits: int | str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    backbone_bits: int | None = None,
    bits_map: dict[tuple[int, int], int] | None = None,
    fallback_bits: int | None = None,
) -> dict:
    """Convert the Hugging Face checkpoint folder or GGUF file at `src` into an edgemoe model directory `dst`.

    bits: 16 stores experts as in the checkpoint (bf16/f16/f32, lossless); 8, 4,
    3 or 2 group-quantize them with `group_size` columns per group (default 64;
    symmetric default False). Default: 16 for a checkpoint folder.
    A GGUF file (docs/gguf.md): bits default to the experts' stored type's (Q4_0 -> 4,
    Q8_0 -> 8, F16 -> 16, Q4_K -> 4, ...), group_size to 32; Q4_0 at 4 bits and Q8_0 at 8
    bits with groups of 32 are carried over exactly (symmetric), other types are
    dequantized and quantized again, and manifest["source"]["tensors"] reports the error.
    MXFP4 experts (gpt-oss as released, or a GGUF's MXFP4 tensors) at 4 bits are kept as MXFP4
    matrices, exactly, whatever group_size and symmetric say (docs/format.md, kind 5).
    bits_map: {(layer, expert): bits} per-expert bitwidths overriding `bits`;
    with bits="auto" it must name every expert (edgemoe.allocate.convert_auto
    chooses one from measured importance).
    backbone_bits: 16 keeps the backbone's large matrices (attention, dense and
    shared MLPs, output head) in the checkpoint's dtype; 8 or 4 group-quantizes
    them. Default: 16 when every expert is at 16 bits, else 8. Routers,
    embeddings, norms and biases always keep the checkpoint's dtype.
    fallback_bits: 2, 3 or 4 also writes a low-bit copy of every expert stored
    at more bits (experts.fallback.bin, same group size), which
    load(..., fallback=True) reads on a miss for a low gate weight. Returns the manifest.
    Raises CheckpointError / UnsupportedArchitectureError naming the fix.
    """
    src, dst = Path(src), Path(dst)
    gguf = is_gguf(src)
    if group_size is None:
        group_size = 32 if gguf else 64
    if bits is not None and bits != "auto" and bits not in BITS:
        raise EdgeMoEError(f"bits must be one of {', '.join(map(str, BITS))} or 'auto', got {bits}")
    bits_map = {(int(k[0]), int(k[1])): int(v) for k, v in (bits_map or {}).items()}
    bad = sorted({b for b in bits_map.values() if b not in BITS})
    if bad:
        raise EdgeMoEError(f"bits_map holds bitwidths {bad}; each must be one of {', '.join(map(str, BITS))}")
    if bits == "auto" and not bits_map:
        raise EdgeMoEError(
            "bits='auto' needs a bits_map naming every expert's bitwidth: "
            "use edgemoe.allocate.convert_auto (`edgemoe convert --bits auto`) to choose one"
        )
    check_fallback_bits(fallback_bits)
    if backbone_bits is not None and backbone_bits not in BACKBONE_BITS:
        raise EdgeMoEError(f"backbone bits must be one of {', '.join(map(str, BACKBONE_BITS))}, got {backbone_bits}")
    check_destination(src, dst, overwrite)
    plan: Plan = plan_gguf(src) if gguf else plan_conversion(Checkpoint(src))
    if bits is None:
        bits = plan.default_bits() if isinstance(plan, GGUFPlan) else 16
    per_type = backbone_bits is None and isinstance(plan, GGUFPlan)  # each GGUF matrix follows its own type
    if per_type:
        assert isinstance(plan, GGUFPlan)
        backbone_bits = plan.default_backbone_bits(int(bits) if bits != "auto" else 8)
    if symmetric is None:  # a GGUF's Q4_0 / Q8_0 experts carry over as symmetric groups: the rest follows them
        symmetric = isinstance(plan, GGUFPlan) and plan.carries_over(bits, group_size)
    used = set(bits_map.values()) | ({bits} if bits != "auto" else set())
    if (
        used != {16} or backbone_bits not in (None, 16) or fallback_bits is not None
    ) and group_size not in quant.GROUP_SIZES:
        raise EdgeMoEError(f"group size must be one of {', '.join(map(str, quant.GROUP_SIZES))}, got {group_size}")

    experts = {(layer, e) for layer in plan.moe_layers for e in range(plan.num_experts)}
    unknown = sorted(set(bits_map) - experts)
    if unknown:
        raise EdgeMoEError(
            f"bits_map names expert {unknown[0][1]} of layer {unknown[0][0]}, which the checkpoint "
            f"does not have (MoE layers {plan.moe_layers}, {plan.num_experts} experts each)"
        )
    if bits == "auto" and set(bits_map) != experts:
        layer, e = min(experts - set(bits_map))
        raise EdgeMoEError(
            f"bits='auto' needs a bitwidth for every expert; bits_map has none for expert {e} of layer {layer}"
        )
    # bits "auto": bits_map names every expert (checked above)
    expert_bits = {k: bits_map[k] if isinstance(bits, str) else bits_map.get(k, bits) for k in experts}
    used = set(expert_bits.values())
    uniform = next(iter(used)) if len(used) == 1 else None
    if backbone_bits is None:
        backbone_bits = 16 if uniform == 16 else 8
    if uniform != 16 or fallback_bits is not None:
        for what, n in (("hidden size", plan.hidden), ("expert intermediate size", plan.intermediate)):
            if n % group_size:
                ok = [
                    g for g in quant.GROUP_SIZES if n % g == 0 and plan.hidden % g == 0 and plan.intermediate % g == 0
                ]
                fix = f"use --group-size {ok[-1]}" if ok else "convert at --bits 16"
                raise CheckpointError(f"the model's {what} {n} is not a multiple of the group size {group_size}: {fix}")
    expert_dtype = plan.expert_dtype
    if expert_dtype not in FLOAT_KIND:
        raise CheckpointError(f"the experts are stored as {expert_dtype}; edgemoe converts bf16, f16 or f32 weights")

    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fallback = _FallbackSpec(tmp / FALLBACK_FILE, fallback_bits, group_size, symmetric) if fallback_bits else None
        blobs, experts_bytes = _write_experts(
            tmp / EXPERTS_FILE, plan, expert_bits, group_size, symmetric, progress, fallback
        )
        backbone_bytes, quantized = _write_backbone(
            tmp / BACKBONE_FILE, plan, backbone_bits, group_size, symmetric, per_type
        )
        if isinstance(plan, GGUFPlan):
            assert plan.file is not None
            tok_files, special = write_tokenizer(plan.file.metadata, tmp)
            source = plan.source_section()
        else:
            tok_files, special = _copy_tokenizer(src, tmp), _special_ids(src, plan.config)
            source = {
                "path": str(src.resolve()),
                "dtype": TORCH_NAME.get(expert_dtype, expert_dtype.lower()),
                "layout": plan.layout,
            }
        manifest = {
            "format": "edgemoe",
            "format_version": FORMAT_VERSION,
            "architecture": plan.arch.name,
            "config": plan.config,
            "source": source,
            "backbone": {
                "file": BACKBONE_FILE,
                "bytes": backbone_bytes,
                "bits": backbone_bits,
                "group_size": group_size if quantized else 0,
                "quantized": quantized,
            },
            "tokenizer": {"files": tok_files, **special},
            "quantization": {
                "bits": uniform if uniform is not None else "mixed",
                "group_size": 0 if uniform == 16 else group_size,
                "symmetric": bool(symmetric) and uniform != 16,
                "float_dtype": FLOAT_KIND[expert_dtype],
                **({"mxfp4": True} if 4 in used and plan.has_mxfp4_experts else {}),
            },
            "experts": {
                "file": EXPERTS_FILE,
                "file_bytes": experts_bytes,
                "alignment": ALIGNMENT,
                "num_layers": plan.num_layers,
                "num_experts": plan.num_experts,
                "top_k": plan.top_k,
                "hidden_size": plan.hidden,
                "intermediate_size": plan.intermediate,
                "moe_layers": plan.moe_layers,
                "columns": BLOB_COLUMNS,
                "blobs": blobs,
            },
        }
        if fallback is not None:
            manifest["fallback"] = fallback.section()
        write_manifest(tmp, manifest)  # last: a directory without it is not a model
        fsync_path(tmp / "manifest.json")
        fsync_path(tmp)
        move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Before any work: dst may be replaced only with overwrite, and never when it holds src."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise EdgeMoEError(
                f"{dst} already exists: choose another output directory, or pass --force (overwrite=True) to replace it"
            )
        s, d = src.resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise EdgeMoEError(f"refusing to replace {dst}: it holds the checkpoint being converted ({src})")


def move_into_place(tmp: Path, dst: Path) -> None:
    """Rename a finished output directory onto dst, replacing what was there only after it is in place."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_path(dst.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _encode(
    w: np.ndarray | GGUFWeight | MXFP4Weight,
    dtype: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    record: bool = True,
) -> np.ndarray:
    """One matrix serialized at `bits`; a GGUF weight records what that did to its values unless `record` is off."""
    if isinstance(w, (GGUFWeight, MXFP4Weight)):  # as stored: carried over when exact (MXFP4 at 4 bits), else quantized
        return w.encode(bits, group_size, symmetric, record)
    if bits == 16:
        return quant.float_matrix(w, FLOAT_KIND[dtype])
    return quant.quantize_matrix(to_float32(w, dtype), bits, group_size, symmetric)


class _BlobFile:
    """An experts file being written (docs/format.md): header placeholder, then 4 KiB aligned blobs."""

    def __init__(self, path: Path, plan: Plan):
        self.path, self.plan = path, plan
        self.f = open(path, "wb")
        self.f.write(bytes(ALIGNMENT))  # header placeholder, written once the totals are known
        self.pos = ALIGNMENT
        self.blobs: list[list[int]] = []

    def add(self, layer: int, e: int, bits: int, mats: list[np.ndarray], glu: quant.Glu | None = None) -> int:
        blob = quant.pack_expert_blob(layer, e, *mats, glu=glu)
        self.blobs.append([layer, e, self.pos, int(blob.nbytes), bits, int(_core.crc32c(blob))])
        self.f.write(blob.data)
        pad = -blob.nbytes % ALIGNMENT
        self.f.write(bytes(pad))
        self.pos += blob.nbytes + pad
        return int(blob.nbytes)

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(
            quant.experts_file_header(self.plan.num_layers, self.plan.num_experts, len(self.blobs), self.pos).data
        )
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        assert self.path.stat().st_size == self.pos
        return self.pos


class _FallbackSpec:
    """Where and how to write the low-bit copies; after writing, the manifest's "fallback" section."""

    def __init__(self, path: Path, bits: int, group_size: int, symmetric: bool):
        self.path, self.bits, self.group_size, self.symmetric = path, bits, group_size, symmetric
        self.blobs: list[list[int]] = []
        self.file_bytes = 0

    def section(self) -> dict:
        return {
            "version": FALLBACK_VERSION,
            "file": self.path.name,
            "file_bytes": self.file_bytes,
            "alignment": ALIGNMENT,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": bool(self.symmetric),
            "columns": BLOB_COLUMNS,
            "blobs": self.blobs,
        }


def check_fallback_bits(fallback_bits: int | None) -> None:
    if fallback_bits is not None and fallback_bits not in FALLBACK_BITS:
        raise EdgeMoEError(f"fallback bits must be one of {', '.join(map(str, FALLBACK_BITS))}, got {fallback_bits}")


def _write_experts(
    path: Path | None,
    plan: Plan,
    expert_bits: dict[tuple[int, int], int],
    group_size: int,
    symmetric: bool,
    show: bool,
    fallback: _FallbackSpec | None = None,
) -> tuple[list[list[int]], int]:
    """Write the experts file at `path` and, with `fallback`, the low-bit copies in the same pass
    over the checkpoint (each expert read once). path None: the low-bit copies only."""
    dtype = plan.expert_dtype
    n = len(plan.moe_layers) * plan.num_experts
    kinds = sorted(set(expert_bits.values()), reverse=True)
    label = f"experts ({'/'.join(map(str, kinds))}-bit)" if path is not None else ""
    if fallback is not None:
        label = (label + " + " if label else "") + f"{fallback.bits}-bit fallback copies"
    bar = Progress(n, label, show)
    out = _BlobFile(path, plan) if path is not None else None
    low = _BlobFile(fallback.path, plan) if fallback is not None else None
    try:
        for layer in plan.moe_layers:
            for e in range(plan.num_experts):
                weights = plan.expert(layer, e)  # (gate, up, down), or (up, down) of a ReLU expert
                glu = plan.glu(layer, e)  # biases and activation, kept in float32 at every bitwidth
                bits = expert_bits[layer, e]
                nbytes = 0
                if out is not None:
                    mats = [_encode(m, dtype, bits, group_size, symmetric) for m in weights]
                    nbytes += out.add(layer, e, bits, mats, glu)
                # from the checkpoint's weights, not the quantized copy (low is set with fallback)
                if low is not None and fallback is not None and fallback.bits < bits:
                    mats = [
                        _encode(m, dtype, fallback.bits, fallback.group_size, fallback.symmetric, record=False)
                        for m in weights
                    ]
                    nbytes += low.add(layer, e, fallback.bits, mats, glu)
                del weights
                bar.update(1, nbytes)
        pos = out.close() if out is not None else 0
        if low is not None and fallback is not None:
            fallback.file_bytes, fallback.blobs = low.close(), low.blobs
    finally:
        for f in (out, low):
            if f is not None and not f.f.closed:
                f.f.close()
    bar.close()
    return (out.blobs if out is not None else []), pos


def add_fallback(src, model_dir, fallback_bits: int = 2, progress: bool = True) -> dict:
    """Add (or replace) low-bit fallback copies in a converted model directory, reading the
    experts again from the checkpoint folder or GGUF file `src` it was converted from. Same group size and
    symmetry as the model's experts. Returns the new manifest."""
    check_fallback_bits(fallback_bits)
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    q = manifest["quantization"]
    group_size = q["group_size"] or 64
    plan = plan_gguf(src) if is_gguf(src) else plan_conversion(Checkpoint(Path(src)))
    ex = manifest["experts"]
    if list(plan.moe_layers) != list(ex["moe_layers"]) or plan.num_experts != ex["num_experts"]:
        raise EdgeMoEError(
            f"{src} has MoE layers {list(plan.moe_layers)} x {plan.num_experts} experts, but {model_dir} "
            f"has {ex['moe_layers']} x {ex['num_experts']}: give the checkpoint it was converted from"
        )
    for what, n in (("hidden size", plan.hidden), ("expert intermediate size", plan.intermediate)):
        if n % group_size:
            raise CheckpointError(
                f"the model's {what} {n} is not a multiple of the group size {group_size}: "
                f"low-bit copies cannot be made at that group size"
            )
    expert_bits = {(layer, e): b for layer, e, _, _, b, _ in ex["blobs"]}
    tmp = model_dir / f".{FALLBACK_FILE}.writing-{os.getpid()}"
    fallback = _FallbackSpec(tmp, fallback_bits, group_size, bool(q.get("symmetric")))
    try:
        _write_experts(None, plan, expert_bits, group_size, bool(q.get("symmetric")), progress, fallback)
        fsync_path(tmp)
        os.replace(tmp, model_dir / FALLBACK_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fallback.path = model_dir / FALLBACK_FILE
    manifest["fallback"] = fallback.section()
    manifest["format_version"] = FORMAT_VERSION  # the copies are written at this version (kind 4 if symmetric)
    write_manifest(model_dir, manifest)
    fsync_path(model_dir / "manifest.json")
    return manifest


def _write_backbone(
    path: Path, plan: Plan, bits: int, group_size: int, symmetric: bool, per_type: bool = False
) -> tuple[int, list[str]]:
    """Write backbone.safetensors; quantized matrices are U8 tensors holding a QMatrix (docs/format.md).
    per_type: a GGUF's matrices each at the bitwidth of their stored type (GGUFPlan.backbone_bits_for)."""
    w = SafetensorsWriter({"edgemoe_format_version": str(FORMAT_VERSION)})
    quantized = []
    if isinstance(plan, GGUFPlan):
        for name in sorted(plan.weights, key=_canonical_order):
            g = plan.weights[name]
            b = plan.backbone_bits_for(g) if per_type else bits
            if b != 16 and quantizable(name, g.shape, group_size):
                w.add(name, g.encode(b, group_size, symmetric), "U8")
                quantized.append(name)
            else:
                w.add(name, *g.backbone_float(float32=float32_role(name)))
    for name in sorted(plan.backbone, key=_canonical_order):
        ref = plan.backbone[name]
        if bits != 16 and quantizable(name, tuple(ref.shape), group_size):
            weight = to_float32(ref.file.read(ref.name), ref.dtype)
            w.add(name, quant.quantize_matrix(weight, bits, group_size, symmetric), "U8")
            quantized.append(name)
        elif float32_role(name) and ref.dtype != "F32":
            w.add(name, to_float32(ref.file.read(ref.name), ref.dtype), "F32")
        else:
            w.add_lazy(name, ref.dtype, ref.shape, lambda ref=ref: ref.file.iter_chunks(ref.name))
    size = w.write(path)
    fsync_path(path)
    return size, quantized


def _canonical_order(name: str):
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), parts[2])
    return (0 if name == "tok_embeddings" else 2, 0, name)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    files = []
    for name in TOKENIZER_FILES + EXTRA_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            if name in TOKENIZER_FILES:
                files.append(name)
    if (src / CHAT_TEMPLATE_DIR).is_dir():
        (dst / CHAT_TEMPLATE_DIR).mkdir()
        for f in sorted((src / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            shutil.copyfile(f, dst / CHAT_TEMPLATE_DIR / f.name)
            files.append(f"{CHAT_TEMPLATE_DIR}/{f.name}")
    if not files:
        print(f"edgemoe convert: warning: {src} has no tokenizer files; the model will need token ids", file=sys.stderr)
    return files


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
        return out if isinstance(out, dict) else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}


def _token_id(token, src: Path) -> int | None:
    """A special token given as a string (tokenizer_config.json) -> its id in tokenizer.json."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    tok = _read_json(src / "tokenizer.json")
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _special_ids(src: Path, config: dict) -> dict:
    """bos id and eos ids: generation_config.json first (what generation uses), then config, then tokenizer."""
    gen = _read_json(src / "generation_config.json")
    tok_cfg = _read_json(src / "tokenizer_config.json")
    bos = next(
        (
            b
            for b in (
                _ids(gen.get("bos_token_id"))
                + _ids(config.get("bos_token_id"))
                + _ids(_token_id(tok_cfg.get("bos_token"), src))
            )
        ),
        None,
    )
    eos: list[int] = []
    for i in (
        _ids(gen.get("eos_token_id"))
        + _ids(config.get("eos_token_id"))
        + _ids(_token_id(tok_cfg.get("eos_token"), src))
    ):
        if i not in eos:
            eos.append(i)
    return {"bos_token_id": bos, "eos_token_ids": eos}
