"""Native dense ops of the decoder (native/dense.cpp) against numpy references."""

import numpy as np
import pytest
import reference

from edgemoe import _core
from edgemoe.models import blocks as base

RNG = np.random.default_rng(7)


def rope_reference(x, start, inv_freq):
    pos = np.arange(start, start + x.shape[0], dtype=np.float32)
    f = pos[:, None] * inv_freq[None, :]
    cos, sin = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("shape", [(1, 64), (5, 1024), (3, 4, 128)])
def test_rms_norm(shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    w = RNG.standard_normal(shape[-1]).astype(np.float32)
    y = _core.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, reference.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start", [0, 7, 3000])
def test_rope_in_place(start):
    x = RNG.standard_normal((3, 4, 64)).astype(np.float32)
    rope = base.Rope(64, 1e6)
    ref = rope_reference(x, start, rope.inv_freq)
    y = rope(x, start)
    assert y is x
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=2e-5)


def test_rope_refuses_a_copy():
    with pytest.raises(TypeError):
        _core.rope(np.zeros((1, 2, 8), np.float64), 0, np.ones(4, np.float32))


@pytest.mark.parametrize(
    "T,start,heads,kv_heads,window",
    [
        (1, 0, 4, 4, None),
        (1, 40, 16, 4, None),
        (6, 0, 8, 2, None),
        (5, 11, 8, 2, None),
        (1, 40, 4, 2, 8),
        (9, 3, 4, 1, 4),
        (64, 0, 16, 4, None),
        (1, 1023, 8, 2, None),  # one token over a long cache: each kv head's keys in parts of 512
        (1, 1100, 16, 4, None),  # the last part of 77
        (1, 1500, 8, 2, 1100),  # a window: the parts start where it does
        (1, 1500, 8, 2, 1000),  # a window shorter than two parts
    ],
)
def test_attention(T, start, heads, kv_heads, window):
    hd = 32
    S = start + T
    q = RNG.standard_normal((T, heads, hd)).astype(np.float32)
    k = RNG.standard_normal((S, kv_heads, hd)).astype(np.float32)
    v = RNG.standard_normal((S, kv_heads, hd)).astype(np.float32)
    y = base.attention(q, k, v, start, window)
    assert y.shape == (T, heads * hd)
    np.testing.assert_allclose(y, reference.attention(q, k, v, start, window), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk(normalize):
    logits = RNG.standard_normal((7, 8)).astype(np.float32) * 3
    logits[3, 5] = logits[3, 2]  # a tie: the lower id goes first
    ids, w = base.route_softmax_topk(logits, 2, normalize)
    ref_ids, ref_w = reference.route_softmax_topk(logits, 2, normalize)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == (7, 2)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6)


def test_one_tokens_attention_is_the_same_on_any_number_of_threads():
    """One token's attention over a long cache reads each kv head's keys in parts and merges
    them in order: the same bits whichever threads took the parts."""
    q = RNG.standard_normal((1, 16, 64)).astype(np.float32)
    k, v = (RNG.standard_normal((1300, 4, 64)).astype(np.float32) for _ in range(2))
    sinks = RNG.standard_normal(16).astype(np.float32)
    n = _core.get_num_threads()
    try:
        got = []
        for threads in (1, 2, 3):
            _core.set_num_threads(threads)
            got.append((_core.attention(q, k, v, 1299), _core.attention(q, k, v, 1299, 1100, sinks)))
    finally:
        _core.set_num_threads(n)
    for g in got[1:]:
        np.testing.assert_array_equal(g[0], got[0][0])
        np.testing.assert_array_equal(g[1], got[0][1])


@pytest.mark.parametrize("T,S,window", [(1, 40, None), (1, 1300, None), (1, 1300, 700), (5, 70, None), (5, 70, 9)])
def test_attention_over_the_kv_caches_views(T, S, window):
    """KVCache keeps each layer kv head major and append() returns [S, kv_heads, hd] views of
    it: attention over them gives the packed arrays' outputs bit for bit."""
    cache = base.KVCache(1, 4, 64)
    k, v = (RNG.standard_normal((S, 4, 64)).astype(np.float32) for _ in range(2))
    cache.append(0, k[: S - T], v[: S - T], 0)
    kv, vv = cache.append(0, k[S - T :], v[S - T :], S - T)
    assert cache.k[0].shape[:2] == (4, base.KVCache.CHUNK * -(-S // base.KVCache.CHUNK))
    assert np.shares_memory(kv, cache.k[0]) and np.shares_memory(vv, cache.v[0]) and not kv.flags.c_contiguous
    np.testing.assert_array_equal(kv, k)
    np.testing.assert_array_equal(vv, v)
    q = RNG.standard_normal((T, 16, 64)).astype(np.float32)
    sinks = RNG.standard_normal(16).astype(np.float32)
    np.testing.assert_array_equal(
        _core.attention(q, kv, vv, S - T, window or 0, sinks), _core.attention(q, k, v, S - T, window or 0, sinks)
    )
    mixed = _core.attention(q, kv, np.ascontiguousarray(vv), S - T)  # two layouts: read as one, packed
    np.testing.assert_array_equal(mixed, _core.attention(q, k, v, S - T))
    with pytest.raises(ValueError, match="k and v must have one dtype, float32 or float16"):
        _core.attention(q, k.astype(np.float16), v, S - T)
