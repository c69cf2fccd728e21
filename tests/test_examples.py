"""The example apps in examples/ run, with short settings, on a tiny converted model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.converters.convert import convert

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("examples") / "model"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    return dst


def example(name, *args, stdin="", cwd):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_stream_chat_streams_a_reply_per_line(model_dir, tmp_path):
    out = example(
        "stream_chat.py",
        model_dir,
        "--memory-budget",
        "40KB",
        "--max-new-tokens",
        "6",
        stdin="hello\nand now?\n\n",
        cwd=tmp_path,
    )
    assert out.count("assistant>") == 2 and out.count("tok/s, cache hit rate") == 2, out


def test_budget_explorer_writes_the_plot(model_dir, tmp_path):
    import matplotlib.image

    png = tmp_path / "budget.png"
    out = example(
        "budget_explorer.py",
        model_dir,
        "--budgets",
        "30,100",
        "--tokens",
        "4",
        "--repeat",
        "1",
        "-o",
        png,
        cwd=tmp_path,
    )
    lines = [line for line in out.splitlines() if "tok/s" in line]
    assert len(lines) == 2 and all("hit rate" in line for line in lines), out
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400  # a real figure, not an empty file
