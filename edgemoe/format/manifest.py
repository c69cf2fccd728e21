"""manifest.json of a model directory (docs/format.md): load, validate, blob tables.

m = load_manifest("model-dir")          # raises ModelDirectoryError with the fix
offsets, lengths, crcs, bits = blob_tables(m)   # each [num_layers, num_experts]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelDirectoryError
from .quant import FORMAT_VERSION  # one number for manifest.json and experts.bin (docs/format.md); reads 1 too

MANIFEST = "manifest.json"
BLOB_COLUMNS = ["layer", "expert", "offset", "length", "bits", "crc32c"]
FALLBACK_VERSION = 1  # the optional "fallback" section (low-bit copies, docs/format.md)


def load_manifest(model_dir) -> dict:
    """Read and check a model directory's manifest.json and the files it names.

    Checks: the directory and manifest exist and parse, the format version is
    not newer than this edgemoe's, the experts file exists with exactly
    `file_bytes` bytes, and the backbone file exists.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirectoryError(f"{d} is not a directory: pass the directory written by `edgemoe convert`")
    path = d / MANIFEST
    if not path.is_file():
        hint = (
            (f" (it looks like a Hugging Face checkpoint: convert it first with `edgemoe convert {d} -o OUT`)")
            if (d / "config.json").exists()
            else ""
        )
        raise ModelDirectoryError(
            f"{d} has no {MANIFEST}, so it is not an edgemoe model directory{hint}; "
            f"a conversion that did not finish leaves no manifest: convert the model again"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ModelDirectoryError(
            f"{path} cannot be read ({e}): the file is damaged, convert the model again"
        ) from None
    if not isinstance(m, dict) or m.get("format") != "edgemoe":
        raise ModelDirectoryError(
            f'{path} is not an edgemoe manifest (no "format": "edgemoe"): convert the model again'
        )
    version = m.get("format_version")
    if not isinstance(version, int):
        raise ModelDirectoryError(f"{path} has no integer format_version: the file is damaged, convert the model again")
    if version > FORMAT_VERSION:
        raise ModelDirectoryError(
            f"{d} uses model format version {version}, but this edgemoe reads format "
            f"version {FORMAT_VERSION} at most: upgrade edgemoe (pip install -U edgemoe)"
        )
    for key in ("architecture", "config", "backbone", "experts"):
        if key not in m:
            raise ModelDirectoryError(f'{path} has no "{key}" entry: the file is damaged, convert the model again')
    _check_fields(path, m)

    ex = m["experts"]
    experts_path = d / ex["file"]
    if not experts_path.is_file():
        raise ModelDirectoryError(
            f"{experts_path} is missing: the model directory is incomplete, copy it again or convert the model again"
        )
    size, want = experts_path.stat().st_size, int(ex["file_bytes"])
    if size != want:
        raise ModelDirectoryError(
            f"{ex['file']} is {size} bytes, the manifest expects {want}: "
            f"the file is truncated or damaged, convert the model again"
        )
    backbone_path = d / m["backbone"]["file"]
    if not backbone_path.is_file():
        raise ModelDirectoryError(
            f"{backbone_path} is missing: the model directory is incomplete, copy it again or convert the model again"
        )
    if "bytes" in m["backbone"] and backbone_path.stat().st_size != int(m["backbone"]["bytes"]):
        raise ModelDirectoryError(
            f"{m['backbone']['file']} is {backbone_path.stat().st_size} bytes, the manifest "
            f"expects {m['backbone']['bytes']}: the file is truncated or damaged, "
            f"convert the model again"
        )
    return m


def _is_count(v: object, below: int = 1 << 63) -> bool:
    """A JSON whole number in [0, below) (not a bool, which Python counts as an int)."""
    return type(v) is int and 0 <= v < below


def _is_file_name(v: object) -> bool:
    """A file inside the model directory: a relative path that does not climb out of it."""
    return isinstance(v, str) and v != "" and "\0" not in v and not Path(v).is_absolute() and ".." not in Path(v).parts


def _check_fields(path: Path, m: dict) -> None:
    """The types and ranges of the entries a reader uses, each named when wrong."""

    def damaged(what: str) -> ModelDirectoryError:
        return ModelDirectoryError(f"{path}: {what}: the file is damaged, convert the model again")

    if not isinstance(m["architecture"], str):
        raise damaged('"architecture" is not a string')
    if not isinstance(m["config"], dict):
        raise damaged('"config" is not an object')
    if not isinstance(m.get("tokenizer", {}), dict):
        raise damaged('"tokenizer" is not an object')
    bb = m["backbone"]
    if not isinstance(bb, dict) or not _is_file_name(bb.get("file")):
        raise damaged('"backbone" names no file of the model directory')
    if "bytes" in bb and not _is_count(bb["bytes"]):
        raise damaged('"backbone.bytes" is not a byte count')
    ex = m["experts"]
    if not isinstance(ex, dict) or not _is_file_name(ex.get("file")):
        raise damaged('"experts" names no file of the model directory')
    _check_experts(ex, damaged, "experts")
    fb = m.get("fallback")
    if fb is not None and not isinstance(fb, dict):
        raise damaged('"fallback" is not an object')


def _check_experts(ex: dict, damaged, where: str) -> None:
    """An "experts" (or "fallback") section's counts and its blob table's rows."""
    if not _is_count(ex.get("file_bytes")):
        raise damaged(f'"{where}.file_bytes" is not a byte count')
    for key in ("num_layers", "num_experts"):
        if not _is_count(ex.get(key), 1 << 20) or ex[key] == 0:
            raise damaged(f'"{where}.{key}" is not a count between 1 and 2^20')
    if ex["num_layers"] * ex["num_experts"] > 1 << 24:
        raise damaged(f'"{where}" has {ex["num_layers"]} x {ex["num_experts"]} experts, more than 2^24')
    for key in ("top_k", "hidden_size", "intermediate_size"):
        if key in ex and (not _is_count(ex[key], 1 << 31) or ex[key] == 0):
            raise damaged(f'"{where}.{key}" is not a positive count')
    layers = ex.get("moe_layers", [])
    if not isinstance(layers, list) or not all(_is_count(i, ex["num_layers"]) for i in layers):
        raise damaged(f'"{where}.moe_layers" is not a list of layer indices below {ex["num_layers"]}')
    blobs = ex.get("blobs")
    if not isinstance(blobs, list):
        raise damaged(f'"{where}.blobs" is not a list')
    limits = (ex["num_layers"], ex["num_experts"], 1 << 63, 1 << 63, 33, 1 << 32)
    for row in blobs:
        if not isinstance(row, list) or len(row) != len(BLOB_COLUMNS):
            raise damaged(f'"{where}.blobs" has a row {str(row)[:80]} that is not [{", ".join(BLOB_COLUMNS)}]')
        for col, v, limit in zip(BLOB_COLUMNS, row, limits):
            if not _is_count(v, limit):
                raise damaged(f'"{where}.blobs" has a row {str(row)[:80]} whose {col} is out of range')


PAGE = 4096  # expert blobs start on 4 KiB boundaries; one O_DIRECT read moves whole pages


def page_bytes(lengths: np.ndarray) -> np.ndarray:
    """Blob lengths rounded up to whole 4 KiB pages (int64): what one read moves and the cache charges."""
    return (np.asarray(lengths).astype(np.int64) + PAGE - 1) // PAGE * PAGE


def blob_tables(manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offsets u64, lengths u64, crc32c u32, bits u8), each [num_layers, num_experts].

    Layers without experts (dense layers) have length 0 (and offset 0, bits 0).
    """
    ex = manifest["experts"]

    def damaged(what: str) -> ModelDirectoryError:
        return ModelDirectoryError(f"the manifest's {what}: the file is damaged, convert the model again")

    if not isinstance(ex, dict):
        raise damaged('"experts" is not an object')
    _check_experts(ex, damaged, "experts")
    shape = (int(ex["num_layers"]), int(ex["num_experts"]))
    offsets = np.zeros(shape, np.uint64)
    lengths = np.zeros(shape, np.uint64)
    crcs = np.zeros(shape, np.uint32)
    bits = np.zeros(shape, np.uint8)
    cols = ex.get("columns", BLOB_COLUMNS)
    if cols != BLOB_COLUMNS:
        raise ModelDirectoryError(
            f"manifest blob columns {cols} differ from {BLOB_COLUMNS}: "
            f"the manifest is damaged or from another edgemoe, convert the model again"
        )
    for layer, expert, offset, length, b, crc in ex["blobs"]:
        if not (0 <= layer < shape[0] and 0 <= expert < shape[1]):
            raise ModelDirectoryError(
                f"manifest lists expert {expert} of layer {layer}, outside "
                f"{shape[0]} layers x {shape[1]} experts: convert the model again"
            )
        offsets[layer, expert] = offset
        lengths[layer, expert] = length
        crcs[layer, expert] = crc
        bits[layer, expert] = b
    return offsets, lengths, crcs, bits


def fallback_tables(model_dir, manifest: dict) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The low-bit fallback copies (docs/format.md, "fallback"): (file, offsets, lengths, crc32c, bits),
    tables [num_layers, num_experts] like blob_tables; length 0 = no copy of that expert.

    Raises ModelDirectoryError naming the fix when the model has no fallback section, its
    version is newer than this edgemoe's, its file is missing or of the wrong size, or a
    copy is not of an existing expert at fewer bits than the expert's own.
    """
    d = Path(model_dir)
    fb = manifest.get("fallback")
    if fb is None:
        raise ModelDirectoryError(
            f"{d} has no low-bit fallback copies: convert it again with --fallback-bits 2 "
            f"(or add them with edgemoe.converters.convert.add_fallback), or load it "
            f"without fallback"
        )
    if not isinstance(fb, dict) or not isinstance(fb.get("version"), int):
        raise ModelDirectoryError(
            f'{d / MANIFEST} has a "fallback" entry without an integer version: '
            f"the file is damaged, convert the model again"
        )
    if fb["version"] > FALLBACK_VERSION:
        raise ModelDirectoryError(
            f"{d}'s low-bit fallback copies are format version {fb['version']}, but this "
            f"edgemoe reads version {FALLBACK_VERSION} at most: upgrade edgemoe, or load "
            f"the model without fallback"
        )
    for key in ("file", "file_bytes", "blobs"):
        if key not in fb:
            raise ModelDirectoryError(
                f'{d / MANIFEST}\'s "fallback" entry has no "{key}": the file is damaged, convert the model again'
            )
    if not _is_file_name(fb["file"]) or not _is_count(fb["file_bytes"]):
        raise ModelDirectoryError(
            f'{d / MANIFEST}\'s "fallback" entry has a "file" outside the model directory or a "file_bytes" that is '
            f"not a byte count: the file is damaged, convert the model again"
        )
    path = d / fb["file"]
    if not path.is_file():
        raise ModelDirectoryError(
            f"{path} (the low-bit fallback copies) is missing: copy the model directory "
            f"again, convert it again, or load it without fallback"
        )
    if path.stat().st_size != int(fb["file_bytes"]):
        raise ModelDirectoryError(
            f"{fb['file']} is {path.stat().st_size} bytes, the manifest expects "
            f"{fb['file_bytes']}: the file is truncated or damaged, convert the model again"
        )
    _, full_lengths, _, full_bits = blob_tables(manifest)
    sub = {"experts": {**manifest["experts"], "blobs": fb["blobs"], "columns": fb.get("columns", BLOB_COLUMNS)}}
    offsets, lengths, crcs, bits = blob_tables(sub)
    for layer, expert in zip(*np.nonzero(lengths)):
        if full_lengths[layer, expert] == 0 or bits[layer, expert] >= full_bits[layer, expert]:
            raise ModelDirectoryError(
                f"the fallback copy of expert {expert} of layer {layer} is at {bits[layer, expert]} bits, but the "
                f"expert itself is "
                + (f"at {full_bits[layer, expert]} bits" if full_lengths[layer, expert] else "not in the experts file")
                + ": a fallback copy must have fewer bits than its expert; convert the model again"
            )
    return path, offsets, lengths, crcs, bits


def write_manifest(model_dir, manifest: dict) -> Path:
    """Write manifest.json (pretty, stable key order as given)."""
    path = Path(model_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path
