"""Asynchronous prefetch, eviction policies, storage emulation and per-layer statistics
of the native expert cache, on a small experts file written with quant.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

import edgemoe
from edgemoe import _core, errors
from edgemoe.format import quant as q

L, E, H, I = 3, 8, 64, 64
PAGE = 4096


def write_experts(path, seed=0):
    """An experts.bin per docs/format.md with [L, E] 4-bit experts (all the same size)."""
    rng = np.random.default_rng(seed)
    offsets, sizes, crcs = (np.zeros((L, E), t) for t in (np.uint64, np.uint64, np.uint32))
    pos, parts = q.EXPERTS_HEADER_BYTES, []
    for layer in range(L):
        for e in range(E):
            mats = [(rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32) for r, c in ((I, H), (I, H), (H, I))]
            blob = q.pack_expert_blob(layer, e, *(q.quantize_matrix(w, 4, 32, False) for w in mats))
            offsets[layer, e], sizes[layer, e], crcs[layer, e] = pos, blob.size, _core.crc32c(blob)
            parts.append((pos, blob))
            pos = (pos + blob.size + PAGE - 1) // PAGE * PAGE
    data = np.zeros(parts[-1][0] + parts[-1][1].size, np.uint8)
    data[:PAGE] = q.experts_file_header(L, E, L * E, data.size)
    for off, blob in parts:
        data[off : off + blob.size] = blob
    data.tofile(path)
    return offsets, sizes, crcs


@pytest.fixture()
def store_args(tmp_path):
    path = str(tmp_path / "experts.bin")
    return (path, *write_experts(path))


@pytest.fixture()
def store(store_args):
    return _core.ExpertStore(*store_args)


def one(store):
    """Budget charge of one expert (all are the same size here)."""
    return (store.blob_size(0, 0) + PAGE - 1) // PAGE * PAGE


def steps(n, seed=1, T=1, K=2):
    """n (layer, x, ids, weights) in forward order, ids distinct per token."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
        out.append((i % L, rng.standard_normal((T, H)).astype(np.float32), ids, rng.random((T, K)).astype(np.float32)))
    return out


def reference(store, run):
    cache = _core.ExpertCache(store, 0, io_threads=0)
    return [_core.moe_forward(cache, layer, x, ids, w) for layer, x, ids, w in run]


def test_api_and_errors(store):
    cache = _core.ExpertCache(store, 4 * one(store), policy="structure", io_threads=1)
    assert (cache.policy, cache.io_threads) == ("structure", 1)
    assert _core.ExpertCache.entry_overhead_bytes > 0
    with pytest.raises(ValueError, match="'lru', 'lfu' or 'structure'"):
        _core.ExpertCache(store, 0, policy="fifo")
    with pytest.raises(ValueError, match="io_threads"):
        _core.ExpertCache(store, 0, io_threads=-1)
    with pytest.raises(ValueError, match="out of range"):
        cache.prefetch(0, [E])
    with pytest.raises(ValueError, match="out of range"):
        cache.set_current_layer(L)
    # The blocking single-expert read is load(); prefetch takes a list and never blocks.
    with pytest.raises(TypeError):
        cache.prefetch(0, 1)
    assert cache.load(0, 1) is True and cache.load(0, 1) is False
    assert cache.load(0, 2) is True and cache.contains(0, 2)
    assert cache.stats()["loads"] == 2 and cache.stats()["hits"] + cache.stats()["misses"] == 0


def test_prefetch_then_moe_forward_is_identical_and_counts_prefetch_hits(store):
    run = steps(2 * L, T=3)
    ref = reference(store, run)
    cache = _core.ExpertCache(store, 0, policy="lru", io_threads=2)
    hits = issued = 0
    unused = set()
    for (layer, x, ids, w), y_ref in zip(run, ref):
        absent = [e for e in range(E) if not cache.contains(layer, e)]
        needed = sorted(set(ids.ravel().tolist()).intersection(absent))
        extra = [e for e in absent if e not in needed][:1]  # a wrong guess as well
        assert cache.prefetch(layer, needed + extra) == len(needed + extra)
        issued += len(needed + extra)
        unused |= {(layer, e) for e in needed + extra}
        routed = {(layer, e) for e in ids.ravel().tolist()}
        hits += len(routed & unused)  # extras of earlier rounds may be routed now: hits too
        unused -= routed
        cache.wait_idle()
        y = _core.moe_forward(cache, layer, x, ids, w)
        np.testing.assert_array_equal(y, y_ref)  # bit for bit: the sum runs in slot order
    s = cache.stats()
    assert s["prefetch_hits"] == hits and s["misses"] == 0
    assert s["prefetch_issued"] == s["prefetch_loads"] == issued
    assert s["demand_bytes"] == 0 and s["prefetch_bytes"] == s["bytes_read"]


def test_prefetch_in_flight_counts_and_moe_forward_waits_for_that_read(store_args):
    store = _core.ExpertStore(*store_args, read_latency_s=0.03)
    cache = _core.ExpertCache(store, 0, io_threads=2)
    ((layer, x, ids, w),) = steps(1)
    ref = reference(_core.ExpertStore(*store_args), [(layer, x, ids, w)])[0]
    assert cache.prefetch(layer, ids[0].tolist()) == 2
    time.sleep(0.005)  # both reads started, neither landed
    y = _core.moe_forward(cache, layer, x, ids, w)
    np.testing.assert_array_equal(y, ref)
    s = cache.stats()
    assert s["loads"] == 2 and s["prefetch_hits"] == 2 and s["misses"] == 2  # waited, never read twice
    assert s["stall_seconds"] > 0.01 and s["compute_seconds"] > 0


def test_cancel_drops_queued_work(store_args):
    store = _core.ExpertStore(*store_args, read_latency_s=0.05)
    cache = _core.ExpertCache(store, 0, io_threads=1)
    assert cache.prefetch(1, list(range(E))) == E
    assert cache.prefetch(2, [0, 1]) == 2
    assert cache.cancel_prefetches(2) == 2  # only layer 2's, none started yet: layer 1's go first
    cancelled = cache.cancel_prefetches()
    assert cancelled >= E - 2  # one read may have started, and it finishes
    cache.wait_idle()
    s = cache.stats()
    assert s["prefetch_cancelled"] == cancelled + 2 and s["loads"] == E - cancelled
    assert s["prefetch_issued"] == E + 2
    assert cache.prefetch(1, list(range(E)), max_bytes=2 * one(store)) <= 2  # max_bytes caps a call


def test_demand_reads_go_before_queued_prefetches(store_args):
    store = _core.ExpertStore(*store_args, read_latency_s=0.02)
    cache = _core.ExpertCache(store, 0, io_threads=1)
    assert cache.prefetch(1, list(range(E))) == E
    t0 = time.perf_counter()
    _core.moe_forward(cache, 0, np.ones((1, H), np.float32), np.array([[3, 5]], np.int32), np.ones((1, 2), np.float32))
    assert time.perf_counter() - t0 < 0.02 * E / 2  # not behind the 8 prefetches
    assert cache.stats()["prefetch_loads"] <= 2
    cache.cancel_prefetches()
    cache.wait_idle()


def test_wrong_guess_storm_changes_nothing_and_keeps_the_budget(store):
    run = steps(8 * L, T=2)
    ref = reference(store, run)
    budget = 6 * one(store)  # two layers' worth of a 2-token step
    for policy in ("lru", "lfu", "structure"):
        cache = _core.ExpertCache(store, budget, policy=policy, io_threads=2)
        rng = np.random.default_rng(3)
        for i, ((layer, x, ids, w), y_ref) in enumerate(zip(run, ref)):
            wrong = [e for e in range(E) if e not in ids][:4]
            cache.prefetch((layer + 1) % L, rng.permutation(E).tolist(), max_bytes=int(rng.integers(0, 4)) * one(store))
            cache.prefetch(layer, wrong)  # guesses for the layer about to run, all wrong
            if i % 3 == 0:
                cache.cancel_prefetches(int(rng.integers(-1, L)))
            np.testing.assert_array_equal(_core.moe_forward(cache, layer, x, ids, w), y_ref)
            assert cache.resident_bytes <= budget
        cache.wait_idle()
        s = cache.stats()
        assert s["peak_resident_bytes"] <= budget
        assert s["prefetch_issued"] > 0 and s["hits"] + s["misses"] == sum(
            len(set(ids.ravel())) for _, _, ids, _ in run
        )


def test_layer_stats_add_up_to_the_totals(store):
    cache = _core.ExpertCache(store, 5 * one(store), policy="structure", io_threads=2)
    for layer, x, ids, w in steps(4 * L, T=2):
        cache.prefetch((layer + 1) % L, list(range(E)), max_bytes=2 * one(store))
        _core.moe_forward(cache, layer, x, ids, w)
    cache.wait_idle()
    total, per = cache.stats(), cache.layer_stats()
    assert [d["layer"] for d in per] == list(range(L))
    for key, _value in per[0].items():
        if key != "layer":
            assert sum(d[key] for d in per) == pytest.approx(total[key]), key
    for d in per:
        assert d["hits"] + d["misses"] > 0 and d["compute_seconds"] > 0
        assert d["bytes_read"] == d["demand_bytes"] + d["prefetch_bytes"]
    for key in (
        "hits",
        "misses",
        "loads",
        "evictions",
        "bytes_read",
        "read_seconds",
        "resident_bytes",
        "peak_resident_bytes",
        "direct_io",
    ):  # the keys Model.stats reads
        assert key in total
    cache.reset_stats()
    assert all(d["loads"] == 0 for d in cache.layer_stats())


def test_wasted_prefetch_bytes(store):
    cache = _core.ExpertCache(store, 3 * one(store), policy="lru", io_threads=1)
    cache.set_current_layer(0)
    assert cache.prefetch(1, [0, 1]) == 2
    cache.wait_idle()
    x, w = np.ones((1, H), np.float32), np.ones((1, 1), np.float32)
    _core.moe_forward(cache, 1, x, np.array([[0]], np.int32), w)  # (1, 0) used
    for e in (0, 1, 2):  # three misses in layer 2 evict (1, 1) unused
        _core.moe_forward(cache, 2, x, np.array([[e]], np.int32), w)
    s = cache.stats()
    assert not cache.contains(1, 1) and s["wasted_prefetch_bytes"] == store.blob_size(1, 1)
    assert cache.layer_stats()[1]["wasted_prefetch_bytes"] == s["wasted_prefetch_bytes"]


def test_throttled_reads_take_bytes_over_bandwidth(store_args):
    bw, lat = 4e6, 0.002
    store = _core.ExpertStore(*store_args, read_bytes_per_s=bw, read_latency_s=lat)
    assert (store.read_bytes_per_s, store.read_latency_s) == (bw, lat)
    cache = _core.ExpertCache(store, 0, io_threads=2)
    t0 = time.perf_counter()
    assert cache.prefetch(0, list(range(E))) == E
    cache.wait_idle()
    total = sum(store.blob_size(0, e) for e in range(E))
    assert time.perf_counter() - t0 >= total / bw
    store.set_throttle(0, 0)
    t0 = time.perf_counter()
    cache.prefetch(1, list(range(E)))
    cache.wait_idle()
    assert time.perf_counter() - t0 < total / bw


def test_model_with_policy_and_prefetch_matches_the_unbounded_run(tiny_checkpoint, tmp_path):
    from edgemoe.converters.convert import convert

    dst = tmp_path / "model"
    convert(tiny_checkpoint("mixtral", num_hidden_layers=3, num_local_experts=8), dst, bits=4, progress=False)
    prompt = list(range(5, 21))
    ref = edgemoe.load(dst).generate(prompt, max_new_tokens=8)
    m0 = edgemoe.load(dst)
    budget = 2 * m0.min_budget
    for policy in ("lru", "lfu", "structure"):
        m = edgemoe.load(dst, memory_budget=budget, prefetch="lookahead", policy=policy, io_threads=2)
        assert m.prefetcher.mode == "async" and m.cache.policy == policy
        assert m.generate(prompt, max_new_tokens=8) == ref
        c = m.cache.stats()
        assert c["peak_resident_bytes"] <= budget and c["prefetch_issued"] > 0
    with pytest.raises(errors.BudgetError):
        edgemoe.load(dst, memory_budget=m0.min_budget // 2)
