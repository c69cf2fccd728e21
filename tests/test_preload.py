"""Preloading at load: when the budget holds every expert, the I/O threads read them all
behind the first tokens' demand reads; the tokens are those of a run without it."""
from __future__ import annotations

import numpy as np

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.manifest import blob_tables


def test_preload_reads_every_expert_and_changes_no_token(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    want = edgemoe.load(dst, preload=False).generate([1, 5, 9], max_new_tokens=8)
    lazy = edgemoe.load(dst, preload=False)
    assert not lazy.preloading and lazy.cache.stats()["loads"] == 0  # nothing read before it is needed

    m = edgemoe.load(dst)  # unbounded: preloads by default
    assert m.preloading
    assert m.generate([1, 5, 9], max_new_tokens=8) == want
    m.cache.wait_idle()
    _, lengths, _, _ = blob_tables(m.manifest)
    assert all(m.cache.contains(int(layer), int(e)) for layer, e in zip(*np.nonzero(lengths)))
    s = m.cache.stats()
    assert s["prefetch_issued"] > 0 and s["loads"] == np.count_nonzero(lengths)  # each expert read once


def test_no_preload_when_the_budget_is_smaller_than_the_experts(tiny_checkpoint, tmp_path):
    dst = tmp_path / "m"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    m = edgemoe.load(dst, memory_budget=edgemoe.load(dst, preload=False).min_budget)
    assert not m.preloading and m.cache.stats()["prefetch_issued"] == 0
