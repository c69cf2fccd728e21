"""Fuzz the manifest reader: manifest.json as a model is opened (load_manifest, the blob
tables, the fallback section) and the native store built from those tables, beside the real
experts and backbone files of a converted model."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edgemoe import _core
    from edgemoe.errors import EdgeMoEError
    from edgemoe.format.manifest import blob_tables, fallback_tables, load_manifest

from common import model_arg, run, scratch_dir

MODEL, ARGV = model_arg(sys.argv)
DIR = scratch_dir()
for name in ("experts.bin", "experts.fallback.bin", "backbone.safetensors"):
    if (MODEL / name).exists():
        (DIR / name).symlink_to(MODEL / name)


@atheris.instrument_func
def one_input(data: bytes) -> None:
    (DIR / "manifest.json").write_bytes(data)
    try:
        m = load_manifest(DIR)
        offsets, lengths, crcs, _ = blob_tables(m)
        _core.ExpertStore(str(DIR / m["experts"]["file"]), offsets, lengths, crcs, direct=False)
        if "fallback" in m:
            path, offsets, lengths, crcs, _ = fallback_tables(DIR, m)
            _core.ExpertStore(str(path), offsets, lengths, crcs, direct=False)
    except EdgeMoEError:
        pass


if __name__ == "__main__":
    run(one_input, ARGV)
