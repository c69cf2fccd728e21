"""Replay a routing trace through a byte-budget expert cache, offline, under several
eviction policies and optionally with predictive prefetch: how far each policy is
from the best possible (Belady's oracle).

    trace = routing.RoutingTrace.load("eval.npz")          # or routing.collect_trace(...)
    sizes = routing.expert_sizes(model)                     # [M, E] bytes per expert
    r = simulate(trace, sizes, budget=0.5 * sizes.sum(), policy="lru")
    r["hit_rate"], r["bytes_read"]

The access stream is decode order: token by token, MoE layer by MoE layer; each
step needs its k experts resident together (pinned while they compute). A miss
reads the expert (the compute waits); a hit reads nothing.

Policies (the victim is the unpinned resident expert with the lowest score):
- lru: time of last use (a prefetch counts as a use).
- lfu: number of demand uses since the start of the trace (kept across evictions),
  ties broken by LRU.
- structure: structure-aware (as EdgeMoE's), activation frequency and distance from the current layer:
  f / (d + 1), f = the expert's recent activation rate (uses per token, exponentially
  decayed by `decay` per token, so it follows the text), d = MoE layers that run
  before the expert's layer runs again (0 for the next layer; the layer just
  computed is the farthest). Ties by LRU. An all-time count in place of f does
  worse than LRU on learned routing: consecutive tokens reuse experts.
- belady: evict the expert whose next use is farthest in the future (never used
  again first). Optimal for equal sizes; with unequal sizes (mixed bitwidths) it is
  a heuristic, the exact optimum being NP-hard. With prefetch the oracle also
  declines a prefetch whose next use is later than its victim's.

With a predictor, when layer l routes the cache also reads layer l+1's likeliest
experts within ratio x the layer's mean bytes per token (prefetched entries take
budget and can evict); they count as bytes read, as hits when used, and as wasted
bytes when evicted unused. Timing is not modelled: a prefetch is assumed to land
before it is needed, so demand_bytes (reads the compute waits for) is the figure
that prefetch improves.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core
from ..runtime.prefetch import DEFAULT_RATIO, Predictor, layer_byte_cap
from ..runtime.trace import RoutingTrace

POLICIES = ("lru", "lfu", "structure", "belady")
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_PREDICTORS = ("none", "table", "lookahead_moe_in", "lookahead_layer_out", "fitted_moe_in", "fitted_layer_out")
NEVER = np.iinfo(np.int64).max // 4
EVICTION_DECAY = _core.EVICTION_DECAY  # per token: the structure policy's activation rate decays by this (the cache's)


def min_budget(sizes: np.ndarray, top_k: int) -> int:
    """Smallest budget that holds one layer's k largest experts at once."""
    return int(np.sort(sizes, axis=1)[:, ::-1][:, :top_k].sum(axis=1).max())


def _next_uses(ex: np.ndarray, M: int, E: int) -> tuple[np.ndarray, list[list[int]]]:
    """For each step s = t*M + m and slot, the next step that uses the same expert
    (NEVER if none); and, per key m*E + e, the sorted steps that use it."""
    T, _, k = ex.shape
    steps = T * M
    flat = ex.reshape(steps, k).astype(np.int64) + (np.arange(steps) % M)[:, None] * E  # keys
    nxt = np.full((steps, k), NEVER, np.int64)
    last = np.full(M * E, NEVER, np.int64)
    for s in range(steps - 1, -1, -1):
        row = flat[s]
        nxt[s] = last[row]
        last[row] = s
    uses: list[list[int]] = [[] for _ in range(M * E)]
    for s in range(steps):
        for key in flat[s]:
            uses[key].append(s)
    return nxt, uses


def simulate(
    trace: RoutingTrace,
    sizes: np.ndarray,
    budget: float,
    policy: str = "lru",
    prefetch: Predictor | np.ndarray | None = None,
    ratio: float = DEFAULT_RATIO,
    min_prob: float = 0.0,
    decay: float = EVICTION_DECAY,
    _next: tuple[np.ndarray, list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Replay `trace` through a cache of `budget` bytes. sizes [M, E]: bytes per expert.
    prefetch: a predictor (its trace_probs), or slot probabilities [T, M, E] whose row m
    guesses layer m+1, or None. Returns counts, hit rate and bytes read."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    ex = trace.experts
    T, M, k = ex.shape
    E = trace.num_experts
    budget = float(budget)
    if budget < min_budget(sizes, k):
        raise ValueError(
            f"a budget of {budget:.0f} bytes cannot hold one layer's {k} largest experts ({min_budget(sizes, k)} bytes)"
        )
    size = sizes.reshape(-1).astype(np.float64)  # by key m*E + e
    layer_of = np.repeat(np.arange(M), E)
    # d + 1 for an expert of layer m' while layer m computes, [M, M*E]
    dist1 = ((layer_of[None, :] - np.arange(M)[:, None] - 1) % M + 1).astype(np.float64)

    probs = None
    if isinstance(prefetch, Predictor):
        probs = np.zeros((T, M, E), np.float32)
        for n in range(1, M):
            probs[:, n - 1] = prefetch.trace_probs(trace, n)
    elif prefetch is not None:
        probs = np.asarray(prefetch)
    caps = layer_byte_cap(sizes, k, ratio)
    if probs is not None:  # what each step prefetches for the next layer: order[t, m, :count[t, m]]
        order = np.argsort(-probs, axis=2, kind="stable").astype(np.int64)
        q = np.minimum(1.0, k * np.take_along_axis(probs, order, axis=2))
        nsz = np.concatenate([sizes[1:], sizes[:1]]).astype(np.float64)  # row m: layer m+1's sizes
        sz = np.take_along_axis(np.broadcast_to(nsz[None], probs.shape), order, axis=2)
        keep = q >= min_prob
        fits = np.cumsum(np.where(keep, sz, 0.0), axis=2) <= np.concatenate([caps[1:], caps[:1]])[None, :, None]
        # choose(): the longest prefix of the kept guesses that fits
        order = np.where(keep & fits, order, -1)
        order = np.take_along_axis(order, np.argsort(order < 0, axis=2, kind="stable"), axis=2)
        count = (order >= 0).sum(axis=2)
    groups = ex.astype(np.int64) + (np.arange(M) * E)[None, :, None]  # keys [T, M, k]
    if (np.diff(np.sort(groups, axis=2), axis=2) == 0).any():
        raise ValueError("a token lists one expert twice in a layer: not a top-k routing trace")
    nxt = uses = None
    if policy == "belady":
        nxt, uses = _next if _next is not None else _next_uses(ex, M, E)

    resident = np.zeros(M * E, bool)
    last = np.zeros(M * E, np.float64)
    freq = np.zeros(M * E, np.float64)
    rate = np.zeros(M * E, np.float64)  # decayed uses per token, as of token rate_t
    rate_t = np.zeros(M * E, np.float64)
    tok = 0
    next_use = np.full(M * E, NEVER, np.int64)
    prefetched = np.zeros(M * E, bool)
    used = 0.0
    c: dict[str, Any] = {
        "accesses": 0,
        "hits": 0,
        "misses": 0,
        "demand_bytes": 0.0,
        "prefetch_bytes": 0.0,
        "prefetch_reads": 0,
        "prefetch_hits": 0,
        "wasted_prefetch_bytes": 0.0,
        "evictions": 0,
    }

    def victim(m: int, pinned: np.ndarray) -> int:
        cand = resident & ~pinned
        if not cand.any():
            return -1
        if policy == "lru":
            primary = last
        elif policy == "lfu":
            primary = freq
        elif policy == "structure":
            primary = rate * decay ** (tok - rate_t) / dist1[m]
        else:
            primary = -next_use.astype(np.float64)
        p = np.where(cand, primary, np.inf)
        ties = p == p.min()
        return int(np.where(ties, last, np.inf).argmin())

    def evict(key: int) -> None:
        nonlocal used
        resident[key] = False
        used -= size[key]
        c["evictions"] += 1
        if prefetched[key]:
            c["wasted_prefetch_bytes"] += size[key]
            prefetched[key] = False

    def make_room(need: float, m: int, pinned: np.ndarray, limit: int | None = None) -> bool:
        """Evict until `need` bytes fit. limit: an oracle refuses victims used before this step."""
        while used + need > budget:
            v = victim(m, pinned)
            if v < 0 or (limit is not None and next_use[v] <= limit):
                return False
            evict(v)
        return True

    step = 0
    for t in range(T):
        tok = t
        for m in range(M):
            group = groups[t, m]
            pinned = np.zeros(M * E, bool)
            pinned[group] = True
            for _j, key in enumerate(group):
                c["accesses"] += 1
                if resident[key]:
                    c["hits"] += 1
                    if prefetched[key]:
                        c["prefetch_hits"] += 1
                        prefetched[key] = False
                else:
                    c["misses"] += 1
                    if not make_room(size[key], m, pinned):
                        raise RuntimeError("every resident expert is pinned: the budget is below one layer's needs")
                    resident[key] = True
                    used += size[key]
                    c["demand_bytes"] += size[key]
                last[key] = step
                freq[key] += 1
                rate[key] = rate[key] * decay ** (t - rate_t[key]) + (1.0 - decay)
                rate_t[key] = t
            if nxt is not None:
                next_use[group] = nxt[step]
            if probs is not None and m + 1 < M:
                n = m + 1
                for e in order[t, m, : count[t, m]]:
                    key = n * E + int(e)
                    pinned[key] = True  # a prefetch never evicts this round's other prefetches
                    if resident[key]:
                        last[key] = step
                        continue
                    limit = None
                    if policy == "belady":
                        assert uses is not None  # made above for belady
                        u = uses[key]
                        i = bisect.bisect_right(u, step)
                        next_use[key] = u[i] if i < len(u) else NEVER
                        if next_use[key] == NEVER:
                            continue
                        limit = int(next_use[key])
                    if not make_room(size[key], m, pinned, limit):
                        continue
                    resident[key] = True
                    prefetched[key] = True
                    used += size[key]
                    last[key] = step
                    c["prefetch_bytes"] += size[key]
                    c["prefetch_reads"] += 1
            step += 1
    c["wasted_prefetch_bytes"] += float(size[prefetched].sum())  # still unused at the end
    c["hit_rate"] = c["hits"] / max(1, c["accesses"])
    c["bytes_read"] = c["demand_bytes"] + c["prefetch_bytes"]
    c["policy"], c["budget"] = policy, budget
    return c


def run(
    trace: RoutingTrace,
    sizes: np.ndarray,
    fractions: Sequence[float] = BUDGET_FRACTIONS,
    policies: Sequence[str] = POLICIES,
    predictors: dict[str, Predictor | None] | None = None,
    ratio: float = DEFAULT_RATIO,
) -> list[dict[str, Any]]:
    """Every policy x budget (fractions of all expert bytes) x predictor ("none" = no prefetch)."""
    predictors = predictors or {"none": None}
    T, M, k = trace.experts.shape
    total = float(sizes.sum())
    nu = _next_uses(trace.experts, M, trace.num_experts) if "belady" in policies else None
    probs = {}
    for name, p in predictors.items():
        if p is not None:
            a = np.zeros((T, M, trace.num_experts), np.float32)
            for n in range(1, M):
                a[:, n - 1] = p.trace_probs(trace, n)
            probs[name] = a
    rows = []
    for f in fractions:
        budget = max(f * total, min_budget(sizes, k))
        for name in predictors:
            for pol in policies:
                r = simulate(trace, sizes, budget, pol, probs.get(name), ratio=ratio, _next=nu)
                r.update({"fraction": f, "prefetch": name})
                rows.append(r)
    return rows


def format_rows(rows: list[dict[str, Any]], total_bytes: float, tokens: int) -> str:
    lines = [
        f"{'budget':>6} {'prefetch':<20} {'policy':<8} {'hit rate':>8} {'read/token':>11} "
        f"{'waited/token':>12} {'wasted/token':>12}"
    ]
    for r in rows:
        lines.append(
            f"{100 * r['fraction']:5.0f}% {r['prefetch']:<20} {r['policy']:<8} {100 * r['hit_rate']:7.1f}% "
            f"{r['bytes_read'] / tokens / 1e3:9.1f}KB {r['demand_bytes'] / tokens / 1e3:10.1f}KB "
            f"{r['wasted_prefetch_bytes'] / tokens / 1e3:10.1f}KB"
        )
    return "\n".join(lines)
