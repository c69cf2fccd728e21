"""The cache policy simulator: known answers on a hand-made trace, Belady never worse than
the online policies and equal to a brute-force optimum, prefetch accounting."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from edgemoe.planning import routing, simulate
from edgemoe.runtime import prefetch, trace


def trace_of(ex) -> trace.RoutingTrace:
    ex = np.asarray(ex, np.int16)
    return trace.RoutingTrace(ex, np.ones(ex.shape, np.float32), list(range(ex.shape[1])), int(ex.max()) + 1)


def random_trace(T, M, E, k, seed, skew=1.0) -> trace.RoutingTrace:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, skew), size=M)  # a skewed usage per layer
    ex = np.stack([np.stack([rng.choice(E, k, replace=False, p=p[m]) for m in range(M)]) for _ in range(T)])
    tr = trace_of(ex)
    tr.num_experts = E
    return tr


def brute_force_misses(trace: trace.RoutingTrace, capacity: int) -> int:
    """Fewest misses any demand-paging cache of `capacity` equal-size experts can achieve."""
    T, M, k = trace.experts.shape
    groups = [frozenset((m, int(e)) for e in trace.experts[t, m]) for t in range(T) for m in range(M)]

    @functools.cache
    def best(i: int, state: frozenset) -> int:
        if i == len(groups):
            return 0
        g = groups[i]
        missing = g - state
        over = len(state) + len(missing) - capacity
        if over <= 0:
            return len(missing) + best(i + 1, state | g)
        return len(missing) + min(
            best(i + 1, (state - frozenset(out)) | g) for out in itertools.combinations(sorted(state - g), over)
        )

    return best(0, frozenset())


def test_hand_made_trace():
    tr = trace_of([[[0]], [[1]], [[0]], [[2]], [[1]]])  # one layer, top-1, room for two
    sizes = np.full((1, 3), 4096)
    hits = {p: simulate.simulate(tr, sizes, 2 * 4096, p)["hits"] for p in simulate.POLICIES}
    assert hits == {"lru": 1, "lfu": 1, "structure": 1, "belady": 2}
    r = simulate.simulate(tr, sizes, 2 * 4096, "lru")
    assert r["misses"] == 4 and r["bytes_read"] == r["demand_bytes"] == 4 * 4096 and r["evictions"] == 2


def test_belady_is_never_worse_than_online_policies():
    for seed in range(6):
        tr = random_trace(120, 3, 6, 2, seed, skew=0.5)
        sizes = np.full((3, 6), 8192)
        for frac in (0.25, 0.5, 0.75):
            budget = max(frac * sizes.sum(), simulate.min_budget(sizes, 2))
            misses = {p: simulate.simulate(tr, sizes, budget, p)["misses"] for p in simulate.POLICIES}
            assert misses["belady"] <= min(misses.values()), (seed, frac, misses)


@pytest.mark.parametrize("k,capacity,seed", [(1, 2, 0), (1, 3, 1), (2, 3, 2), (2, 4, 3), (2, 5, 4)])
def test_belady_equals_the_brute_force_optimum(k, capacity, seed):
    tr = random_trace(7, 2, 3, k, seed, skew=0.7)
    sizes = np.full((2, 3), 4096)
    assert simulate.simulate(tr, sizes, capacity * 4096, "belady")["misses"] == brute_force_misses(tr, capacity)


def test_unequal_sizes_count_bytes():
    tr = random_trace(200, 3, 8, 2, 7)
    sizes = np.random.default_rng(0).choice([4096, 8192, 12288], size=(3, 8))
    for p in simulate.POLICIES:
        r = simulate.simulate(tr, sizes, 0.4 * sizes.sum(), p)
        assert r["hits"] + r["misses"] == r["accesses"] == 200 * 3 * 2
        assert 0 < r["demand_bytes"] <= r["misses"] * sizes.max()
    with pytest.raises(ValueError, match="cannot hold one layer"):
        simulate.simulate(tr, sizes, 4096, "lru")


def test_a_perfect_predictor_removes_every_wait_after_the_first_layer():
    T, M, E, k = 150, 4, 8, 2
    tr = random_trace(T, M, E, k, 3)
    probs = np.zeros((T, M, E), np.float32)  # row m: layer m+1's actual experts
    for n in range(1, M):
        np.put_along_axis(probs[:, n - 1], tr.experts[:, n].astype(np.int64), 1.0 / k, axis=1)
    sizes = np.full((M, E), 4096)
    base = simulate.simulate(tr, sizes, 8 * 4096, "lru")
    r = simulate.simulate(tr, sizes, 8 * 4096, "lru", prefetch=probs, ratio=1.0)
    assert r["misses"] <= T * k < base["misses"]  # only layer 0 can miss
    assert r["wasted_prefetch_bytes"] == 0 and r["prefetch_hits"] == r["prefetch_reads"]
    assert r["bytes_read"] == r["demand_bytes"] + r["prefetch_bytes"]


def test_run_table_over_budgets_and_predictors():
    fit, held = random_trace(300, 3, 8, 2, 1, skew=0.3), random_trace(100, 3, 8, 2, 2, skew=0.3)
    table = routing.fit_table(fit)
    sizes = np.full((3, 8), 4096)
    rows = simulate.run(held, sizes, predictors={"none": None, "table": prefetch.TablePredictor(table)})
    assert len(rows) == 3 * 2 * len(simulate.POLICIES)
    assert {r["prefetch"] for r in rows} == {"none", "table"}
    assert all(r["prefetch_bytes"] == 0 for r in rows if r["prefetch"] == "none")
    assert "belady" in simulate.format_rows(rows, sizes.sum(), held.tokens)
