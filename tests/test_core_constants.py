"""Numbers the native core and the Python side must agree on are defined once, in the core
(edgemoe._core), and the Python side reads them from there."""

from __future__ import annotations

import inspect
import json
import struct

from edgemoe import _core
from edgemoe.converters.convert import convert
from edgemoe.format import manifest, quant
from edgemoe.planning import simulate


def test_the_converter_writes_the_cores_format_version(tiny_checkpoint, tmp_path):
    assert isinstance(_core.FORMAT_VERSION, int) and _core.FORMAT_VERSION >= 2
    assert quant.FORMAT_VERSION == manifest.FORMAT_VERSION == _core.FORMAT_VERSION
    dst = tmp_path / "model"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    assert json.loads((dst / "manifest.json").read_text())["format_version"] == _core.FORMAT_VERSION
    magic, version = struct.unpack("<8sI", (dst / "experts.bin").read_bytes()[:12])
    assert (magic, version) == (b"EDGEMOEX", _core.FORMAT_VERSION)


def test_the_simulator_decays_as_the_cache_does():
    assert 0.0 < _core.EVICTION_DECAY < 1.0
    assert simulate.EVICTION_DECAY == _core.EVICTION_DECAY
    assert inspect.signature(simulate.simulate).parameters["decay"].default == _core.EVICTION_DECAY
