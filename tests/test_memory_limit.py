"""Generation inside a hard memory limit (a fresh cgroup v1 memory group): with an expert
budget the whole process fits in budget + backbone + the documented overhead
(Model.memory_needed) and gives the unbounded run's tokens; without one the same
limit kills it, so the limit is one the budget has to respect.

The model is a random-weight Mixtral with 200 MB of bf16 experts (64 of 3 MB) and a 9 MB
backbone, generated and converted in a few seconds. Needs root and cgroup v1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemoe.devices.limits import Cgroup, cgroup_v1_available

ok, reason = cgroup_v1_available("memory")
pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not ok, reason=f"needs a cgroup v1 memory group of our own: {reason}"),
]

SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_local_experts=16,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=2000,
)
PROMPT_TOKENS, NEW_TOKENS = 64, 24

# Runs in the limited process: generate, then report tokens and what the cache held.
WORKER = """
import json, sys
import edgemoe
spec = json.loads(sys.argv[1])
m = edgemoe.load(spec["model"], memory_budget=spec["budget"], **spec["options"])
tokens = m.generate(spec["prompt"], max_new_tokens=spec["new_tokens"])
s = m.stats()
print(json.dumps({"tokens": tokens, "expert_cache_peak_bytes": s["expert_cache_peak_bytes"],
                  "bytes_read": s["bytes_read"]}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from edgemoe.bench.synth import synth_mixtral
    from edgemoe.converters.convert import convert

    root = tmp_path_factory.mktemp("memlimit")
    hf = synth_mixtral(root / "hf", **SHAPE)
    convert(hf, root / "model", bits=16, progress=False)
    return root / "model"


def run(model_dir, budget, options=None, limit=None):
    import numpy as np

    prompt = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], PROMPT_TOKENS).tolist()
    spec = {
        "model": str(model_dir),
        "budget": budget,
        "options": options or {},
        "prompt": prompt,
        "new_tokens": NEW_TOKENS,
    }
    cmd = [sys.executable, "-c", WORKER, json.dumps(spec)]
    if limit is None:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.splitlines()[-1]), None
    with Cgroup(memory_limit=limit) as cg:
        r = cg.run(cmd, cwd="/", timeout=120)
    out = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else None
    return out, r


def test_generation_fits_in_budget_plus_backbone_plus_overhead(model_dir):
    import edgemoe

    ref, _ = run(model_dir, None)
    probe = edgemoe.load(model_dir)
    expert_bytes = probe.info()["expert_bytes"]
    budget = expert_bytes // 5
    bounded = edgemoe.load(model_dir, memory_budget=budget)
    limit = bounded.memory_needed(PROMPT_TOKENS + NEW_TOKENS)
    del probe, bounded
    assert limit < ref["bytes_read"]  # the experts the unbounded run reads alone exceed the limit

    for options in ({"policy": "lru"}, {"policy": "structure", "prefetch": "lookahead", "io_threads": 2}):
        out, r = run(model_dir, budget, options, limit=limit)
        assert not r.oom_killed and r.returncode == 0, (options, r.returncode, r.stderr[-2000:])
        assert r.peak_memory_bytes <= limit
        assert out["tokens"] == ref["tokens"], options
        assert out["expert_cache_peak_bytes"] <= budget
        assert out["bytes_read"] > ref["bytes_read"]  # it did stream: experts were read again

    # The control: the same limit without a budget is fatal, so the budget is what kept it alive.
    out, r = run(model_dir, None, limit=limit)
    assert r.oom_killed and out is None, (r.returncode, r.peak_memory_bytes, limit)


def test_bench_compares_each_cgroup_run_with_the_bandwidth_probed_around_it(model_dir):
    """`edgemoe bench --cgroup-limit`: every run sits between two O_DIRECT probes of the experts
    file and its I/O bound (bytes read per token / the fastest probe) and ratio follow from them."""
    import argparse

    import edgemoe
    from edgemoe.bench.modes import run_cgroup

    bounded = edgemoe.load(model_dir, memory_budget=edgemoe.load(model_dir).info()["expert_bytes"] // 4)
    limit = bounded.memory_needed(8 + 6)
    del bounded
    args = argparse.Namespace(prompt_tokens=8, tokens=6, repeat=2, seed=0, device=None, cgroup_modes="lru,edgemoe")
    lines: list[str] = []
    rows = run_cgroup("tiny", model_dir, limit, args, emit=lines.append)
    assert [r["mode"] for r in rows] == ["lru", "edgemoe"]
    for r in rows:
        assert len(r["runs"]) == 2 and r["cgroup_peak_bytes"] <= limit and not r["oom_killed"]
        for run in r["runs"]:
            before, after = run["around"]
            bw = max(max(p["expert_reads_bytes_per_s"], p["sequential_bytes_per_s"]) for p in (before, after))
            assert run["io_bound_bytes_per_s"] == bw > 0
            assert run["io_bound_seconds_per_token"] == pytest.approx(run["decode_bytes_per_token"] / bw)
            assert run["ratio_to_io_bound"] == pytest.approx(
                run["decode_seconds_per_token"] / run["io_bound_seconds_per_token"]
            )
        assert r["ratio_to_io_bound"] in r["ratios_to_io_bound"]
        assert r["decode_bytes_per_token"] > 0  # a quarter of the experts: decoding reads
    assert sum(line.startswith("| lru |") or line.startswith("| edgemoe |") for line in lines) == 2
