"""Faults of the expert store under a running model: a read error, a short read, the experts
file truncated, rewritten or replaced. Each request either gives exactly the tokens of an
undisturbed run or fails with a named error; the model keeps serving afterwards.

Read errors and short reads come from failing pread itself (faults/fault_io.c, preloaded
into a child process); truncation and rewriting are done to the real file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert

PROMPT = np.random.default_rng(3).integers(3, 300, 12).tolist()
NEW = 10


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    convert(tiny_checkpoint("mixtral"), root / "model", bits=4, progress=False)
    convert(tiny_checkpoint("mixtral", seed=1), root / "other", bits=4, progress=False)
    return root


@pytest.fixture
def model_dir(converted, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(converted / "model", dst)
    return dst


def run(m) -> list[int]:
    m.cache.clear()  # every expert is read from the file again
    return m.generate(PROMPT, max_new_tokens=NEW)


def test_truncated_then_restored(model_dir):
    m = edgemoe.load(model_dir, preload="none")
    want = run(m)
    path = model_dir / "experts.bin"
    saved = path.read_bytes()
    os.truncate(path, 4096 + (len(saved) - 4096) // 3)
    with pytest.raises(edgemoe.ExpertReadError, match="truncated or is being rewritten"):
        run(m)
    with pytest.raises(edgemoe.ExpertReadError):  # and again: nothing is left half-done
        run(m)
    path.write_bytes(saved)  # restored in place
    assert run(m) == want


def test_rewritten_with_other_experts_then_restored(model_dir, converted):
    m = edgemoe.load(model_dir, preload="none")
    want = run(m)
    path = model_dir / "experts.bin"
    saved = path.read_bytes()
    other = (converted / "other" / "experts.bin").read_bytes()
    assert len(other) == len(saved) and other != saved  # same layout, other weights
    path.write_bytes(other)  # rewritten in place: every blob is checked again, and fails
    with pytest.raises(edgemoe.CorruptExpertError, match="changed while the model ran"):
        run(m)
    path.write_bytes(saved)
    assert run(m) == want


def test_replaced_by_rename_keeps_serving_the_loaded_model(model_dir, converted):
    m = edgemoe.load(model_dir, preload="none")
    want = run(m)
    tmp = model_dir / "experts.bin.new"
    shutil.copyfile(converted / "other" / "experts.bin", tmp)
    os.replace(tmp, model_dir / "experts.bin")  # the store holds the old file open
    assert run(m) == want


def test_streaming_request_fails_whole_then_the_next_one_runs(model_dir):
    m = edgemoe.load(model_dir, preload="none")
    want = run(m)
    path = model_dir / "experts.bin"
    saved = path.read_bytes()
    m.cache.clear()
    got = []
    with pytest.raises(edgemoe.ExpertReadError):
        for i, token in enumerate(m.generate(PROMPT, max_new_tokens=NEW, stream=True)):
            got.append(token)
            if i == 2:
                os.truncate(path, 4096)
                m.cache.clear()
    assert got == want[: len(got)] and len(got) >= 3  # what was streamed before the fault was right
    path.write_bytes(saved)
    assert run(m) == want


CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import edgemoe

    model, control = Path(sys.argv[1]), Path(sys.argv[2])
    prompt, new = json.loads(sys.argv[3]), int(sys.argv[4])
    m = edgemoe.load(model, preload="none")

    def run():
        m.cache.clear()
        try:
            return m.generate(prompt, max_new_tokens=new)
        except edgemoe.EdgeMoEError as e:
            return f"{type(e).__name__}: {e}"

    out = {"clean": run()}
    hits = Path(str(control) + ".hits")
    for name, line in [("eio", "eio experts.bin"), ("short", "short experts.bin"), ("after", "")]:
        control.write_text(line)
        hits.write_bytes(b"")
        out[name] = run()
        out[name + " faults"] = hits.stat().st_size
    out["direct_io"] = m.stats()["direct_io"]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fault_lib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build tests/faults/fault_io.c (the native core needs one too)"
    lib = tmp_path_factory.mktemp("faultlib") / "libfault_io.so"
    src = Path(__file__).parent / "faults" / "fault_io.c"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def test_read_errors_and_short_reads_from_pread(model_dir, fault_lib, tmp_path):
    import json

    control = tmp_path / "control"
    control.write_text("")
    env = {**os.environ, "LD_PRELOAD": str(fault_lib), "EDGEMOE_FAULT_CONTROL": str(control)}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(control), json.dumps(PROMPT), str(NEW)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out["clean"], list) and out["direct_io"]
    assert out["eio"].startswith("ExpertReadError: reading expert") and "Input/output error" in out["eio"]
    assert out["short"] == out["clean"]  # a short read is continued, not taken for the end of the file
    assert out["after"] == out["clean"]
    assert out["eio faults"] >= 1 and out["short faults"] >= 4 and out["after faults"] == 0
