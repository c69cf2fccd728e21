"""Routing traces (shape, agreement with the transformers router) and routing statistics
on synthetic traces whose answers are known; routing.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import _TEXT, reference_model

import edgemoe
from edgemoe.cli import profile
from edgemoe.converters.convert import convert
from edgemoe.format import routing_file
from edgemoe.planning import predictors, routing
from edgemoe.runtime import prefetch, trace

E, K = 8, 2


@pytest.fixture(scope="module")
def mixtral16(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("mixtral", num_hidden_layers=3, num_local_experts=8)
    dst = tmp_path_factory.mktemp("routing") / "mixtral16"
    convert(src, dst, bits=16, progress=False)
    return src, dst


def synthetic(T, M, k=K, E=E, seed=0, rule=None) -> trace.RoutingTrace:
    """Uniform random routing, or rule(prev2, prev1, rng) -> [T, k] for layers >= 1."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((T, M, k), np.int16)
    for m in range(M):
        if rule is None or m == 0:
            ex[:, m] = np.argsort(rng.random((T, E)), axis=1)[:, :k]
        else:
            ex[:, m] = rule(ex[:, m - 2] if m >= 2 else None, ex[:, m - 1], rng)
    w = np.full((T, M, k), 1.0 / k, np.float32)
    return trace.RoutingTrace(ex, w, list(range(M)), E)


def recall(trace_fit, trace_eval, order):
    table = routing.fit_table(trace_fit)
    ev = predictors.evaluate(
        prefetch.TablePredictor(table, order=order),
        trace_eval,
        np.full((trace_eval.experts.shape[1], E), 4096.0),
        first=order,
    )
    return ev["overall"]["recall_k"]


# -- traces ----------------------------------------------------------------------------
def test_trace_matches_the_transformers_router(mixtral16):
    src, dst = mixtral16
    ids = np.random.default_rng(0).integers(3, 512, size=40).tolist()
    tr = edgemoe.load(dst).trace_routing(ids)
    assert tr.experts.shape == (40, 3, K) and tr.weights.shape == (40, 3, K)
    assert tr.lookahead["moe_in"].shape == (40, 3, E)
    with torch.no_grad():
        logits = reference_model(src)(torch.tensor([ids]), output_router_logits=True).router_logits
    for m, lg in enumerate(logits):
        p = torch.softmax(lg.float(), -1).numpy()  # [T, E]
        top = np.argsort(-p, axis=1)[:, :K]
        s = np.sort(p, axis=1)[:, ::-1]
        clear = s[:, K - 1] - s[:, K] > 1e-3  # skip near-ties that bf16 rounding may flip
        assert clear.mean() > 0.8
        np.testing.assert_array_equal(tr.experts[clear, m], top[clear])
        w = np.take_along_axis(p, top, 1)
        np.testing.assert_allclose(tr.weights[clear, m], (w / w.sum(1, keepdims=True))[clear], atol=2e-3)


def test_windows_reset_the_kv_cache(mixtral16):
    m = edgemoe.load(mixtral16[1])
    ids = list(range(3, 43))
    whole = m.trace_routing(ids, window=16, lookahead=False)
    parts = [m.trace_routing(ids[s : s + 16], lookahead=False) for s in (0, 16, 32)]
    np.testing.assert_array_equal(whole.experts, np.concatenate([p.experts for p in parts]))
    assert whole.lookahead == {}


def test_moe_index_skips_dense_layers(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("qwen2_moe"), tmp_path / "q", bits=4, progress=False)  # layer 1 is dense
    tr = edgemoe.load(tmp_path / "q").trace_routing(list(range(3, 20)))
    assert tr.moe_layers == [0, 2] and tr.experts.shape == (17, 2, 2)


def test_trace_save_load(tmp_path):
    tr = synthetic(50, 3)
    tr.lookahead = {"moe_in": np.random.default_rng(0).random((50, 3, E)).astype(np.float16)}
    tr.save(tmp_path / "t.npz")
    back = trace.RoutingTrace.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.lookahead["moe_in"], tr.lookahead["moe_in"])
    assert back.moe_layers == tr.moe_layers and back.num_experts == E


# -- statistics ------------------------------------------------------------------------
def test_usage_statistics_known_answers():
    uniform = routing.usage_stats(np.full((1, 8), 100))[0]
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["top_quarter_share"] == pytest.approx(0.25)
    skewed = routing.usage_stats(np.array([[100, 100, 0, 0, 0, 0, 0, 0]]))[0]
    assert skewed["entropy"] == pytest.approx(np.log(2) / np.log(8))
    assert skewed["top_quarter_share"] == pytest.approx(1.0) and skewed["min_share"] == 0
    counts = routing.usage_counts(synthetic(4000, 2))
    assert counts.shape == (2, E) and counts.sum() == 4000 * 2 * K


def test_deterministic_layer_to_layer_mapping_is_fully_predictable():
    perm = np.random.default_rng(5).permutation(E)
    rule = lambda p2, p1, rng: perm[p1]  # noqa: E731
    fit, held = synthetic(3000, 4, rule=rule, seed=1), synthetic(1000, 4, rule=rule, seed=2)
    assert recall(fit, held, order=1) == 1.0
    assert recall(fit, held, order=2) == 1.0
    # top-1: 8 distinct paths, all among the 20% most frequent of 8^3 (with k=2 each token
    # also walks the k^3 - k cross paths, so coverage stays below 1 even here)
    assert routing.path_coverage(synthetic(500, 4, k=1, rule=rule))[2:] == [1.0, 1.0]


def test_uniform_random_routing_gives_k_over_e():
    fit, held = synthetic(6000, 3, seed=1), synthetic(3000, 3, seed=2)
    assert recall(fit, held, order=1) == pytest.approx(K / E, abs=0.03)
    assert recall(fit, held, order=2) == pytest.approx(K / E, abs=0.03)
    assert routing.path_coverage(held)[2] == pytest.approx(0.2, abs=0.1)


def test_second_order_table_sees_what_first_order_cannot():
    # top-1; layer n's expert is (e at n-2 + e at n-1) mod E: layer n-1 alone says nothing
    rule = lambda p2, p1, rng: (p2 + p1) % E if p2 is not None else rng.integers(0, E, p1.shape)  # noqa: E731
    fit, held = synthetic(4000, 4, k=1, rule=rule, seed=1), synthetic(1000, 4, k=1, rule=rule, seed=2)
    table = routing.fit_table(fit)
    sizes = np.ones((4, E))
    second = predictors.evaluate(prefetch.TablePredictor(table, order=2), held, sizes, first=2)["overall"]["recall_k"]
    first = predictors.evaluate(prefetch.TablePredictor(table, order=1), held, sizes, first=2)["overall"]["recall_k"]
    assert second == 1.0 and first < 0.3


def test_unseen_context_backs_off_to_first_order_then_frequency():
    # calibration only ever shows experts 0/1 at layer 0: contexts with 6/7 are unseen
    tr = synthetic(500, 3, rule=lambda p2, p1, rng: (p1 + 2) % E)
    tr.experts[:, 0] = [0, 1]
    tr.experts[:, 1] = [2, 3]
    tr.experts[:, 2] = [4, 5]
    table = routing.fit_table(tr)
    unseen = table.probs(2, np.array([[6, 7]]), np.array([[6, 7]]))  # (l-1, l) unseen, l unseen
    np.testing.assert_allclose(unseen.sum(), 1.0)
    assert set(np.argsort(-unseen[0])[:2]) == {4, 5}  # layer 2's frequency
    seen_l = table.probs(2, np.array([[2, 3]]), np.array([[6, 7]]))  # pair unseen, l seen
    assert set(np.argsort(-seen_l[0])[:2]) == {4, 5} and seen_l[0, 4] > unseen[0, 4]


def test_routing_json_round_trip(tmp_path):
    fit, held = synthetic(800, 4, seed=1), synthetic(300, 4, seed=2)
    doc = routing.build_routing(fit, held, np.full((4, E), 8192.0), {"file": "x"})
    routing_file.save_routing(tmp_path, doc)
    back = routing_file.load_routing(tmp_path)
    a, b = routing.fit_table(fit), prefetch.table_from_routing(back)
    prev2, prev1 = held.experts[:, 1], held.experts[:, 2]
    np.testing.assert_allclose(b.probs(3, prev1, prev2), a.probs(3, prev1, prev2))
    assert back["layers"][0]["entropy"] == pytest.approx(doc["layers"][0]["entropy"])
    assert set(back["evaluation"]["predictors"]) == {"table_l", "table"}
    (tmp_path / "routing.json").write_text(json.dumps({**back, "version": 99}))
    with pytest.raises(edgemoe.ModelDirectoryError, match="version 99"):
        routing_file.load_routing(tmp_path)


def test_profile_verb_writes_routing_json(mixtral16, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n\x1e\n".join([_TEXT] * 6))
    assert (
        profile.main(
            [
                str(mixtral16[1]),
                "--calib",
                str(text),
                "--window",
                "64",
                "--max-tokens",
                "600",
                "--no-save",
                "--traces",
                str(tmp_path / "tr"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fit:moe_in" in out and "la:out" in out and "entropy" in out
    calib = trace.RoutingTrace.load(tmp_path / "tr" / "calib.npz")
    held = trace.RoutingTrace.load(tmp_path / "tr" / "eval.npz")
    assert (calib.tokens, held.tokens) == (448, 152)  # 80% of 600, in whole windows
    assert set(held.lookahead) == {"moe_in", "layer_out", "fitted_moe_in", "fitted_layer_out"}
    with pytest.raises(edgemoe.ModelDirectoryError, match="edgemoe profile"):
        routing_file.load_routing(tmp_path)
