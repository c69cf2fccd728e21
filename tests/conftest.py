"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(arch, **overrides) -> path of a cached tiny HF checkpoint.

    Same arguments give the same directory; treat it as read-only.
    """
    import tiny

    cache: dict[tuple, Path] = {}

    def make(arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"hf_{arch}")
            cache[key] = tiny.make_checkpoint(arch, dst, **overrides)
        return cache[key]

    return make
