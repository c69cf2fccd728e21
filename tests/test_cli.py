"""The `edgemoe` command end to end: convert, info, run (streamed text + one stats line),
and errors as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.cli import main


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "model"
    assert main(["convert", str(tiny_checkpoint("mixtral")), "-o", str(dst), "--bits", "4", "-q"]) == 0
    return dst


def test_info_reports_layout(converted, capsys):
    assert main(["info", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "mixtral" and info["experts_per_layer"] == 4 and info["top_k"] == 2
    assert info["bitwidths"] == {"4": 8} or info["bitwidths"] == {4: 8}
    assert info["expert_bytes"] > 0 and info["backbone_bytes"] > 0


def test_run_streams_text_then_stats(converted, capsys):
    assert main(["run", str(converted), "-p", "The robot", "-n", "8", "--memory-budget", "40KB"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The robot")
    assert "tok/s decode" in err and "cache hit rate" in err and "peak RSS" in err


def test_run_refuses_too_small_budget(converted, capsys):
    assert main(["run", str(converted), "-p", "x", "--memory-budget", "1KB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemoe run: error: memory budget") and "at least" in err


def test_convert_refuses_existing_destination(converted, tiny_checkpoint, capsys):
    assert main(["convert", str(tiny_checkpoint("mixtral")), "-o", str(converted), "-q"]) == 2
    assert "--force" in capsys.readouterr().err


def test_console_script_is_installed(converted):
    exe = Path(sys.executable).parent / "edgemoe"  # installed next to this interpreter
    assert exe.exists(), f"no edgemoe console script at {exe}"
    r = subprocess.run([str(exe), "info", str(converted)], capture_output=True, text=True)
    assert r.returncode == 0 and "mixtral" in r.stdout


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    words = "the robot walked to the river and sang a song about the stars while the rain fell".split()
    rng = __import__("random").Random(0)
    f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)) + "\n")
    return f


def test_eval_prints_perplexity(converted, text_file, capsys):
    assert main(["eval", str(converted), "--text", str(text_file), "--window", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] > 0 and r["ppl"] > 1.0 and r["nll"] > 0 and r["expert_bytes"] > 0


def test_eval_without_text_names_the_fix(converted, capsys):
    assert main(["eval", str(converted)]) == 2
    assert "--text" in capsys.readouterr().err


def test_convert_stores_routing_and_profile_shows_it(tiny_checkpoint, text_file, tmp_path, capsys):
    dst = tmp_path / "model"
    assert (
        main(
            [
                "convert",
                str(tiny_checkpoint("mixtral")),
                "-o",
                str(dst),
                "--bits",
                "8",
                "-q",
                "--routing-calib",
                str(text_file),
            ]
        )
        == 0
    )
    assert (dst / "routing.json").exists()
    capsys.readouterr()
    assert main(["profile", str(dst), "--json"]) == 0  # shows the stored statistics, traces nothing
    doc = json.loads(capsys.readouterr().out)
    assert doc["moe_layers"] and doc["calibration"]["tokens"] > 0


def test_profile_without_routing_names_the_fix(converted, capsys):
    assert main(["profile", str(converted)]) == 2
    assert "--calib" in capsys.readouterr().err


def test_run_with_fallback_reports_its_reads(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "fb"
    assert (
        main(["convert", str(tiny_checkpoint("mixtral")), "-o", str(dst), "--bits", "8", "--fallback-bits", "2", "-q"])
        == 0
    )
    assert (
        main(
            ["run", str(dst), "-p", "The robot", "-n", "12", "--memory-budget", "100KB", "--fallback", "0.6", "--stats"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "fallback      gate weight < 0.60" in err and "uses of low-bit copies" in err


def test_run_fallback_without_copies_names_the_fix(converted, capsys):
    assert main(["run", str(converted), "-p", "x", "-n", "2", "--fallback", "0.3"]) == 2
    assert "--fallback-bits" in capsys.readouterr().err


def test_missing_calibration_text_is_named_before_any_work(tiny_checkpoint, converted, tmp_path, capsys):
    dst = tmp_path / "never"
    assert (
        main(
            [
                "convert",
                str(tiny_checkpoint("mixtral")),
                "-o",
                str(dst),
                "-q",
                "--routing-calib",
                str(tmp_path / "missing.txt"),
            ]
        )
        == 2
    )
    assert "--routing-calib" in capsys.readouterr().err and not dst.exists()
    assert main(["profile", str(converted), "--calib", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "--calib" in err and "no such file" in err and "missing.txt" in err
