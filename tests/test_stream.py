"""Streaming experts through the cache on a whole model: prefill in expert waves under
a small budget, the per-layer statistics, `edgemoe run --stats`, storage emulation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgemoe
from edgemoe.cli import main
from edgemoe.models.blocks import RouteObserver


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    from edgemoe.converters.convert import convert

    dst = tmp_path_factory.mktemp("stream") / "model"
    convert(tiny_checkpoint("mixtral", num_hidden_layers=3, num_local_experts=8), dst, bits=4, progress=False)
    return dst


class Routes(RouteObserver):
    """Records each MoE layer's routed expert ids per forward call."""

    def __init__(self):
        self.calls: list[tuple[int, np.ndarray]] = []

    def on_route(self, layer, resid, ids, weights):
        self.calls.append((layer, ids.copy()))


def test_prefill_reads_each_routed_expert_once_per_layer_within_the_budget(model_dir):
    ref = edgemoe.load(model_dir)
    budget = ref.min_budget  # one layer's top-k: far fewer experts than a long prompt routes to
    m = edgemoe.load(model_dir, memory_budget=budget, preload="none")  # no warm start: count the waves' reads
    routes = Routes()
    m.net.observer = routes
    prompt = np.random.default_rng(0).integers(3, m.config.vocab_size, 96).tolist()
    logits = m.logits(prompt)  # one prefill pass over 96 tokens
    np.testing.assert_array_equal(logits, ref.logits(prompt))

    layers = m.layer_stats()
    assert len(routes.calls) == len(layers)
    for (layer, ids), row in zip(routes.calls, layers):
        distinct = len(np.unique(ids))
        assert row["layer"] == layer
        assert distinct > 2, "the prompt must route to more experts than the budget holds"
        # every routed expert read exactly once for all 96 tokens (a wave), never twice
        assert row["loads"] == row["misses"] == distinct and row["hits"] == 0
    c = m.cache.stats()
    assert c["peak_resident_bytes"] <= budget
    assert c["bytes_read"] == sum(r["bytes_read"] for r in layers)


def test_layer_stats_add_up_and_carry_prediction_quality(model_dir):
    m0 = edgemoe.load(model_dir)
    m = edgemoe.load(model_dir, memory_budget=2 * m0.min_budget, prefetch="lookahead", policy="structure")
    prompt = list(range(5, 21))
    m.generate(prompt, max_new_tokens=12)
    s = m.stats()
    layers = s["layers"]
    assert [r["layer"] for r in layers] == m.manifest["experts"]["moe_layers"]
    for key in ("hits", "misses", "loads", "bytes_read", "prefetch_hits", "wasted_prefetch_bytes"):
        assert (
            sum(r[key] for r in layers)
            == s[{"hits": "cache_hits", "misses": "cache_misses", "loads": "expert_loads"}.get(key, key)]
        ), key
    assert s["stall_seconds"] == pytest.approx(sum(r["stall_seconds"] for r in layers))
    assert s["compute_seconds"] > 0
    assert layers[0]["recall"] is None  # nothing predicts the first MoE layer
    pf = m.prefetcher.stats()["layers"]
    for row, p in zip(layers[1:], pf):
        assert (row["precision"], row["recall"]) == (p["precision"], p["recall"])
        assert 0.0 <= row["recall"] <= 1.0
    for row in layers:
        assert row["hit_rate"] == pytest.approx(row["hits"] / (row["hits"] + row["misses"]))


def test_run_stats_prints_a_layer_table_and_json_on_request(model_dir, capsys):
    args = [
        "run",
        str(model_dir),
        "-p",
        "The robot",
        "-n",
        "6",
        "--memory-budget",
        "70KB",
        "--prefetch",
        "lookahead",
        "--policy",
        "structure",
    ]
    assert main(args + ["--stats"]) == 0
    err = capsys.readouterr().err
    table = err[err.index("layer  hit rate") :].splitlines()
    assert "precision" in table[0] and "stall ms" in table[0]
    assert len(table) == 2 + 3 + 2  # header, rule, 3 MoE layers, rule, total
    assert table[-1].split()[0] == "all"
    assert "{" not in err  # no JSON unless asked
    assert main(args + ["--stats-json"]) == 0
    err = capsys.readouterr().err
    s = json.loads(err[err.index("{") :])
    assert len(s["layers"]) == 3 and s["prefetch"]["predictor"] == "lookahead_moe_in"


def test_device_profile_throttles_the_store(model_dir):
    from edgemoe.devices import load_profile

    m = edgemoe.load(model_dir, device="raspberry-pi-4-sd")
    p = load_profile("raspberry-pi-4-sd")
    assert (m.store.read_bytes_per_s, m.store.read_latency_s) == (p.read_bytes_per_s, p.read_latency_s)
    assert m.stats()["storage_emulation"] == "raspberry-pi-4-sd"
    assert edgemoe.load(model_dir).store.read_bytes_per_s == 0
    with pytest.raises(ValueError, match="no device profile"):
        edgemoe.load(model_dir, device="no-such-board")


def test_prefetch_min_prob_skips_unlikely_guesses(model_dir):
    prompt = list(range(5, 21))
    want = edgemoe.load(model_dir).generate(prompt, max_new_tokens=8)
    budget = 2 * edgemoe.load(model_dir).min_budget
    issued = {}
    for p in (0.0, 0.9):
        m = edgemoe.load(model_dir, memory_budget=budget, prefetch="lookahead", prefetch_min_prob=p)
        assert m.prefetcher.min_prob == p
        assert m.generate(prompt, max_new_tokens=8) == want
        issued[p] = m.prefetcher.stats()["issued_bytes"]
    assert issued[0.9] < issued[0.0]
