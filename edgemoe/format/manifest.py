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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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


PAGE = 4096  # expert blobs start on 4 KiB boundaries; one O_DIRECT read moves whole pages


def page_bytes(lengths: np.ndarray) -> np.ndarray:
    """Blob lengths rounded up to whole 4 KiB pages (int64): what one read moves and the cache charges."""
    return (np.asarray(lengths).astype(np.int64) + PAGE - 1) // PAGE * PAGE


def blob_tables(manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offsets u64, lengths u64, crc32c u32, bits u8), each [num_layers, num_experts].

    Layers without experts (dense layers) have length 0 (and offset 0, bits 0).
    """
    ex = manifest["experts"]
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
