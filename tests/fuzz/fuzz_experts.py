"""Fuzz the experts file: its header, blob table and blobs, as the native store opens and
reads it and the MoE layer parses and computes each expert.

An input is a manifest's "experts" section (JSON) and an experts file, joined by SEP. The
store checks no CRC-32C here (verify=False): the blobs' own headers and matrix layouts
are what must be checked, as they are for a model loaded with verify=False.
"""

from __future__ import annotations

import json
import sys

import atheris
import numpy as np

with atheris.instrument_imports():
    from edgemoe import _core
    from edgemoe.errors import EdgeMoEError
    from edgemoe.format.manifest import blob_tables

from common import SEP, model_arg, run, scratch_dir

_, ARGV = model_arg(sys.argv)
PATH = scratch_dir() / "experts.bin"


@atheris.instrument_func
def one_input(data: bytes) -> None:
    head, sep, body = data.partition(SEP)
    try:
        section = json.loads(head)
        if not isinstance(section, dict):
            return
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # not this reader's input: the manifest harness fuzzes the JSON
    PATH.write_bytes(body)
    try:
        offsets, lengths, crcs, _ = blob_tables({"experts": section})
        store = _core.ExpertStore(str(PATH), offsets, lengths, crcs, direct=True, verify=False)
        cache = _core.ExpertCache(store, 0, io_threads=0)
        hidden = int(section.get("hidden_size", 64)) if isinstance(section.get("hidden_size"), int) else 64
        x = np.ones((1, max(1, min(hidden, 1 << 14))), np.float32)
        for layer, expert in zip(*np.nonzero(lengths)):
            store.read(int(layer), int(expert))
            ids = np.array([[expert]], np.int32)
            _core.moe_forward(cache, int(layer), x, ids, np.ones((1, 1), np.float32))
    except EdgeMoEError:
        pass


if __name__ == "__main__":
    run(one_input, ARGV)
