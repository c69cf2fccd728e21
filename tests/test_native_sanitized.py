"""The native tests (native/tests/test_native.cpp) built and run under ASan+UBSan and
under TSan, so every `pytest` run checks the C++ core for memory errors and races."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.sanitizers]

ROOT = Path(__file__).resolve().parent.parent


def test_native_tests_pass_under_sanitizers():
    assert shutil.which("cmake"), "cmake is needed to build the native tests: pip install '.[test]'"
    r = subprocess.run(
        ["bash", str(ROOT / "native" / "run_sanitized_tests.sh")], capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, f"sanitized native tests failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert "sanitized native tests passed" in r.stdout
