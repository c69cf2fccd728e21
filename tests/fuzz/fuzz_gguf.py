"""Fuzz the GGUF reader: a whole file opened with GGUFFile (header, metadata, tensor table, the
truncation check), then every tensor's metadata and bytes touched as the GGUF import reads them."""

from __future__ import annotations

import sys

import atheris
import numpy  # noqa: F401  (imported before: only the readers are instrumented, not numpy)

with atheris.instrument_imports():
    import gguf  # noqa: F401  (llama.cpp's reader, which GGUFFile calls: instrumented too)

    from edgemoe.converters.gguf import GGUFFile
    from edgemoe.errors import EdgeMoEError

from common import model_arg, run, scratch_dir

_, ARGV = model_arg(sys.argv)
PATH = scratch_dir() / "fuzz.gguf"


@atheris.instrument_func
def one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    try:
        f = GGUFFile(PATH)
        for name in f.tensors:
            f.type_name(name)
            t = f.tensors[name]
            bytes(t.data[:16].tobytes())
        str(f.metadata.get("general.architecture"))
    except EdgeMoEError:
        pass


if __name__ == "__main__":
    run(one_input, ARGV)
