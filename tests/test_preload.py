"""Preloading at load: when the budget holds every expert, the I/O threads read them all
behind the first tokens' demand reads; under a smaller budget, a warm start reads the most
used experts that fit. The tokens are those of a run without either."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.format.manifest import blob_tables, page_bytes
from edgemoe.planning.routing import profile_model
from edgemoe.runtime.engine import warm_start_order


def test_preload_reads_every_expert_and_changes_no_token(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    want = edgemoe.load(dst, preload="none").generate([1, 5, 9], max_new_tokens=8)
    lazy = edgemoe.load(dst, preload="none")
    assert not lazy.preloading and lazy.cache.stats()["loads"] == 0  # nothing read before it is needed

    m = edgemoe.load(dst)  # unbounded: preloads by default
    assert m.preloading
    assert m.generate([1, 5, 9], max_new_tokens=8) == want
    m.cache.wait_idle()
    _, lengths, _, _ = blob_tables(m.manifest)
    assert all(m.cache.contains(int(layer), int(e)) for layer, e in zip(*np.nonzero(lengths)))
    s = m.cache.stats()
    assert s["prefetch_issued"] > 0 and s["loads"] == np.count_nonzero(lengths)  # each expert read once


def test_after_a_whole_model_preload_decode_never_waits_for_a_read(tiny_checkpoint, tmp_path):
    """When load queued every expert, the first token waits for the last of those reads: a
    decode step that found its expert still queued would stall (with no memory limit that made
    decode slower than under a limit whose slower prefill hid the same reads)."""
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    want = edgemoe.load(dst, preload="none").generate([1, 5, 9], max_new_tokens=8)
    for preload in ("auto", "warm", "all"):  # no budget: each queues every expert
        m = edgemoe.load(dst, preload=preload)
        _, lengths, _, _ = blob_tables(m.manifest)
        tokens, after_first = [], None
        for step in m.stream([1, 5, 9], max_new_tokens=8):
            if step.token is not None:
                tokens.append(step.token)
            if after_first is None:  # nothing may be queued or in flight once the first token is out
                after_first = m.cache.stats()
                assert all(m.cache.contains(int(layer), int(e)) for layer, e in zip(*np.nonzero(lengths))), preload
        assert tokens == want, preload
        s = m.cache.stats()
        assert s["loads"] == after_first["loads"] == np.count_nonzero(lengths), preload
        assert s["misses"] == after_first["misses"], preload  # decode found every expert resident


def test_a_warm_start_without_a_budget_reads_every_expert(tiny_checkpoint, tmp_path):
    """Unbounded, a warm start is bounded by memory, not by a budget of 0: with room for all,
    it reads every expert, most used first, as a run under a budget that holds them all does
    (it used to read none, so a run with no memory limit missed where a limited one hit)."""
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    _, lengths, _, _ = blob_tables(edgemoe.load(dst, preload="none").manifest)
    everything = int(page_bytes(lengths).sum())
    for budget in (None, everything):
        m = edgemoe.load(dst, memory_budget=budget, preload="warm")
        assert m.preloading == "warm"
        m.cache.wait_idle()
        s = m.cache.stats()
        assert s["prefetch_issued"] == s["loads"] == np.count_nonzero(lengths), budget
        assert all(m.cache.contains(int(layer), int(e)) for layer, e in zip(*np.nonzero(lengths)))


def test_warm_start_fills_the_budget_with_the_most_used_experts(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    want = edgemoe.load(dst, preload="none").generate([1, 5, 9], max_new_tokens=8)
    _, lengths, _, _ = blob_tables(edgemoe.load(dst, preload="none").manifest)
    sizes = page_bytes(lengths)
    budget = int(sizes.sum()) // 2

    cold = edgemoe.load(dst, memory_budget=budget, preload="none")
    assert not cold.preloading and cold.cache.stats()["prefetch_issued"] == 0

    # no routing profile: the same number of each layer's experts, round the layers
    m = edgemoe.load(dst, memory_budget=budget)  # default under a budget: a warm start
    assert m.preloading == "warm" and m.stats()["preload"] == "warm"
    m.cache.wait_idle()
    order = warm_start_order(lengths)
    fits = int(np.searchsorted(np.cumsum([sizes[k] for k in order]), budget, side="right"))
    assert 0 < fits < len(order)
    resident = {k for k in order if m.cache.contains(*k)}
    assert resident == set(order[:fits])
    assert m.cache.resident_bytes <= budget
    assert m.generate([1, 5, 9], max_new_tokens=8) == want  # a warm start changes what is read, not tokens

    # with one: the calibration text's most used experts of each layer
    text = tmp_path / "calib.txt"
    text.write_text("\n\x1e\n".join(["The cache reads experts from flash while the layers compute."] * 8))
    usage = np.asarray(profile_model(dst, text, window=32, max_tokens=300)["usage"])
    assert usage.shape == lengths.shape
    warm = edgemoe.load(dst, memory_budget=budget)
    warm.cache.wait_idle()
    picked = warm_start_order(lengths, usage)[:fits]
    assert all(warm.cache.contains(*k) for k in picked)
    share = usage / usage.sum(axis=1, keepdims=True)
    least_picked = min(share[k] for k in picked)
    assert all(share[k] <= least_picked for k in warm_start_order(lengths, usage)[fits:])


def test_warm_start_order():
    lengths = np.ones((2, 3), np.uint64)
    assert warm_start_order(lengths) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    usage = np.array([[1, 8, 1], [30, 30, 40]])  # by share of the layer's uses, not raw counts
    assert warm_start_order(lengths, usage)[:3] == [(0, 1), (1, 2), (1, 0)]
    lengths[0, 1] = 0  # no such expert: never queued
    assert (0, 1) not in warm_start_order(lengths, usage)


def test_preload_names_its_choices(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    for bad in ("some", 0, 1, True, None):
        with pytest.raises(ValueError, match="preload must be one of 'auto', 'all', 'warm', 'none'"):
            edgemoe.load(dst, preload=bad)
    assert edgemoe.load(dst, memory_budget=edgemoe.load(dst, preload="none").min_budget, io_threads=0).preloading == ""


def test_a_damaged_profile_costs_the_warm_start_its_order_and_says_so(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    want = edgemoe.load(dst, preload="none").generate([1, 5, 9], max_new_tokens=6)
    _, lengths, _, _ = blob_tables(edgemoe.load(dst, preload="none").manifest)
    budget = int(page_bytes(lengths).sum()) // 2
    for text in ('{"format": "edgemoe-routing", "usage": [[1, 2]]}', "{not json"):
        (dst / "routing.json").write_text(text)
        with pytest.warns(UserWarning, match=r"warm start ignores .*routing.json.*edgemoe profile"):
            m = edgemoe.load(dst, memory_budget=budget)
        assert m.preloading == "warm"
        m.cache.wait_idle()
        fits = sum(1 for k in warm_start_order(lengths) if m.cache.contains(*k))
        assert fits > 0 and all(m.cache.contains(*k) for k in warm_start_order(lengths)[:fits])
        assert m.generate([1, 5, 9], max_new_tokens=6) == want
