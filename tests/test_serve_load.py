"""`edgemoe bench --serve` on the tiny model for a few seconds, queued and batched: the server
runs inside a cgroup memory limit of Model.memory_needed (a KV cache per batched sequence) plus
its measured overhead, every request completes, the server is never killed, and the report
carries the figures the benchmark page shows."""

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
        "--batch",
        "1,3",
    ]
    assert main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [m["batch"] for m in r["modes"]] == [1, 3]
    for m in r["modes"]:  # queued, then decoded in batches of up to 3: each in its own limit
        assert m["limit"] == m["memory_needed"] + m["server_overhead"] and not m["killed"]
        assert 0 < m["peak_memory"] <= m["limit"]
        for phase, clients in (("alone", 1), ("concurrent", 3)):
            row = m[phase]
            assert row["clients"] == clients and row["requests"] >= clients and row["lost"] == 0, row
            assert row["tokens"] == 16 * row["completed"] and row["ttft_p50_s"] <= row["ttft_p99_s"]
            assert row["bytes_per_token"] >= 0
    assert r["modes"][1]["memory_needed"] > r["modes"][0]["memory_needed"]  # two more KV caches
    printed = capsys.readouterr().out
    assert "| server | clients | seconds |" in printed and "| batch 3 | 3 |" in printed
