"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout(tmp_path_factory):
    """Tests run from a directory of their own, not the checkout: a subprocess started with
    `python -m` or `python -c` puts its working directory first on sys.path, and from the
    repository root that imports the source tree's edgemoe (which has no compiled core)
    instead of the installed one. Ray does the same for its workers."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    mp.undo()


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
