"""A short run of each fuzz harness (tests/fuzz/) from seeds made of real converted files:
only edgemoe's named errors may leave the readers. The long runs are in
docs/hardening.md; this catches a regression in CI in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
RUNS = 400  # per harness: a few seconds each


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    sys.path.insert(0, str(FUZZ))
    try:
        from seeds import write_seeds
    finally:
        sys.path.remove(str(FUZZ))
    return write_seeds(tmp_path_factory.mktemp("fuzz"))


# every harness in tests/fuzz/ (fuzz_READER.py, its seeds in corpus/READER from seeds.py)
READERS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))


def test_the_readers_have_harnesses():
    assert {"manifest", "experts", "safetensors", "gguf", "config"} <= set(READERS)


@pytest.mark.parametrize("reader", READERS)
def test_fuzz_harness_short_run(reader, seeds, tmp_path):
    work, artifacts = tmp_path / "corpus", tmp_path / "crashes"
    work.mkdir()
    artifacts.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"fuzz_{reader}.py"),
            "--model",
            str(seeds / "model"),
            str(work),
            str(seeds / "corpus" / reader),
            f"-atheris_runs={RUNS}",
            "-max_len=500000",
            "-seed=1",
            f"-artifact_prefix={artifacts}/",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "EDGEMOE_FUZZ_TMP": str(tmp_path)},
        timeout=600,
    )
    crashes = list(artifacts.iterdir())
    assert r.returncode == 0 and not crashes, r.stderr[-3000:]
    assert "Done" in r.stderr, r.stderr[-2000:]  # libFuzzer's line after the last run
