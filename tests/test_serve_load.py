"""`edgemoe bench --serve` on the tiny model for a few seconds: the server runs inside a cgroup
memory limit of Model.memory_needed plus its measured overhead, every request completes, the
server is never killed, and the report carries the figures the benchmark page shows."""

from __future__ import annotations

import json

import pytest

from edgemoe.cli import main
from edgemoe.converters.convert import convert
from edgemoe.devices.limits import cgroup_v1_available

ok, reason = cgroup_v1_available("memory")
pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not ok, reason=f"needs a cgroup v1 memory group of our own: {reason}"),
]


def test_load_test_loses_nothing_inside_the_limit(tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    convert(tiny_checkpoint("mixtral"), model, bits=8, progress=False)
    out = tmp_path / "load.json"
    args = [
        "bench",
        "--serve",
        str(model),
        "--clients",
        "3",
        "--duration",
        "3",
        "--alone",
        "2",
        "--max-tokens",
        "16",
        "--overhead-seconds",
        "2",
    ]
    assert main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["limit"] == r["memory_needed"] + r["server_overhead"] and not r["killed"]
    assert 0 < r["peak_memory"] <= r["limit"]
    for phase, clients in (("alone", 1), ("concurrent", 3)):
        row = r[phase]
        assert row["clients"] == clients and row["requests"] >= clients and row["lost"] == 0, row
        assert row["tokens"] == 16 * row["completed"] and row["ttft_p50_s"] <= row["ttft_p99_s"]
    printed = capsys.readouterr().out
    assert "| clients | seconds | requests |" in printed and "killed: no" in printed
