"""Predictors (gate look-ahead definition, table, offline scoring) and the prefetcher:
output identical with and without prefetch, and the async call protocol."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tiny import _TEXT

import edgemoe
from edgemoe import _core
from edgemoe.converters.convert import convert
from edgemoe.format import quant
from edgemoe.format.safetensors import read_safetensors, to_float32
from edgemoe.planning import predictors, routing
from edgemoe.runtime import prefetch, trace

PROMPT = list(range(5, 29))


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    """A 3-layer, 8-expert tiny Mixtral at 4 bits with a routing.json."""
    dst = tmp_path_factory.mktemp("predict") / "model"
    convert(tiny_checkpoint("mixtral", num_hidden_layers=3, num_local_experts=8), dst, bits=4, progress=False)
    text = dst.parent / "calib.txt"
    text.write_text("\n\x1e\n".join([_TEXT] * 4))
    routing.profile_model(dst, text, window=64, max_tokens=400)
    return dst


class Capture(edgemoe.models.blocks.RouteObserver):
    def __init__(self):
        self.resid, self.out = {}, {}

    def on_route(self, layer, resid, ids, weights):
        self.resid[layer] = resid.copy()

    def on_layer_out(self, layer, h):
        self.out[layer] = h.copy()


def test_lookahead_is_the_next_router_on_this_layer_hidden_state(model_dir):
    m = edgemoe.load(model_dir)
    cap = Capture()
    m.net.observer = cap
    tr = m.trace_routing(PROMPT)  # the recorder forwards to the capture
    assert m.net.observer is cap
    w = {k: to_float32(a, dt) for k, (a, dt) in read_safetensors(model_dir / "backbone.safetensors").items()}
    eps = m.config.rms_norm_eps

    def router_probs(layer, h):
        x = h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w[f"layers.{layer}.ffn_norm"]
        z = x @ w[f"layers.{layer}.ffn_router"].T
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for layer in range(3):  # the captured MoE input reproduces the layer's own routing
        own = np.argsort(-router_probs(layer, cap.resid[layer]), axis=1)[:, :2]
        np.testing.assert_array_equal(np.sort(own, 1), np.sort(tr.experts[:, layer], 1))
    for layer in range(2):
        np.testing.assert_allclose(
            tr.lookahead["moe_in"][:, layer], router_probs(layer + 1, cap.resid[layer]), atol=2e-3
        )
        np.testing.assert_allclose(
            tr.lookahead["layer_out"][:, layer], router_probs(layer + 1, cap.out[layer]), atol=2e-3
        )
    assert not tr.lookahead["moe_in"][:, 2].any()  # no layer after the last


def test_live_predictions_equal_offline_ones(model_dir):
    m = edgemoe.load(model_dir)
    tr = m.trace_routing(PROMPT)
    la = prefetch.make_predictor(m, "lookahead", point="layer_out")
    tab = prefetch.make_predictor(m, "table")
    ctx = prefetch.RouteContext(list(tr.experts[-1:].transpose(1, 0, 2)), list(tr.weights[-1:].transpose(1, 0, 2)))
    np.testing.assert_allclose(tab.probs(2, ctx), tab.trace_probs(tr, 2)[-1:])
    ids, q = tab.predict(2, ctx)
    assert sorted(ids.tolist()) == list(range(8)) and np.all(np.diff(q) <= 0) and q[0] <= 1
    assert la.point == "layer_out" and la.name == "lookahead_layer_out"
    with pytest.raises(ValueError, match="look-ahead point"):
        prefetch.make_predictor(m, "lookahead", point="attn")


def test_fitted_lookahead(model_dir, tmp_path):
    m = edgemoe.load(model_dir)
    ids = routing.read_token_stream(m, model_dir.parent / "calib.txt", 300)
    fitter = predictors.LookaheadFitter(m.net, [0, 1, 2])
    trace.trace_routing(m, ids, 64, lookahead=False, observer=fitter)
    assert fitter.count.tolist() == [0, 300, 300]
    held = m.trace_routing(PROMPT)
    # pulled hard towards the router, the fit is the router
    stiff = fitter.solve(ridge=1e9)
    for point in ("moe_in", "layer_out"):
        tr = trace.trace_routing(m, PROMPT, fits=stiff)
        np.testing.assert_allclose(tr.lookahead[f"fitted_{point}"][:, :2], held.lookahead[point][:, :2], atol=2e-3)
    # loosely pulled, it predicts the next router's logits on its own calibration text better than the router
    fits = fitter.solve(ridge=1e-3)
    tr = trace.trace_routing(m, ids, 64, fits=fits)
    sizes = np.full((3, 8), 4096.0)
    for point in ("moe_in", "layer_out"):
        fitted = predictors.evaluate(predictors.RecordedPredictor(2, f"fitted_{point}"), tr, sizes)["overall"][
            "recall_k"
        ]
        plain = predictors.evaluate(predictors.RecordedPredictor(2, point), tr, sizes)["overall"]["recall_k"]
        assert fitted >= plain
    prefetch.save_fits(tmp_path, fits)
    back = prefetch.load_fits(tmp_path, m.config.rms_norm_eps)
    for n in (1, 2):
        np.testing.assert_array_equal(back["moe_in"].weights[n][0], fits["moe_in"].weights[n][0])
    # the live predictor gives what the trace recorded
    shutil.copy(tmp_path / prefetch.FIT_FILE, model_dir / prefetch.FIT_FILE)
    live = prefetch.make_predictor(m, "fitted:layer_out")
    assert live.name == "fitted_layer_out" and live.point == "layer_out"
    ctx = prefetch.RouteContext.empty(3)
    cap = Capture()
    m.net.observer = cap
    m.trace_routing(ids[:40].tolist(), lookahead=False)
    m.net.observer = None
    ctx.hidden["layer_out"] = cap.out[0]
    # the trace ran windows of 64 tokens, this a prompt of 40: an expert given 12 or more of
    # them meets x rounded to int8 (4-bit codes, prefill_int8) where it got float x in the other
    blob = m.store.read(0, 0)
    atol = 6e-3 if _core.prefill_int8(blob, quant.parse_blob(blob)["offsets"][0], expert=True) else 2e-3
    np.testing.assert_allclose(live.probs(1, ctx), tr.lookahead["fitted_layer_out"][:40, 0], atol=atol)


def test_choose_and_offline_scores():
    ids, probs = np.array([3, 1, 2, 0]), np.array([0.9, 0.6, 0.3, 0.01])
    sizes = np.array([100.0, 200.0, 100.0, 100.0])
    assert prefetch.choose(ids, probs, sizes, 400) == [3, 1, 2]
    assert prefetch.choose(ids, probs, sizes, 250) == [3]
    assert prefetch.choose(ids, probs, sizes, 1000, min_prob=0.1) == [3, 1, 2]
    # a predictor that is always right: recall 1 at the top-k, 1.5x bytes at the 1.5x operating point
    T, M, E, k = 200, 3, 8, 2
    rng = np.random.default_rng(0)
    ex = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(M)]) for _ in range(T)]).astype(np.int16)
    tr = trace.RoutingTrace(ex, np.full(ex.shape, 0.5, np.float32), [0, 1, 2], E)
    tr.lookahead = {"moe_in": np.zeros((T, M, E), np.float16)}
    for n in range(1, M):
        np.put_along_axis(tr.lookahead["moe_in"][:, n - 1], ex[:, n].astype(np.int64), 0.5, axis=1)
    ev = predictors.evaluate(predictors.RecordedPredictor(k, "moe_in"), tr, np.full((M, E), 4096.0))["overall"]
    assert ev["recall_k"] == 1.0 and ev["bytes_ratio_k"] == 1.0 and ev["bytes_ratio_2k"] == 2.0
    assert ev["operating_point"]["recall"] == 1.0 and ev["operating_point"]["bytes_ratio"] == 1.5


@pytest.mark.parametrize(
    "kind,point,mode",
    [
        ("table", None, "async"),
        ("lookahead", "moe_in", "async"),
        ("lookahead", "layer_out", "async"),
        ("fitted", "moe_in", "async"),
        ("lookahead", "moe_in", "blocking"),
        ("fitted", "layer_out", "blocking"),
    ],
)
def test_prefetch_on_and_off_give_identical_tokens(model_dir, kind, point, mode):
    want = edgemoe.load(model_dir).generate(PROMPT, max_new_tokens=12)  # unbounded, no prefetch
    budget = edgemoe.load(model_dir).min_budget * 3 // 2
    assert edgemoe.load(model_dir, memory_budget=budget).generate(PROMPT, max_new_tokens=12) == want
    m = edgemoe.load(model_dir, memory_budget=budget, policy="structure")
    pf = prefetch.attach_prefetcher(m, kind, mode=mode, point=point)
    assert m.generate(PROMPT, max_new_tokens=12) == want
    st = pf.stats()
    assert st["mode"] == mode and 0 < st["recall"] <= 1 and st["issued_bytes"] > 0
    if mode == "async":
        m.cache.wait_idle()
    c = m.cache.stats()
    assert c["peak_resident_bytes"] <= budget
    if mode == "blocking":  # blocking prefetches are plain loads ahead of the misses
        assert c["loads"] > c["misses"]
    else:  # queued for the I/O threads; they may lose every race on a busy machine
        assert c["prefetch_issued"] > 0


def test_load_with_prefetch_reports_prediction_stats(model_dir):
    want = edgemoe.load(model_dir).generate(PROMPT, max_new_tokens=8)
    m = edgemoe.load(model_dir, prefetch="lookahead")
    assert m.prefetcher.mode == "async"
    assert m.generate(PROMPT, max_new_tokens=8) == want
    s = m.stats()["prefetch"]
    assert s["predictor"] == "lookahead_moe_in" and len(s["layers"]) == 2 and s["issued_bytes"] > 0
    m.reset_stats()
    assert m.stats()["prefetch"]["issued_bytes"] == 0
    bare = model_dir.parent / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "routing.json").unlink()
    with pytest.raises(edgemoe.ModelDirectoryError, match="edgemoe profile"):
        edgemoe.load(bare, prefetch="table")


class FakeAsyncCache:
    """Records what the Prefetcher asks of the cache (its queue and cancel calls)."""

    def __init__(self):
        self.calls, self.cancels = [], []

    def prefetch(self, layer, experts, max_bytes=0):
        self.calls.append((layer, list(experts), max_bytes))

    def cancel_prefetches(self, layer=-1):
        self.cancels.append(layer)


def test_async_protocol(model_dir):
    m = edgemoe.load(model_dir)
    pf = prefetch.attach_prefetcher(m, "lookahead")
    fake = FakeAsyncCache()
    pf.cache, pf.mode = fake, "async"
    m.generate(PROMPT, max_new_tokens=4)
    sizes = prefetch.expert_sizes(m)
    assert len(fake.calls) == 4 * 2 and fake.cancels == [0, 1, 2] * 4  # per forward: 2 guesses, a cancel per layer
    for layer, experts, max_bytes in fake.calls:
        assert layer in (1, 2) and len(set(experts)) == len(experts) >= 1
        assert sizes[layer, experts].sum() <= max_bytes
