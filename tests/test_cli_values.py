"""Every value flag of every verb: a bad value is one line naming the flag and the form it
takes, exit code 2, no traceback. The parsers are walked, so a flag added later is covered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgemoe.cli import (
    VERBS,
    bench,
    chat,
    cluster,
    convert,
    devices,
    info,
    main,
    mixture,
    profile,
    run,
    serve,
    simulate,
)
from edgemoe.cli import eval as eval_
from edgemoe.devices import list_profiles

# Values that are free text or a path to write: any string is accepted.
FREE = {"--prompt", "--output", "--json", "--markdown", "--cache", "--plot", "--traces", "--system", "--host"}
FREE |= {"--api-key", "--name", "--class"}


def parsers(tmp_path):
    """(name, parser, argv that satisfies its required arguments), one per parser."""
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    return [
        ("run", run.build_parser(), ["-p", "x"]),
        ("chat", chat.build_parser(), []),
        ("serve", serve.build_parser(), []),
        ("bench --serve", bench.build_serve_parser(), []),
        ("info", info.build_parser(), []),
        ("convert", convert.build_parser(), ["src", "-o", "dst"]),
        ("eval", eval_.build_parser(), []),
        ("profile", profile.build_parser(), []),
        ("profile --importance", profile.build_importance_parser(), []),
        ("simulate", simulate.build_parser(), ["model", "--text", str(text)]),
        ("bench", bench.build_parser(), []),
        ("devices", devices.build_parser(), []),
        ("cluster plan", cluster.build_plan_parser(), ["--devices", list_profiles()[0]]),
        ("cluster local", cluster.build_local_parser(), []),
        ("mixture plan", mixture.build_plan_parser(), [str(tmp_path), "--energy", "1", "--latency", "10"]),
        ("mixture run", mixture.build_run_parser(), [str(tmp_path), "-p", "x"]),
        ("mixture bench", mixture.build_bench_parser(), [str(tmp_path), "--devices", list_profiles()[0]]),
    ]


def test_every_verb_is_walked():
    walked = {
        "run",
        "chat",
        "serve",
        "info",
        "convert",
        "eval",
        "profile",
        "simulate",
        "bench",
        "devices",
        "cluster",
        "mixture",
    }
    assert set(VERBS) == walked, "a new verb: add its parser to parsers() above"


def value_flags(parser):
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.option_strings[-1] not in FREE:
            yield action


def test_bad_values_are_one_line_naming_the_flag(tmp_path, capsys):
    checked = 0
    for name, parser, base in parsers(tmp_path):
        for action in value_flags(parser):
            flag = action.option_strings[-1]
            numeric = getattr(action.type, "__name__", "") in ("whole number", "number", "int", "float")
            for bad in ["lots"] + (["-5", "nan", "1e999"] if numeric else []):
                with pytest.raises(SystemExit) as e:
                    parser.parse_args([*base, flag, bad])
                err = capsys.readouterr().err
                where = f"edgemoe {name} {flag} {bad}"
                assert e.value.code == 2, where
                assert err.count("\n") == 1 and "Traceback" not in err, (where, err)
                assert f"argument {'/'.join(action.option_strings)}:" in err, (where, err)
                assert "expected" in err or "invalid choice" in err or "no such" in err or "cannot read" in err, err
                checked += 1
    assert checked > 60


def test_memory_budget_lots_through_the_command(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from edgemoe.cli import main; sys.exit(main())",
            "run",
            "--memory-budget",
            "lots",
            "-p",
            "x",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--memory-budget" in r.stderr and "KB, MB, GB" in r.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["run", "-p", "x", "--top-p", "2"], "--top-p"),
        (["run", "-p", "x", "--temperature", "-1"], "--temperature"),
        (["run", "-p", "x", "-n", "0"], "-n"),
        (["run", "-p", "x", "--prefetch", "psychic"], "--prefetch"),
        (["run", "-p", "x", "--cluster", "somewhere"], "--cluster"),
        (["simulate", "m", "--trace", "missing.npz"], "--trace"),
        (["simulate", "m", "--trace", __file__, "--budgets", "0.5,2"], "--budgets"),
        (["bench", "--budgets", "25,150"], "--budgets"),
        (["convert", "s", "-o", "d", "--bits-choices", "8,5"], "--bits-choices"),
        (["cluster", "plan", "--devices", "toaster"], "--devices"),
        (["bench", "--peers", "llama.cpp", "--device", "none,toaster"], "--device"),
        (["bench", "--device", "none,jetson-tx2-emmc"], "--device"),
    ],
)
def test_out_of_range_values_through_main(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err, err


def test_bench_storage_takes_none_and_with_peers_a_list():
    """`bench --device none` is the local disk (the peers bench's documented command), and
    --peers takes several storages in one run."""
    from edgemoe.cli import bench

    p = bench.build_parser()
    assert p.parse_args(["--device", "none"]).device == "none"
    assert p.parse_args(["--peers", "llama.cpp", "--device", "none,jetson-tx2-emmc"]).device == "none,jetson-tx2-emmc"
