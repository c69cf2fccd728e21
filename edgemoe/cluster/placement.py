"""Which experts live in which device's RAM, and which stream from the coordinator's flash.

The coordinator runs the backbone. At each MoE layer it sends the token's hidden state to
the devices holding the token's experts, computes the experts it holds itself (its cache)
and reads the rest from flash, and waits for the slowest (docs/cluster.md):

    layer time(S) = max( coordinator: max(hits' compute, misses' reads) + misses' compute,
                         devices: max over the devices d serving S of
                                      payload_d / link_d + rtt_d + their experts' bytes / compute_d
                                  + the payloads' queueing on the coordinator's own link )
    expected seconds per token = sum over MoE layers of E_S[ layer time(S) ]

S is the token's set of top-k experts at that layer, drawn from the routing statistics
(RoutingStats, layer_sets). A device's payload is the hidden state out and one output back
per expert it computes. Every payload also crosses the coordinator's link: where the devices
share one medium with it (Wi-Fi: CoordinatorSpec.link_bits_per_s None) each extra device a
token visits adds its payload time, which is what keeping co-used experts on one device
saves; where the coordinator's link is faster than the devices' (a switch), spreading a
token's experts over devices computes them in parallel for little. expected_token_seconds
is the cost model, plan_placement the optimiser.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import DeviceProfile, LinkProfile
from ..errors import PlacementError
from ..format.manifest import blob_tables, load_manifest, page_bytes
from ..format.routing_file import ROUTING_FILE, load_routing
from ..runtime.prefetch import table_from_routing
from ..units import format_bytes

PLAN_FORMAT = "edgemoe-placement"
PLAN_VERSION = 1
ACTIVATION_BYTES = 4  # the hidden state travels as float32: out to a device, each expert's output back
EXACT_SETS = 4096  # enumerate every top-k set when a layer has at most this many, else sample
SAMPLES = 1024
SMALL_SEARCH = 4096  # holders x experts up to which the search also exchanges, makes room, ruins and recreates


# -- what the planner is given ----------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """A device as the planner sees it: RAM for experts, expert compute, and its link."""

    name: str
    expert_bytes: int  # RAM given to edgemoe for expert weights
    compute_bytes_per_s: float  # expert weight bytes per second its kernel streams through
    rtt_s: float
    link_bits_per_s: float

    @classmethod
    def from_profile(
        cls,
        profile: DeviceProfile,
        name: str | None = None,
        reserve_bytes: int = 1 << 30,
        link: LinkProfile | None = None,
    ) -> DeviceSpec:
        """Experts get the profile's RAM minus `reserve_bytes` (OS, worker, activations);
        the link is the profile's unless one is given."""
        ln = link or profile.link
        if ln is None:
            raise PlacementError(f"device profile {profile.name} has no link: name one (--link)")
        return cls(
            name or profile.name,
            int(profile.ram_bytes) - int(reserve_bytes),
            float(profile.int4_bytes_per_s),
            ln.rtt_s,
            ln.bits_per_s,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CoordinatorSpec:
    """The coordinator: its expert cache (held experts plus room to stream), its flash and
    compute, and its own link: the rate every device's payloads share (measured with all
    devices sending at once), or None where the devices share one medium with it (Wi-Fi), so
    each payload takes that link for as long as it takes its device's."""

    cache_bytes: int
    flash_bytes_per_s: float
    flash_latency_s: float
    compute_bytes_per_s: float
    link_bits_per_s: float | None = None

    @classmethod
    def from_profile(cls, profile: DeviceProfile, cache_bytes: int) -> CoordinatorSpec:
        return cls(
            int(cache_bytes), float(profile.read_bytes_per_s), profile.read_latency_s, float(profile.int4_bytes_per_s)
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RoutingStats:
    """Routing statistics per MoE layer: usage[M, E] (tokens routed to each expert) and,
    when known, first_order[M, E, E] (first_order[n, i, j]: tokens with expert i at layer
    n-1 and j at n, the transition table's first-order counts)."""

    usage: np.ndarray
    top_k: int
    hidden_size: int
    first_order: np.ndarray | None = None

    def contexts(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(w [C], pi [C, E]): layer m's experts are used with inclusion probabilities pi[c]
        in context c, which occurs with probability w[c]. The contexts are the expert a token
        used at layer m-1: pi[c, j] = first_order[m, c, j] / usage[m-1, c], which keeps the
        marginals (sum_c w_c pi[c] = usage share) and makes experts that follow the same
        predecessors co-occur. Without a table (or at layer 0): one context, independence."""
        u = np.asarray(self.usage[m], np.float64)
        k, E = self.top_k, u.size
        total = u.sum()
        marginal = np.full(E, k / E) if total <= 0 else np.minimum(1.0, k * u / total)
        c1 = self.first_order
        if c1 is None or m == 0 or c1[m].sum() <= 0:
            return np.ones(1), marginal[None, :]
        prev = np.asarray(self.usage[m - 1], np.float64)
        keep = prev > 0
        w = prev[keep] / prev[keep].sum()
        pi = np.minimum(1.0, np.asarray(c1[m], np.float64)[keep] / prev[keep, None])
        return w, pi


# -- the routing model: exactly top_k distinct experts per token and layer ----------------------
def _esp_suffix(r: np.ndarray, k: int) -> np.ndarray:
    """suffix[c, i, j] = e_j(r[c, i:]), the elementary symmetric polynomials of each row's tail."""
    C, E = r.shape
    s = np.zeros((C, E + 1, k + 1))
    s[:, E, 0] = 1.0
    for i in range(E - 1, -1, -1):
        s[:, i] = s[:, i + 1]
        s[:, i, 1:] += r[:, i, None] * s[:, i + 1, :-1]
    return s


def _inclusion(r: np.ndarray, k: int) -> np.ndarray:
    """P(e in S) for each row of r [C, E] when P(S) is proportional to prod_{e in S} r_e over
    the k-sets (a conditional Poisson design): r_e e_{k-1}(r without e) / e_k(r)."""
    C, E = r.shape
    pre = np.zeros((C, E + 1, k + 1))  # pre[c, i, j] = e_j(r[c, :i])
    pre[:, 0, 0] = 1.0
    for i in range(E):
        pre[:, i + 1] = pre[:, i]
        pre[:, i + 1, 1:] += r[:, i, None] * pre[:, i, :-1]
    suf = _esp_suffix(r, k)
    without = (pre[:, :E, :k] * suf[:, 1:, k - 1 :: -1]).sum(2)  # sum over a of e_a(head) e_{k-1-a}(tail)
    return r * without / suf[:, :1, k]


def set_weights(pi: np.ndarray, k: int, iterations: int = 100, tol: float = 1e-9) -> np.ndarray:
    """Weights r [C, E] such that drawing k distinct experts with P(S) proportional to
    prod_{e in S} r_e gives inclusion probabilities pi [C, E] (the maximum-entropy design of
    fixed size k), found by proportional fitting."""
    pi = np.clip(np.atleast_2d(np.asarray(pi, np.float64)), 0.0, 1.0)
    short = np.count_nonzero(pi, axis=1) < k
    if short.any():
        raise PlacementError(f"routing statistics route to fewer than top_k={k} experts: profile the model again")
    pi = np.clip(pi * (k / pi.sum(1, keepdims=True)), 0.0, 1.0 - 1e-9)
    r = np.where(pi > 0, pi / (1.0 - pi), 0.0)
    for _ in range(iterations):
        inc = _inclusion(r, k)
        if np.max(np.abs(inc - pi)) < tol:
            break
        r = np.where(inc > 0, r * pi / np.maximum(inc, 1e-300), 0.0)
        r /= np.exp(np.log(np.where(r > 0, r, 1.0)).sum(1, keepdims=True) / np.count_nonzero(r, axis=1)[:, None])
    return r


@dataclass
class LayerSets:
    """A layer's routing as weighted expert sets: used[N, E] (bool), p[N] (sums to 1), and
    the same sets as expert ids idx[N, k] (ascending)."""

    used: np.ndarray
    p: np.ndarray
    exact: bool
    idx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    def __post_init__(self) -> None:
        if self.idx.shape[0] != len(self.used):
            self.idx = np.nonzero(self.used)[1].reshape(len(self.used), -1)

    def subset(self, rows: np.ndarray) -> LayerSets:
        return LayerSets(self.used[rows], self.p[rows], False, self.idx[rows])


def layer_sets(stats: RoutingStats, m: int, samples: int = SAMPLES, seed: int = 0) -> LayerSets:
    """The token's top-k set at MoE layer m: every k-set with its probability when there are
    at most EXACT_SETS of them, else `samples` draws (fixed seed)."""
    w, pi = stats.contexts(m)
    k, E = stats.top_k, pi.shape[1]
    rs = set_weights(pi, k)  # [C, E]
    suf = _esp_suffix(rs, k)
    if math.comb(E, k) <= EXACT_SETS:
        combos = np.array(list(itertools.combinations(range(E), k)), np.int64).reshape(-1, k)
        prob = (w[:, None] * np.prod(rs[:, combos], axis=2) / suf[:, 0, k, None]).sum(0)
        used = np.zeros((len(combos), E), bool)
        used[np.arange(len(combos))[:, None], combos] = True
        keep = prob > 0
        return LayerSets(used[keep], prob[keep] / prob[keep].sum(), True)
    rng = np.random.default_rng(seed + 7919 * m)
    ctx = rng.choice(len(w), size=samples, p=w)
    used = np.zeros((samples, E), bool)
    for c in np.unique(ctx):  # walk the experts in order, each taken with its conditional probability
        rows = np.flatnonzero(ctx == c)
        need = np.full(rows.size, k)
        for i in range(E):
            denom = suf[c, i, need]
            prob = np.where((need > 0) & (denom > 0), rs[c, i] * suf[c, i + 1, np.maximum(need - 1, 0)], 0.0)
            take = rng.random(rows.size) * np.where(denom > 0, denom, 1.0) < prob
            used[rows[take], i] = True
            need -= take
    return LayerSets(used, np.full(samples, 1.0 / samples), False)


# -- the cost model ------------------------------------------------------------------------------
@dataclass
class _Costs:
    """Per-expert and per-device constants of one planning problem."""

    sizes: np.ndarray  # [M, E] bytes
    rtt: np.ndarray  # [D] seconds
    vector: np.ndarray  # [D] seconds one hidden state takes over the device's link
    shared: np.ndarray  # [D] seconds it takes over the coordinator's link, which all payloads share
    device_rate: np.ndarray  # [D] bytes/s
    coord: CoordinatorSpec

    @classmethod
    def of(cls, devices: Sequence[DeviceSpec], coord: CoordinatorSpec, sizes: np.ndarray, hidden: int) -> _Costs:
        bits = hidden * ACTIVATION_BYTES * 8
        rtt = np.array([d.rtt_s for d in devices], np.float64)
        vector = np.array([bits / d.link_bits_per_s for d in devices], np.float64)
        shared = vector if coord.link_bits_per_s is None else np.full(len(devices), bits / coord.link_bits_per_s)
        rate = np.array([d.compute_bytes_per_s for d in devices], np.float64)
        return cls(np.asarray(sizes, np.float64), rtt, vector, shared, rate, coord)

    def alone(self, e_bytes: float) -> np.ndarray:
        """[D] seconds each device takes for one expert of e_bytes on its own: the replica order."""
        return self.rtt + 2 * self.vector + e_bytes / self.device_rate


def _serve(c: _Costs, m: int, sets: LayerSets, held: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch every set of a layer as the runtime would (dispatch()) and time it.

    held [D, E], local [E] -> (time [N], choice [N, k]: who serves each of the set's experts,
    a device index, D for the coordinator's RAM, D + 1 for its flash)."""
    idx = sets.idx  # [N, k]
    sz = c.sizes[m]
    D = held.shape[0]
    nheld = held.sum(0)
    remote = (nheld > 0) & ~local
    streamed = ~local & ~remote
    single = np.argmax(held, 0) if D else np.zeros(len(local), np.int64)
    by_expert = np.where(local, D, np.where(streamed, D + 1, np.where(nheld == 1, single, -1)))
    choice = by_expert[idx]
    for e in np.flatnonzero(remote & (nheld > 1)):  # replicas, in expert order
        rows, slots = np.nonzero(idx == e)
        if rows.size == 0:
            continue
        holders = np.flatnonzero(held[:, e])
        holders = holders[np.argsort(c.alone(sz[e])[holders], kind="stable")]
        visited = (choice[rows][:, :, None] == holders[None, None, :]).any(1)  # [R, holders]
        choice[rows, slots] = holders[np.where(visited.any(1), visited.argmax(1), 0)]  # visited, else quickest
    szk = sz[idx]
    shared = np.zeros(len(idx))  # the payloads on the coordinator's link, all of them
    shared_max = np.zeros(len(idx))  # the largest, which the slowest device's time already holds
    slowest = np.zeros(len(idx))
    for d in range(D):
        mine = choice == d
        n = mine.sum(1)  # the hidden state out, and one output back per expert
        visited = n > 0
        own = np.where(visited, (1 + n) * c.vector[d] + c.rtt[d] + (szk * mine).sum(1) / c.device_rate[d], 0.0)
        slowest = np.maximum(slowest, own)
        on_shared = np.where(visited, (1 + n) * c.shared[d], 0.0)
        shared += on_shared
        shared_max = np.maximum(shared_max, on_shared)
    t_remote = slowest + shared - shared_max
    k = c.coord
    hit_s = (szk * (choice == D)).sum(1) / k.compute_bytes_per_s
    flash = choice == D + 1
    read_s = ((k.flash_latency_s + szk / k.flash_bytes_per_s) * flash).sum(1)
    miss_s = (szk * flash).sum(1) / k.compute_bytes_per_s
    return np.maximum(np.maximum(hit_s, read_s) + miss_s, t_remote), choice


def _layer_cost(c: _Costs, m: int, sets: LayerSets, held: np.ndarray, local: np.ndarray) -> float:
    return float(sets.p @ _serve(c, m, sets, held, local)[0])


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Where each expert lives. held[d, m, e]: device d holds expert e of MoE layer m in RAM;
    local[m, e]: the coordinator's cache holds it; neither: it streams from the coordinator's
    flash. Expected times and shares are filled in by plan_placement."""

    devices: list[DeviceSpec]
    coordinator: CoordinatorSpec
    sizes: np.ndarray  # [M, E] bytes charged per expert (whole pages)
    held: np.ndarray  # bool [D, M, E]
    local: np.ndarray  # bool [M, E]
    moe_layers: list[int]
    top_k: int
    hidden_size: int
    expected_token_s: float = float("nan")
    alone_token_s: float = float("nan")  # the coordinator alone, its cache planned the same way
    # expected share of routed uses each device serves, and "coordinator RAM" and "flash"
    served: dict[str, float] = field(default_factory=dict)

    def device_bytes(self) -> np.ndarray:
        return (self.held * self.sizes[None]).sum((1, 2)).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        def lists(mask: np.ndarray) -> dict[str, list[int]]:
            return {str(m): np.flatnonzero(row).tolist() for m, row in enumerate(mask) if row.any()}

        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "moe_layers": list(self.moe_layers),
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "sizes": self.sizes.astype(np.int64).tolist(),
            "devices": [d.to_json() for d in self.devices],
            "coordinator": self.coordinator.to_json(),
            "held": {d.name: lists(self.held[i]) for i, d in enumerate(self.devices)},
            "local": lists(self.local),
            "expected_token_s": self.expected_token_s,
            "alone_token_s": self.alone_token_s,
            "served": dict(self.served),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Plan:
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlacementError(f'not a placement plan (no "format": "{PLAN_FORMAT}")')
        if int(doc.get("version", 0)) > PLAN_VERSION:
            raise PlacementError(
                f"placement plan version {doc['version']} is newer than this edgemoe reads ({PLAN_VERSION})"
            )
        sizes = np.asarray(doc["sizes"], np.int64)
        devices = [DeviceSpec(**d) for d in doc["devices"]]
        held = np.zeros((len(devices), *sizes.shape), bool)
        for i, d in enumerate(devices):
            for m, es in doc["held"].get(d.name, {}).items():
                held[i, int(m), es] = True
        local = np.zeros(sizes.shape, bool)
        for m, es in doc["local"].items():
            local[int(m), es] = True
        return cls(
            devices,
            CoordinatorSpec(**doc["coordinator"]),
            sizes,
            held,
            local,
            list(doc["moe_layers"]),
            int(doc["top_k"]),
            int(doc["hidden_size"]),
            float(doc["expected_token_s"]),
            float(doc["alone_token_s"]),
            {str(k): float(v) for k, v in doc.get("served", {}).items()},
        )


class Dispatcher:
    """dispatch() made ready for a plan, for every call of the runtime: who computes each expert
    of a set at MoE layer m. An expert in the coordinator's cache is computed there; one held by
    a single device goes to it; a replicated one goes to a holder the set already visits, else
    to the holder that would finish it soonest (the cost model's rule, _serve). up [D]: the
    devices still serving; a device down serves nothing, so its replicas' other holders take
    its experts and the rest go to the coordinator (its flash)."""

    def __init__(self, plan: Plan, up: Sequence[bool] | None = None):
        D = len(plan.devices)
        self.D = D
        ok = np.ones(D, bool) if up is None else np.asarray(up, bool)
        held = plan.held & ok[:, None, None]
        nheld = held.sum(0)
        first = held.argmax(0) if D else np.zeros(plan.local.shape, np.int64)
        # [M, E]: a device index, D: the coordinator's cache, D + 1: its flash, -1: replicated
        self.by_expert = np.where(plan.local, D, np.where(nheld == 0, D + 1, np.where(nheld == 1, first, -1)))
        c = _Costs.of(plan.devices, plan.coordinator, plan.sizes, plan.hidden_size)
        self.order: dict[tuple[int, int], list[int]] = {}  # replicated (m, e) -> its holders, quickest first
        for m, e in zip(*np.nonzero(self.by_expert == -1)):
            holders = np.flatnonzero(held[:, m, e])
            quick = np.argsort(c.alone(float(plan.sizes[m, e]))[holders], kind="stable")
            self.order[(int(m), int(e))] = holders[quick].tolist()

    def choose(self, m: int, experts: np.ndarray) -> np.ndarray:
        """experts [n] distinct ids -> [n] holders: a device index, D (cache) or D + 1 (flash)."""
        experts = np.asarray(experts, np.int64)
        out = self.by_expert[m, experts].copy()
        if (out < 0).any():
            involved = set(out[(out >= 0) & (out < self.D)].tolist())
            for i in np.argsort(experts, kind="stable"):  # replicas in expert order, as _serve takes them
                if out[i] >= 0:
                    continue
                holders = self.order[(m, int(experts[i]))]
                d = next((h for h in holders if h in involved), holders[0])
                involved.add(d)
                out[i] = d
        return out


def dispatch(plan: Plan, m: int, experts: Sequence[int]) -> dict[str, list[int]]:
    """Who computes a token's experts at MoE layer m: {device name: experts, "local": ...,
    "flash": ...}, by the Dispatcher's rule (the one the runtime follows)."""
    ids = sorted(int(e) for e in experts)
    D = len(plan.devices)
    out: dict[str, list[int]] = {"local": [], "flash": []}
    for e, h in zip(ids, Dispatcher(plan).choose(m, np.array(ids, np.int64)).tolist()):
        key = "local" if h == D else "flash" if h == D + 1 else plan.devices[h].name
        out.setdefault(key, []).append(e)
    return out


def expected_token_seconds(plan: Plan, stats: RoutingStats, samples: int = SAMPLES, seed: int = 0) -> float:
    """Expected seconds the MoE layers add to one decode token under `plan` (the cost model)."""
    c = _Costs.of(plan.devices, plan.coordinator, plan.sizes, stats.hidden_size)
    return sum(
        _layer_cost(c, m, layer_sets(stats, m, samples, seed), plan.held[:, m], plan.local[m])
        for m in range(plan.sizes.shape[0])
    )


def stream_reserve(sizes: np.ndarray, top_k: int) -> int:
    """Cache bytes streaming needs: one layer's top-k largest experts (the runtime's minimum budget)."""
    return int(max((np.sort(row)[::-1][:top_k].sum() for row in np.asarray(sizes, np.int64)), default=0))


def pinnable(cache_bytes: int, sizes: np.ndarray, top_k: int) -> int:
    """Bytes of the coordinator's cache that may hold experts for good: all of it when every
    expert fits, else what is left after the streaming reserve."""
    total = int(np.asarray(sizes, np.int64).sum())
    return int(cache_bytes) if cache_bytes >= total else max(0, int(cache_bytes) - stream_reserve(sizes, top_k))


def _check(devices: Sequence[DeviceSpec], coord: CoordinatorSpec, sizes: np.ndarray, stats: RoutingStats) -> None:
    if sizes.ndim != 2 or sizes.shape != np.shape(stats.usage):
        raise PlacementError(
            f"expert sizes {sizes.shape} and routing usage {np.shape(stats.usage)} differ: "
            f"the routing statistics are of another model, profile it again"
        )
    if (sizes < 0).any():
        raise PlacementError("expert sizes cannot be negative")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise PlacementError(f"device names must differ: {', '.join(names)}")
    smallest = int(sizes[sizes > 0].min()) if (sizes > 0).any() else 0
    for d in devices:
        if d.expert_bytes < 0:
            raise PlacementError(
                f"device {d.name} has {format_bytes(d.expert_bytes)} of RAM for experts: its RAM is "
                f"smaller than what is reserved for the system; give it a smaller reserve or leave it out"
            )
        if 0 < d.expert_bytes < smallest:
            raise PlacementError(
                f"device {d.name} has {format_bytes(d.expert_bytes)} for experts, less than the smallest "
                f"expert ({format_bytes(smallest)}): it can hold none; give it more RAM or leave it out"
            )
        if d.expert_bytes > 0 and not (d.compute_bytes_per_s > 0 and d.link_bits_per_s > 0 and d.rtt_s >= 0):
            raise PlacementError(f"device {d.name} needs compute > 0, link bandwidth > 0 and a round trip >= 0")
    need = stream_reserve(sizes, stats.top_k)
    if coord.cache_bytes < need:
        raise PlacementError(
            f"the coordinator's expert cache ({format_bytes(coord.cache_bytes)}) cannot hold one layer's "
            f"top-{stats.top_k} experts ({format_bytes(need)}), which streaming the experts no device holds "
            f"from flash needs: give it a budget of at least {format_bytes(need)}"
        )
    if not (coord.flash_bytes_per_s > 0 and coord.compute_bytes_per_s > 0 and coord.flash_latency_s >= 0):
        raise PlacementError("the coordinator needs flash bandwidth > 0, compute > 0 and a latency >= 0")


def plan_placement(
    devices: Sequence[DeviceSpec],
    coordinator: CoordinatorSpec,
    sizes: np.ndarray,
    stats: RoutingStats,
    moe_layers: Sequence[int] | None = None,
    samples: int = SAMPLES,
    seed: int = 0,
    search_seconds: float = 5.0,
) -> Plan:
    """Place experts to minimise expected_token_seconds under every device's RAM and the
    coordinator's cache (less the streaming reserve).

    Greedy: repeatedly take the placement (expert, holder) with the largest drop in expected
    time per byte; a holder may be a device or the coordinator's cache, and an expert may get
    several holders (replicas) while that still helps. Then local search for up to
    `search_seconds`: drop, move or swap a placement when that lowers the expected time.
    Raises PlacementError when the inputs cannot make a plan (names the device or budget)."""
    sizes = np.asarray(sizes, np.int64)
    _check(devices, coordinator, sizes, stats)
    M, E = sizes.shape
    D = len(devices)
    c = _Costs.of(devices, coordinator, sizes, stats.hidden_size)
    sets = [layer_sets(stats, m, samples, seed) for m in range(M)]
    caps = np.array([max(0, d.expert_bytes) for d in devices] + [pinnable(coordinator.cache_bytes, sizes, stats.top_k)])
    state = _optimise(c, sets, sizes, caps, D, search_seconds)
    plan = Plan(
        list(devices),
        coordinator,
        sizes,
        state.held[:D].copy(),
        state.held[D].copy(),
        list(moe_layers or range(M)),
        stats.top_k,
        stats.hidden_size,
    )
    _summarise(plan, c, sets)
    if D:
        alone = _optimise(c, sets, sizes, np.concatenate([np.zeros(D, np.int64), caps[D:]]), D, search_seconds / 4)
        plan.alone_token_s = alone.total()
    else:
        plan.alone_token_s = plan.expected_token_s
    return plan


def _optimise(
    c: _Costs, sets: list[LayerSets], sizes: np.ndarray, caps: np.ndarray, D: int, seconds: float, seed: int = 0
) -> _Search:
    """Greedy by gain per byte, greedy by gain (the knapsack pair: small cheap experts
    first can crowd out one large valuable one) and whole layers first (a set skips the
    round trip only when every expert of it is on the coordinator, so one expert placed
    there may gain nothing where the whole layer gains the most), each improved by local
    search and then by ruin and recreate; the best of the three."""
    best: _Search | None = None
    small = (D + 1) * sizes.size <= SMALL_SEARCH  # the moves that run a greedy per try
    starts = ((True, False), (False, False), (True, True))  # (per byte, whole layers first)
    for per_byte, layers in starts:
        state = _Search(c, sets, sizes, caps, D)
        if layers:
            state.greedy_layers()
        state.greedy(per_byte)
        deadline = time.monotonic() + seconds / len(starts)
        while time.monotonic() < deadline and (
            state.improve(deadline) or (small and (state.improve(deadline, True) or state.make_room(deadline)))
        ):
            state.greedy(per_byte)
        if small:
            state.ruin_and_recreate(deadline, np.random.default_rng(seed))
        if best is None or state.total() < best.total() - 1e-15:
            best = state
    assert best is not None
    return best


class _Search:
    """The optimiser's state: holders 0..D-1 are the devices, D the coordinator's cache.
    A change to expert e only changes the times of the sets that use e, so moves are scored
    on those rows alone (times[m] keeps every set's time under the current placement)."""

    def __init__(self, c: _Costs, sets: list[LayerSets], sizes: np.ndarray, caps: np.ndarray, D: int):
        self.c, self.sets, self.sizes, self.caps, self.D = c, sets, sizes, caps, D
        M, E = sizes.shape
        self.held = np.zeros((D + 1, M, E), bool)
        self.free = caps.astype(np.int64).copy()
        self.times = [self._times(m) for m in range(M)]
        self.cost = [float(s.p @ t) for s, t in zip(sets, self.times)]

    def _times(self, m: int, held: np.ndarray | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        h = self.held[:, m] if held is None else held
        s = self.sets[m] if rows is None else self.sets[m].subset(rows)
        return _serve(self.c, m, s, h[: self.D], h[self.D])[0]

    def _delta(self, m: int, changes: Sequence[tuple[int, int, bool]]) -> float:
        """Change of layer m's expected time if (holder, expert, held) changes were made."""
        trial = self.held[:, m].copy()
        for h, e, on in changes:
            trial[h, e] = on
        s = self.sets[m]
        rows = np.flatnonzero(s.used[:, [e for _, e, _ in changes]].any(1))
        if rows.size == 0:
            return 0.0
        return float(s.p[rows] @ (self._times(m, trial, rows) - self.times[m][rows]))

    def _fits(self, h: int, m: int, e: int, room: int | None = None) -> bool:
        return not self.held[h, m, e] and 0 < self.sizes[m, e] <= (self.free[h] if room is None else room)

    def _apply(self, h: int, m: int, e: int, on: bool) -> None:
        self.held[h, m, e] = on
        self.free[h] += -self.sizes[m, e] if on else self.sizes[m, e]
        self.times[m] = self._times(m)
        self.cost[m] = float(self.sets[m].p @ self.times[m])

    def total(self) -> float:
        return float(sum(self.cost))

    def greedy(
        self, per_byte: bool = True, rng: np.random.Generator | None = None, holders: Sequence[int] | None = None
    ) -> None:
        """Add placements by largest gain (per byte, or absolute) while any gains. The layer
        a placement changes is re-scored at once when small, lazily otherwise. With rng, each
        score is scaled by a random factor in [0.7, 1.3] (ruin and recreate's diversity).
        holders: only place on these (default: all)."""
        H, M, E = self.held.shape
        hs = range(H) if holders is None else sorted(set(holders))
        eager = H * E <= 512
        heap: list[tuple[float, int, int, int, int]] = []
        version = [0] * M

        def score(h: int, m: int, e: int) -> None:
            g = -self._delta(m, [(h, e, True)])
            if g > 1e-15:
                key = (
                    g / (float(self.sizes[m, e]) if per_byte else 1.0) * (1.0 if rng is None else rng.uniform(0.7, 1.3))
                )
                heapq.heappush(heap, (-key, h, m, e, version[m]))

        for m in range(M):
            for h in hs:
                for e in range(E):
                    if self._fits(h, m, e):
                        score(h, m, e)
        while heap:
            _, h, m, e, v = heapq.heappop(heap)
            if not self._fits(h, m, e):
                continue
            if v != version[m]:  # stale: re-score and put back
                score(h, m, e)
                continue
            self._apply(h, m, e, True)
            version[m] += 1
            if eager:
                heap = [x for x in heap if x[2] != m]
                heapq.heapify(heap)
                for h2 in hs:
                    for e2 in range(E):
                        if self._fits(h2, m, e2):
                            score(h2, m, e2)

    def greedy_layers(self) -> None:
        """While a holder has room for every expert of a layer it lacks and taking them all
        gains, take the layer with the largest gain per byte."""
        H, M, E = self.held.shape
        while True:
            best: tuple[float, int, int, list[int]] | None = None
            for h, m in itertools.product(range(H), range(M)):
                missing = [e for e in range(E) if not self.held[h, m, e] and self.sizes[m, e] > 0]
                need = int(self.sizes[m, missing].sum()) if missing else 0
                if not missing or need > self.free[h]:
                    continue
                g = -self._delta(m, [(h, e, True) for e in missing])
                if g > 1e-15 and (best is None or g / need > best[0]):
                    best = (g / need, h, m, missing)
            if best is None:
                return
            for e in best[3]:
                self._apply(best[1], best[2], e, True)

    def improve(self, deadline: float, exchange: bool = False) -> bool:
        """One pass of local search over the placed experts: drop one that does not help,
        move one to another holder, or swap one for an expert that is not on its holder;
        with `exchange`, also trade one with an expert another holder has (slower).
        True when anything changed."""
        H, M, E = self.held.shape
        gains = np.zeros((H, M, E))  # gain of adding each expert now; swaps across layers read it
        for h, m, e in itertools.product(range(H), range(M), range(E)):
            if self._fits(h, m, e, int(self.caps[h])):
                gains[h, m, e] = -self._delta(m, [(h, e, True)])
        changed = False
        for h, m, e in zip(*np.nonzero(self.held)):
            if time.monotonic() > deadline:
                return changed
            if not self.held[h, m, e]:
                continue
            loss = self._delta(m, [(h, e, False)])
            if loss <= 1e-15:  # no worse without it: free the room
                self._apply(h, m, e, False)
                changed = True
                continue
            room = int(self.free[h] + self.sizes[m, e])
            best: tuple[float, list[tuple[int, int, int, bool]]] = (-1e-15, [])
            for h2 in range(H):
                if h2 != h and self._fits(h2, m, e):
                    d = self._delta(m, [(h, e, False), (h2, e, True)])
                    if d < best[0]:
                        best = (d, [(h, m, e, False), (h2, m, e, True)])
            for m2, e2 in zip(*np.nonzero(gains[h] > loss)):
                if (m2, e2) == (m, e) or not self._fits(h, m2, e2, room):
                    continue
                if m2 == m:
                    d = self._delta(m, [(h, e, False), (h, e2, True)])
                else:
                    d = loss + self._delta(m2, [(h, e2, True)])
                if d < best[0]:
                    best = (d, [(h, m, e, False), (h, m2, e2, True)])
            if exchange and not best[1]:
                best = self._exchange(h, m, e, deadline)
            for h3, m3, e3, on in best[1]:
                self._apply(h3, m3, e3, on)
                changed = True
        return changed

    def _exchange(self, h: int, m: int, e: int, deadline: float) -> tuple[float, list[tuple[int, int, int, bool]]]:
        """The best exchange of (h, m, e) with an expert (h2, m2, e2) another holder has: e
        moves to h2 and e2 to h, both within their holders' room (a change and its moves)."""
        best: tuple[float, list[tuple[int, int, int, bool]]] = (-1e-15, [])
        for h2, m2, e2 in zip(*np.nonzero(self.held)):
            if time.monotonic() > deadline:
                break
            if h2 == h or self.held[h2, m, e] or self.held[h, m2, e2] or (m2, e2) == (m, e):
                continue
            if (
                self.sizes[m2, e2] > self.free[h] + self.sizes[m, e]
                or self.sizes[m, e] > self.free[h2] + self.sizes[m2, e2]
            ):
                continue
            if m2 == m:
                d = self._delta(m, [(h, e, False), (h2, e, True), (h2, e2, False), (h, e2, True)])
            else:
                d = self._delta(m, [(h, e, False), (h2, e, True)]) + self._delta(m2, [(h2, e2, False), (h, e2, True)])
            if d < best[0]:
                best = (d, [(h, m, e, False), (h2, m2, e2, False), (h2, m, e, True), (h, m2, e2, True)])
        return best

    def make_room(self, deadline: float) -> bool:
        """Force an expert onto a holder and repair: from where it is to another holder, or
        onto a holder it does not fit, evicting that holder's least useful experts (loss per
        byte), then refill every holder's free room greedily. Kept when the total drops; this
        finds the trades one move cannot (a hot expert to a slower holder so that two fit)."""
        H, M, E = self.held.shape
        changed = False
        tries = [(h2, m, e, int(h)) for h, m, e in zip(*np.nonzero(self.held)) for h2 in range(H) if h2 != h]
        tries += [
            (h, m, e, -1) for h, m, e in itertools.product(range(H), range(M), range(E)) if not self.held[:, m, e].any()
        ]
        for h, m, e, source in tries:
            if time.monotonic() > deadline:
                return changed
            sz = self.sizes[m, e]
            if self.held[h, m, e] or sz == 0 or sz > self.caps[h] or (source >= 0 and not self.held[source, m, e]):
                continue
            if source < 0 and -self._delta(m, [(h, e, True)]) <= 1e-15:
                continue
            before = (self.held.copy(), self.free.copy(), list(self.times), list(self.cost))
            total = self.total()
            if source >= 0:
                self._apply(source, m, e, False)
            placed = sorted(
                (self._delta(m2, [(h, e2, False)]) / self.sizes[m2, e2], m2, e2)
                for m2, e2 in zip(*np.nonzero(self.held[h]))
            )
            for _, m2, e2 in placed:
                if self.free[h] >= sz:
                    break
                self._apply(h, m2, e2, False)
            self._apply(h, m, e, True)
            self.greedy(True, holders=[h] if source < 0 else [h, source])
            if self.total() < total - 1e-15:
                changed = True
            else:
                self.held, self.free, self.times, self.cost = before
        return changed

    def ruin_and_recreate(self, deadline: float, rng: np.random.Generator, patience: int = 40) -> None:
        """Drop a random half of the placements and refill greedily; keep the result when
        the total drops. Stops after `patience` tries in a row without a gain."""
        misses = 0
        while misses < patience and time.monotonic() < deadline and self.held.any():
            before = (self.held.copy(), self.free.copy(), list(self.times), list(self.cost))
            total = self.total()
            for h, m, e in zip(*np.nonzero(self.held)):
                if rng.random() < 0.5:
                    self._apply(h, m, e, False)
            self.greedy(bool(rng.random() < 0.5), rng)
            if self.total() < total - 1e-15:
                misses = 0
            else:
                misses += 1
                self.held, self.free, self.times, self.cost = before


def _summarise(plan: Plan, c: _Costs, sets: list[LayerSets]) -> None:
    """Expected time per token and the expected share of routed uses each holder serves."""
    total = 0.0
    uses = 0.0
    per_device = np.zeros(len(plan.devices))
    hit_uses = flash_uses = 0.0
    for m, s in enumerate(sets):
        t, choice = _serve(c, m, s, plan.held[:, m], plan.local[m])
        D = len(plan.devices)
        served = np.stack([(choice == h).sum(1) for h in range(D + 2)], 1)  # [N, holders]: uses each serves
        total += float(s.p @ t)
        uses += float(s.p @ s.used.sum(1))
        per_device += s.p @ served[:, :D]
        hit_uses += float(s.p @ served[:, D])
        flash_uses += float(s.p @ served[:, D + 1])
    plan.expected_token_s = total
    uses = max(uses, 1e-300)
    plan.served = {d.name: float(x / uses) for d, x in zip(plan.devices, per_device)}
    plan.served["coordinator RAM"] = hit_uses / uses
    plan.served["flash"] = flash_uses / uses


def format_plan(plan: Plan, detail: bool = False) -> str:
    """A table: device, experts held per MoE layer, bytes, expected share of routed uses it
    serves, replicas (its experts some other device also holds); then the coordinator's cache
    and flash, and the expected time per token. detail: list the experts of each layer."""
    M = plan.sizes.shape[0]
    others = plan.held.sum(0)
    rows = []
    for i, d in enumerate(plan.devices):
        h = plan.held[i]
        rows.append(
            (
                d.name,
                _per_layer(h, detail),
                format_bytes(int((h * plan.sizes).sum())) + f" of {format_bytes(max(0, d.expert_bytes))}",
                f"{100 * plan.served.get(d.name, 0.0):.1f}%",
                str(int((h & (others > 1)).sum())),
            )
        )
    rows.append(
        (
            "coordinator RAM",
            _per_layer(plan.local, detail),
            format_bytes(int((plan.local * plan.sizes).sum())) + f" of {format_bytes(plan.coordinator.cache_bytes)}",
            f"{100 * plan.served.get('coordinator RAM', 0.0):.1f}%",
            "-",
        )
    )
    streamed = ~plan.local & ~plan.held.any(0) & (plan.sizes > 0)
    rows.append(
        (
            "coordinator flash",
            _per_layer(streamed, detail),
            format_bytes(int((streamed * plan.sizes).sum())) + " (streamed)",
            f"{100 * plan.served.get('flash', 0.0):.1f}%",
            "-",
        )
    )
    head = ("device", f"experts held per MoE layer ({M} layers)", "bytes", "share of uses", "replicas")
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, width)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in width))
    ms = 1e3 * plan.expected_token_s
    alone = 1e3 * plan.alone_token_s
    speed = f", {alone / ms:.2f}x" if ms > 0 and alone > 0 and plan.devices else ""
    lines.append(
        f"\nexpected MoE time per token: {ms:.3f} ms (the coordinator alone with the same cache: {alone:.3f} ms{speed})"
    )
    return "\n".join(lines)


def _per_layer(mask: np.ndarray, detail: bool) -> str:
    if detail:
        return (
            "; ".join(f"{m}: " + ",".join(map(str, np.flatnonzero(row))) for m, row in enumerate(mask) if row.any())
            or "-"
        )
    counts = mask.sum(1)
    total = int(counts.sum())
    if total == 0:
        return "-"
    if len(counts) <= 12:
        return f"{total}: " + " ".join(map(str, counts))
    return f"{total}: {counts.min()}-{counts.max()} per layer"


# -- inputs from a converted model ---------------------------------------------------------------
def model_inputs(model_dir: str | Path, require_routing: bool = True) -> tuple[np.ndarray, RoutingStats, list[int]]:
    """(sizes [M, E] in whole pages, routing statistics, MoE layer indices) of a converted
    model and its routing.json (ModelDirectoryError naming `edgemoe profile` without one;
    without require_routing, a model without one plans as if every expert were used alike)."""
    manifest = load_manifest(model_dir)
    ex = manifest["experts"]
    moe = [int(x) for x in ex["moe_layers"]]
    _, lengths, _, _ = blob_tables(manifest)
    sizes = page_bytes(lengths[moe])
    hidden = int(manifest["config"]["hidden_size"])
    if not require_routing and not (Path(model_dir) / ROUTING_FILE).exists():
        return sizes, RoutingStats((sizes > 0).astype(np.int64), int(ex["top_k"]), hidden), moe
    doc = load_routing(model_dir)
    usage = np.asarray(doc["usage"], np.int64)
    c1 = table_from_routing(doc).c1 if doc.get("table") else None
    return sizes, RoutingStats(usage, int(doc.get("top_k", ex["top_k"])), hidden, c1), moe
