"""The one-call decode step (native/layer.h, DecoderLM._decode_native) gives bit for bit the
logits of the per-op Python path (DecoderLM.block), and is used only where it applies."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe
from edgemoe import _core
from edgemoe.converters.convert import convert


def decode_logits(model, ids: list[int], native: bool) -> np.ndarray:
    """Logits of each token fed one at a time, with the native step on or off."""
    net = model.net
    saved = net.decode_layers
    if not native:
        net.decode_layers = None
    try:
        model.reset()
        return np.stack([net.forward(np.array([t]), model.kv, pos, all_logits=False)[0] for pos, t in enumerate(ids)])
    finally:
        net.decode_layers = saved


IDS = [5, 17, 17, 3, 250, 0, 42, 9, 9, 9, 100, 7, 64, 1, 33, 2, 8, 120, 77, 5]


@pytest.mark.parametrize("bits,kv_cache", [(16, "float32"), (16, "float16"), (8, "float16"), (4, "float32")])
def test_native_step_matches_the_python_path(tiny_checkpoint, tmp_path, bits, kv_cache):
    """Both paths store the token's key and value in the cache alike (float16: rounded to
    nearest, by the native step and by numpy) and read them back alike."""
    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=bits, progress=False)
    m = edgemoe.load(tmp_path / "m", kv_cache=kv_cache)
    assert m.net.decode_layers is not None and m.stats()["kv_cache"] == kv_cache
    np.testing.assert_array_equal(decode_logits(m, IDS, True), decode_logits(m, IDS, False))


def test_native_step_matches_with_a_budget_and_a_sliding_window(tiny_checkpoint, tmp_path):
    """Streaming experts (a budget of one layer's top-k) and a window shorter than the text."""
    convert(tiny_checkpoint("mixtral", sliding_window=5), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m", memory_budget=edgemoe.load(tmp_path / "m").min_budget)
    assert m.net.cfg.sliding_window == 5 and m.net.decode_layers is not None
    native, python = decode_logits(m, IDS, True), decode_logits(m, IDS, False)
    np.testing.assert_array_equal(native, python)
    assert m.cache.stats()["misses"] > 0  # the experts really were streamed
    # generation takes the native step and gives the tokens the Python path gives
    m.net.decode_layers, saved = None, m.net.decode_layers
    want = m.generate(IDS[:4], max_new_tokens=12)
    m.net.decode_layers = saved
    assert m.generate(IDS[:4], max_new_tokens=12) == want


@pytest.mark.parametrize("bits", [8, 4])
def test_one_expert_per_thread_gives_the_same_logits(tiny_checkpoint, tmp_path, bits):
    """With two threads a token's two resident experts run one per thread; with one thread
    (and with three, where two experts cannot share them evenly) each expert's rows are split
    instead: the same numbers, bit for bit, on the native step and on the Python path."""
    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=bits, progress=False)
    m = edgemoe.load(tmp_path / "m")
    n = _core.get_num_threads()
    try:
        got = {}
        for threads in (1, 2, 3):
            _core.set_num_threads(threads)
            got[threads] = (decode_logits(m, IDS, True), decode_logits(m, IDS, False))
    finally:
        _core.set_num_threads(n)
    for threads in (2, 3):
        np.testing.assert_array_equal(got[threads][0], got[1][0])
        np.testing.assert_array_equal(got[threads][1], got[1][1])


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_layers_the_step_does_not_cover_keep_the_python_path(tiny_checkpoint, tmp_path, arch):
    """qwen2_moe: a shared expert, a dense layer and q/k/v biases; qwen3_moe and olmoe: q/k norms;
    deepseek_v3: multi-head latent attention and its own routing."""
    convert(tiny_checkpoint(arch), tmp_path / "m", bits=8, progress=False)
    assert edgemoe.load(tmp_path / "m").net.decode_layers is None


def test_an_observer_takes_the_python_path_and_a_swapped_moe_the_step_up_to_its_experts(tiny_checkpoint, tmp_path):
    """An observer needs every op in Python; an installed MoE computation (a cluster's) gets
    each layer's experts from DecodeLayer.attend, and the logits stay the native step's."""
    from edgemoe.models.blocks import RouteObserver

    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m")
    seen = []

    class Obs(RouteObserver):
        def on_route(self, layer, resid, ids, weights):
            seen.append(layer)

    m.net.observer = Obs()
    m.generate(IDS[:3], max_new_tokens=3)
    assert len(seen) == 2 * 3  # prefill once per layer, then 2 decode steps x 2 layers
    m.net.observer = None
    want = decode_logits(m, IDS, True)
    calls = []

    def moe(layer, x, ids, weights):
        calls.append((layer, x.shape, ids.shape, weights.shape))
        return m.net.moe(layer, x, ids, weights)

    class Attending:  # counts the native calls that stop before the experts
        def __init__(self, layer):
            self.layer, self.calls = layer, 0

        def attend(self, *a):
            self.calls += 1
            return self.layer.attend(*a)

    m.net.moe_override = moe
    m.net.decode_layers = [Attending(layer) for layer in m.net.decode_layers]
    np.testing.assert_array_equal(decode_logits(m, IDS, True), want)
    assert calls == [(i, (1, 64), (1, 2), (1, 2)) for _ in IDS for i in (0, 1)]
    assert [layer.calls for layer in m.net.decode_layers] == [len(IDS), len(IDS)]
    calls.clear()
    m.generate(IDS[:3], max_new_tokens=3)
    assert len(calls) == 2 * 3


def test_decode_layer_refuses_bad_shapes(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m")
    layer, kv = m.net.decode_layers[0], m.kv
    kv.reserve(0, 0, 1)
    h = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="h must be float32"):
        layer.step(m.cache, np.zeros(63, np.float32), kv.k[0], kv.v[0], 0)
    with pytest.raises(ValueError, match="capacity"):
        layer.step(m.cache, h, kv.k[0], kv.v[0], kv.k[0].shape[1])
    with pytest.raises(TypeError):
        layer.step(m.cache, h.astype(np.float64), kv.k[0], kv.v[0], 0)  # no silent copy of h
    with pytest.raises(ValueError, match="DecodeLayer.attend: h must be float32"):
        layer.attend(np.zeros(63, np.float32), kv.k[0], kv.v[0], 0)
    with pytest.raises(ValueError, match="DecodeLayer.attend: position -1"):
        layer.attend(h, kv.k[0], kv.v[0], -1)
    for k, v in [
        (kv.k[0], kv.v[0].astype(np.float32)),  # one dtype for both
        (kv.k[0].transpose(1, 0, 2).copy(), kv.v[0].transpose(1, 0, 2).copy()),  # [capacity, kv_heads, hd]
        (kv.k[0][:, ::2], kv.v[0][:, ::2]),  # not contiguous: the step writes into it
        (kv.k[0].astype(np.float64), kv.v[0].astype(np.float64)),
    ]:
        with pytest.raises(ValueError, match="KV cache must be writable C-contiguous"):
            layer.step(m.cache, h, k, v, 0)
    L = m.net.layers[0]
    lin = [(lin.w, lin.kind) for lin in (L.attn.q, L.attn.k, L.attn.v, L.attn.o, L.moe.router)]
    with pytest.raises(ValueError, match="q must be"):
        _core.DecodeLayer(0, lin[1], *lin[1:], L.attn.norm, L.ffn_norm, m.net.rope.inv_freq, 4, 2, 16, 2, 0, 1e-6, True)
    with pytest.raises(ValueError, match="DecodeLayer: w must be 2-D"):  # a QMatrix buffer called a float matrix
        _core.DecodeLayer(
            0, (lin[0][0], "f32"), *lin[1:], L.attn.norm, L.ffn_norm, m.net.rope.inv_freq, 4, 2, 16, 2, 0, 1e-6, True
        )
    with pytest.raises(ValueError, match="DecodeLayer: kind must be 'f32', 'f16' or 'bf16', got 'q8'"):
        _core.DecodeLayer(
            0,
            (np.zeros((64, 64), np.float32), "q8"),
            *lin[1:],
            L.attn.norm,
            L.ffn_norm,
            m.net.rope.inv_freq,
            4,
            2,
            16,
            2,
            0,
            1e-6,
            True,
        )
    # _core.linear checks float weights the same way (one helper, float_matrix, in bindings.cpp)
    with pytest.raises(ValueError, match="linear: kind 'f32' needs a float32 w"):
        _core.linear(np.zeros(3, np.float32), np.zeros((2, 3), np.float64), "f32")
    with pytest.raises(ValueError, match="kv_heads must divide"):
        _core.DecodeLayer(0, *lin, L.attn.norm, L.ffn_norm, m.net.rope.inv_freq, 4, 3, 16, 2, 0, 1e-6, True)


def test_an_installed_moe_computation_adds_its_stats_and_is_closed_with_the_model(tiny_checkpoint, tmp_path):
    """Model.stats, reset_stats and close reach an override's methods of those names (a cluster's)."""
    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m")

    class Counting:
        calls, closed = 0, False

        def __call__(self, *a):
            self.calls += 1
            return m.net.moe(*a)

        def stats(self):
            return {"counting": {"calls": self.calls}}

        def reset_stats(self):
            self.calls = 0

        def close(self):
            self.closed = True

    want = m.generate(IDS[:3], max_new_tokens=3)
    m.net.moe_override = c = Counting()
    assert m.generate(IDS[:3], max_new_tokens=3) == want
    assert m.stats()["counting"] == {"calls": 2 * 3}
    m.reset_stats()
    assert m.stats()["counting"] == {"calls": 0}
    m.close()
    assert c.closed and m.net.moe_override is None and "counting" not in m.stats()
