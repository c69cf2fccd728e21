"""The coarse level: which specialists to enable under an energy and a latency budget.

A specialist i on its device costs energy_j[i] joules per token (its device's active power x its
time per token) and answers a token after latency_s[i] (its time per token plus its link). For a
set S of enabled specialists the system spends sum(energy_j[S]) per token and a request waits
max(latency_s[S]) per token. The expected loss of S comes from held-out documents: the full gate
restricted to S and renormalised, its top-k per document, mixing the specialists' probabilities
of each true next token (`HeldoutLoss.loss`).

The search is discrete monotonic optimisation: adding a specialist can only lower the loss and
raise the costs, so (1) a set that breaks the energy budget makes every superset infeasible and is
never extended, and (2) a branch whose largest reachable set is no better than the best set found
is dropped with every subset in it. Specialists that are copies of one model on other devices
share a `group`: only the cheapest copy that meets the latency budget can be in an optimal set.
`brute_force` enumerates every subset: the reference for tests and the bench, never used to plan.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..devices import DeviceProfile, LinkProfile
from ..errors import MixtureBudgetError, MixtureError

LossFn = Callable[[tuple[int, ...]], float]  # sorted specialist indices -> expected loss

BYTES_PER_PROB = 4  # a next-token distribution travels as float32
DEVICE_WINDOW = 256  # the most recent tokens whose device time the energy estimate is the mean of
WAIT_WINDOW = 64  # the most recent requests whose time per token a latency estimate is taken from
WAIT_QUANTILE = 0.95  # a latency budget is to hold for this share of requests
SLACK = 1e-9  # relative: a sum of energies equal to the budget but for rounding fits it


def upper_quantile(samples: Sequence[float] | collections.deque[float]) -> float:
    """The 95th percentile of `samples` as the sample that reaches it, never interpolated down:
    with fewer than 20 samples that is the largest (a few requests cannot tell a 95th
    percentile from a maximum, and a latency estimate must not promise less than was seen)."""
    return float(np.quantile(np.fromiter(samples, float), WAIT_QUANTILE, method="higher"))


# -- costs ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Costs:
    """Per specialist: seconds per token on its device, the link's seconds per token, the
    device's active power; `correction` multiplies the device time (1 until measured)."""

    names: list[str]
    seconds: np.ndarray  # [N] compute seconds per token on its device (from its profile)
    link_seconds: np.ndarray  # [N] round trip plus one distribution over the link
    power_w: np.ndarray  # [N] the device's active power
    devices: list[str]
    correction: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(0))
    fan_out_s: float = 0.0  # the coordinator's seconds per token for each further specialist it calls

    def __post_init__(self) -> None:
        if self.correction.size != len(self.names):
            self.correction = np.ones(len(self.names))
        self.link_seconds = np.array(self.link_seconds, dtype=np.float64)
        self.measured_count = np.zeros(len(self.names), dtype=np.int64)
        # per specialist, the time per token of recent requests it served alone, as the
        # coordinator saw it (device, link, Ray, gate, mixing, sampling); and for requests
        # served by several, what they took beyond the slowest one, per further specialist
        self.waits: list[collections.deque[float]] = [collections.deque(maxlen=WAIT_WINDOW) for _ in self.names]
        # the device's own time per token (its compute), for energy: a mean over recent tokens
        self.device_waits: list[collections.deque[float]] = [
            collections.deque(maxlen=DEVICE_WINDOW) for _ in self.names
        ]
        self.fan_out_waits: collections.deque[float] = collections.deque(maxlen=WAIT_WINDOW)

    @property
    def device_seconds(self) -> np.ndarray:
        return self.seconds * self.correction

    @property
    def latency_s(self) -> np.ndarray:
        """Seconds per token a request waits on each specialist: once measured, the 95th
        percentile of what recent requests it served alone waited per token; before that, the
        profile's device time (corrected by the device's measurements) plus its link."""
        out = self.device_seconds + self.link_seconds
        for i, w in enumerate(self.waits):
            if w:
                out[i] = upper_quantile(w)
        return out

    @property
    def energy_j(self) -> np.ndarray:
        """Joules per token each specialist spends on its device."""
        return self.power_w * self.device_seconds

    def measured(self, name: str, seconds_per_token: float, wall_s: float | None = None) -> None:
        """Correct the cost model online by a time per token a device measured (its compute):
        the mean over its recent tokens against the profile's prediction, for energy (a sum
        over tokens: the mean is what it costs) and for the latency of a specialist no request
        has measured yet. `wall_s`: a request's time per token with
        this specialist alone, as `request` records it."""
        i = self.names.index(name)
        self.device_waits[i].append(float(seconds_per_token))
        self.correction[i] = float(np.mean(np.fromiter(self.device_waits[i], float))) / max(self.seconds[i], 1e-12)
        self.measured_count[i] += 1
        if wall_s is not None:
            self.waits[i].append(float(wall_s))

    def forget(self) -> None:
        """Drop every measurement (after a warm-up): the profiles' figures again."""
        for d in (*self.waits, *self.device_waits, self.fan_out_waits):
            d.clear()
        self.correction = np.ones(len(self.names))
        self.measured_count[:] = 0
        self.fan_out_s = 0.0

    def request(self, served: Sequence[str], seconds_per_token: float, top_k: int) -> None:
        """A request's time per token as the coordinator saw it, the unit a latency budget is
        kept in: a sample of its specialist's latency when one served it; when several did, of
        the fan-out (what it took beyond the slowest one's latency, per further specialist)."""
        idx = [self.names.index(n) for n in served if n in self.names]
        if len(idx) != len(served) or not idx:
            return
        if len(idx) == 1:
            self.waits[idx[0]].append(float(seconds_per_token))
            return
        further = min(len(idx), top_k) - 1
        if further <= 0:
            return
        slowest = float(self.latency_s[idx].max())
        self.fan_out_waits.append(max(0.0, float(seconds_per_token) - slowest) / further)
        self.fan_out_s = upper_quantile(self.fan_out_waits)

    def table(self) -> list[dict[str, Any]]:
        return [
            {
                "name": n,
                "device": d,
                "latency_s": float(lat),
                "energy_j": float(e),
                "device_s": float(s),
                "link_s": float(ls),
                "correction": float(c),
                "latency_samples": len(w),
            }
            for n, d, lat, e, s, ls, c, w in zip(
                self.names,
                self.devices,
                self.latency_s,
                self.energy_j,
                self.device_seconds,
                self.link_seconds,
                self.correction,
                self.waits,
            )
        ]


def seconds_per_token(active_bytes: float, profile: DeviceProfile) -> float:
    """A decode token streams the specialist's active weights once through the CPU: memory-bound,
    at the profile's int4 kernel throughput (bytes of weights per second)."""
    rate = profile.int4_bytes_per_s or profile.memory_bytes_per_s
    if rate <= 0:
        raise MixtureError(
            f"device profile {profile.name} has no compute figure (compute.int4_bytes_per_s): "
            "measure the device with `edgemoe devices` or pick another profile"
        )
    return float(active_bytes) / float(rate)


def link_seconds(link: LinkProfile | None, vocab: int) -> float:
    """One token's round trip: the link's rtt plus a float32 distribution over the vocabulary."""
    if link is None:
        return 0.0
    return link.rtt_s + vocab * BYTES_PER_PROB * 8 / link.bits_per_s


def costs_from_profiles(
    names: Sequence[str],
    active_bytes: Sequence[float],
    profiles: Sequence[DeviceProfile],
    vocab: int,
    links: Sequence[LinkProfile | None] | None = None,
) -> Costs:
    """Costs of each specialist (its active weight bytes per token) on its device profile; each
    reaches the coordinator over `links[i]` (default: its profile's link)."""
    links = list(links) if links is not None else [p.link for p in profiles]
    return Costs(
        names=list(names),
        seconds=np.array([seconds_per_token(b, p) for b, p in zip(active_bytes, profiles)]),
        link_seconds=np.array([link_seconds(lk, vocab) for lk in links]),
        power_w=np.array([p.active_w for p in profiles], dtype=np.float64),
        devices=[p.name for p in profiles],
    )


# -- expected loss from held-out documents ------------------------------------------------------
@dataclasses.dataclass
class HeldoutLoss:
    """Held-out documents as the selection sees them: the full gate's weights per document
    [D, M] over the M models, each model's log-probability of every true next token [M, T]
    and the document of each token [T]."""

    weights: np.ndarray  # [D, M] softmax of the full gate, rows sum to 1
    logprobs: np.ndarray  # [M, T]
    doc: np.ndarray  # [T] document index of each token
    domains: np.ndarray  # [D] the domain of each document
    top_k: int

    @classmethod
    def load(cls, spec: Any, gate: Any) -> HeldoutLoss:
        """From a mixture's heldout.npz, weighed by its gate (models in the gate's order)."""
        from .heldout import Heldout

        h = Heldout.load(spec.heldout)
        missing = [n for n in gate.names if n not in h.specialists]
        if missing:
            raise MixtureError(
                f"{spec.heldout} scores specialists {h.specialists}, not {missing}: write the held-out set again"
            )
        cols = [h.specialists.index(n) for n in gate.names]
        weights = gate.weights_from_features(h.features).astype(np.float64)  # [D, M]
        return cls.from_arrays(weights, h.logprobs[:, cols, :], h.n_scored, h.domain, spec.top_k)

    @classmethod
    def from_arrays(
        cls, weights: np.ndarray, logprobs: np.ndarray, n_scored: np.ndarray, domains: np.ndarray, top_k: int
    ) -> HeldoutLoss:
        """weights [D, M], logprobs [D, M, T] (scored up to n_scored[d] tokens), domains [D]."""
        mask = np.arange(logprobs.shape[2])[None, :] < np.asarray(n_scored)[:, None]  # [D, T]
        doc, pos = np.nonzero(mask)
        flat = logprobs[doc, :, pos].T  # [M, tokens]
        return cls(np.asarray(weights, np.float64), flat, doc, np.asarray(domains).astype(str), int(top_k))

    def __post_init__(self) -> None:
        d, m = self.weights.shape
        assert self.logprobs.shape[0] == m and self.logprobs.shape[1] == self.doc.size, "heldout shapes disagree"
        self.probs = np.exp(self.logprobs.astype(np.float64))  # [M, T]
        self._m = m
        self._probs_tm = np.ascontiguousarray(self.probs.T).ravel()  # [T * M], token-major
        self._all = np.arange(self.doc.size)

    def restricted_weights(self, models: Sequence[int], docs: np.ndarray | None = None) -> np.ndarray:
        """[D, M]: per document the top-k of `models` by gate weight, renormalised; zero elsewhere."""
        w = self.weights if docs is None else self.weights[docs]
        out = np.zeros_like(w)
        idx = np.asarray(sorted(set(models)), dtype=np.int64)
        if idx.size == 0:
            return out
        sub = w[:, idx]
        k = min(self.top_k, idx.size)
        if k < idx.size:  # keep the k largest of each row
            keep = np.argsort(-sub, axis=1, kind="stable")[:, :k]
            mask = np.zeros_like(sub, dtype=bool)
            np.put_along_axis(mask, keep, True, axis=1)
            sub = np.where(mask, sub, 0.0)
        total = sub.sum(axis=1, keepdims=True)
        out[:, idx] = np.where(total > 0, sub / np.where(total > 0, total, 1.0), 1.0 / k)
        return out

    def loss(self, models: Sequence[int], domain: str | None = None) -> float:
        """Mean negative log-likelihood per token (nats) of the gated mixture of `models`."""
        if domain is None:
            tok, doc = self._all, self.doc
        else:
            tok = np.flatnonzero(self.domains[self.doc] == domain)
            if tok.size == 0:
                raise MixtureError(f"the held-out set has no document of domain {domain!r}")
            doc = self.doc[tok]
        w = self.restricted_weights(models)  # [D, M], at most top_k non-zero per row
        k = min(self.top_k, len(set(models))) or 1
        cols = np.argsort(-w, axis=1, kind="stable")[:, :k]  # [D, k] the models serving each document
        vals = np.take_along_axis(w, cols, axis=1)  # [D, k]
        # only the serving models' probabilities: [T, k] gathered from the token-major copy
        p = self._probs_tm[(tok * self._m)[:, None] + cols[doc]]
        mix = (vals[doc] * p).sum(axis=1)
        return float(-np.log(np.maximum(mix, 1e-300)).mean())

    def single_loss(self, model: int, domain: str | None = None) -> float:
        tok = np.arange(self.doc.size) if domain is None else np.flatnonzero(self.domains[self.doc] == domain)
        return float(-self.logprobs[model, tok].mean())


def set_latency(slowest: float, count: int, fan_out_s: float, top_k: int) -> float:
    """Seconds per token of a request served by `count` enabled specialists: the slowest one
    plus its link, and fan_out_s for each further one the coordinator calls (at most top_k
    serve a request). fan_out_s is measured (the coordinator's work per call); 0 when the
    calls cost nothing beside the slowest answer."""
    return slowest + fan_out_s * max(0, min(count, top_k) - 1)


# -- the search ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Choice:
    """The enabled specialists (indices into the cost table), what they cost and why."""

    enabled: tuple[int, ...]
    loss: float
    energy_j: float
    latency_s: float
    evaluated: int  # loss evaluations
    pruned_infeasible: int  # branches cut because a superset broke the energy budget
    pruned_dominated: int  # branches cut because their largest set was no better than the best
    excluded: dict[int, str]  # specialist -> why it can never be enabled under these budgets
    seconds: float  # time the search took

    def to_json(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "enabled": [names[i] for i in self.enabled],
            "loss": self.loss,
            "perplexity": float(np.exp(self.loss)),
            "energy_j_per_token": self.energy_j,
            "latency_s_per_token": self.latency_s,
            "evaluated": self.evaluated,
            "pruned_infeasible": self.pruned_infeasible,
            "pruned_dominated": self.pruned_dominated,
            "excluded": {names[i]: why for i, why in self.excluded.items()},
            "search_seconds": self.seconds,
        }


def _nothing_fits(
    names: Sequence[str], energy: np.ndarray, latency: np.ndarray, e_budget: float, l_budget: float
) -> MixtureBudgetError:
    i_l, i_e = int(np.argmin(latency)), int(np.argmin(energy))
    return MixtureBudgetError(
        f"no specialist fits the budgets (latency {l_budget * 1e3:.3g} ms per token, energy {e_budget:.3g} J per "
        f"token): the fastest, {names[i_l]}, needs {latency[i_l] * 1e3:.3g} ms and {energy[i_l]:.3g} J; the most "
        f"frugal, {names[i_e]}, {latency[i_e] * 1e3:.3g} ms and {energy[i_e]:.3g} J. Raise a budget or put a "
        "specialist on a faster device"
    )


def select(
    loss: LossFn,
    energy_j: np.ndarray,
    latency_s: np.ndarray,
    energy_budget: float,
    latency_budget: float,
    groups: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    fan_out_s: float = 0.0,
    top_k: int = 1,
) -> Choice:
    """The set of specialists with the lowest `loss` whose summed energy_j is within
    energy_budget and whose latency (`set_latency`: the slowest latency_s, plus fan_out_s for
    each further specialist serving a request, up to top_k) is within latency_budget (ties:
    the cheaper).
    `loss(sorted indices)` must not rise when a specialist is added (monotone). Specialists
    with the same `groups` entry are one model on several devices: the loss sees only which
    models are enabled. Raises MixtureBudgetError when no specialist fits."""
    t0 = time.perf_counter()
    energy = np.asarray(energy_j, dtype=np.float64)
    latency = np.asarray(latency_s, dtype=np.float64)
    energy_budget, latency_budget = energy_budget * (1 + SLACK), latency_budget * (1 + SLACK)
    n = energy.size
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    groups = list(groups) if groups is not None else list(range(n))
    excluded: dict[int, str] = {}
    for i in range(n):
        if latency[i] > latency_budget:
            excluded[i] = f"its {latency[i] * 1e3:.3g} ms per token exceed the latency budget"
        elif energy[i] > energy_budget:
            excluded[i] = f"its {energy[i]:.3g} J per token exceed the energy budget"
    # dominance among copies: of one model's copies that fit, only the most frugal can be optimal
    best_copy: dict[Any, int] = {}
    for i in range(n):
        if i not in excluded:
            g = groups[i]
            if g not in best_copy or energy[i] < energy[best_copy[g]]:
                best_copy[g] = i
    for i in range(n):
        if i not in excluded and best_copy[groups[i]] != i:
            excluded[i] = f"a copy of the same model on {names[best_copy[groups[i]]]} costs less energy"
    cand = sorted(best_copy.values())
    if not cand:
        raise _nothing_fits(names, energy, latency, energy_budget, latency_budget)

    memo: dict[tuple[int, ...], float] = {}

    def lat(slowest: float, count: int) -> float:
        return set_latency(slowest, count, fan_out_s, top_k)

    def L(s: Sequence[int]) -> float:
        key = tuple(sorted(s))
        if key not in memo:
            memo[key] = float(loss(key))
        return memo[key]

    def fits_with(e: float, slowest: float, count: int, j: int) -> bool:
        return e + energy[j] <= energy_budget and lat(max(slowest, latency[j]), count + 1) <= latency_budget

    best: list[Any] = [None, np.inf, np.inf]  # set, loss, energy
    cut = {"infeasible": 0, "dominated": 0}

    def offer(s: tuple[int, ...], e: float) -> None:
        v = L(s)
        if v < best[1] - 1e-12 or (abs(v - best[1]) <= 1e-12 and e < best[2]):
            best[:] = [s, v, e]

    # a good first set makes the bounds bite early: greedy by loss gained per joule (lazily
    # re-evaluated: a stale gain only orders the queue), each pick in turn the next to branch on
    picked: list[int] = []
    e_g, slow_g, cur = 0.0, 0.0, np.inf
    stale = {i: (np.inf, i) for i in cand}
    while True:
        live = [i for i in stale if fits_with(e_g, slow_g, len(picked), i)]
        if not live:
            break
        live.sort(key=lambda i: (-stale[i][0], i))
        for i in live:
            gain = (cur - L((*picked, i))) / max(float(energy[i]), 1e-300) if np.isfinite(cur) else -L((i,))
            stale[i] = (gain, i)
            nxt = [x for x in live if x != i]
            if not nxt or gain >= stale[max(nxt, key=lambda x: stale[x][0])][0]:
                break
        i = max(live, key=lambda x: (stale[x][0], -x))
        picked.append(i)
        del stale[i]
        e_g, slow_g, cur = e_g + float(energy[i]), max(slow_g, float(latency[i])), L(tuple(picked))
    offer(tuple(picked), e_g)
    rest_order = sorted((i for i in cand if i not in picked), key=lambda i: (L((i,)), energy[i], i))
    order = picked + rest_order

    def dfs(
        s: tuple[int, ...],
        e: float,
        slowest: float,
        rest: list[int],
        left_out: list[int],
    ) -> None:
        fits = [j for j in rest if fits_with(e, slowest, len(s), j)]
        cut["infeasible"] += len(rest) - len(fits)  # every superset with j breaks a budget
        top = s + tuple(fits)
        e_top = e + float(energy[fits].sum())
        slow_top = max(slowest, float(latency[fits].max())) if fits else slowest
        # a set that still has room for a specialist this branch left out is no better than that
        # set with it, which the sibling branch holds: if even the largest set here has room, all do
        if any(fits_with(e_top, slow_top, len(top), j) for j in left_out):
            cut["dominated"] += 1
            return
        if not fits:
            if s:
                offer(s, e)
            return
        if e_top <= energy_budget and lat(slow_top, len(top)) <= latency_budget:  # the largest set fits: its best
            offer(top, e_top)
            return
        if L(top) >= best[1] - 1e-12:  # every set of this branch is a subset of `top`: none beats the best
            cut["dominated"] += 1
            return
        j, others = fits[0], fits[1:]
        dfs(s + (j,), e + float(energy[j]), max(slowest, float(latency[j])), others, left_out)
        dfs(s, e, slowest, others, left_out + [j])

    dfs((), 0.0, 0.0, order, [])
    chosen = tuple(sorted(best[0]))
    # polish by single moves: add a specialist that fits and lowers the loss (none can for a
    # monotone loss at its optimum; a gated top-k mixture is monotone only nearly: a specialist
    # the gate ranks high can push a better one out of a document's top-k), or drop one whose
    # removal does not raise the loss (a specialist that never reaches a top-k): the same loss
    # for less energy. Each move lowers the loss, or the energy at the same loss.
    changed, moves = True, 0
    while changed and moves < 4 * n:
        changed, moves = False, moves + 1
        e_c, slow_c, v_c = float(energy[list(chosen)].sum()), float(latency[list(chosen)].max()), L(chosen)
        for j in cand:
            if j not in chosen and fits_with(e_c, slow_c, len(chosen), j) and L((*chosen, j)) < v_c - 1e-12:
                chosen, changed = tuple(sorted((*chosen, j))), True
                break
        if changed or len(chosen) < 2:
            continue
        for i in sorted(chosen, key=lambda i: -energy[i]):
            smaller = tuple(x for x in chosen if x != i)
            if L(smaller) <= v_c + 1e-12:
                chosen, changed = smaller, True
                break
    return Choice(
        enabled=chosen,
        loss=L(chosen),
        energy_j=float(energy[list(chosen)].sum()),
        latency_s=lat(float(latency[list(chosen)].max()), len(chosen)),
        evaluated=len(memo),
        pruned_infeasible=cut["infeasible"],
        pruned_dominated=cut["dominated"],
        excluded=excluded,
        seconds=time.perf_counter() - t0,
    )


def brute_force(
    loss: LossFn,
    energy_j: np.ndarray,
    latency_s: np.ndarray,
    energy_budget: float,
    latency_budget: float,
    groups: Sequence[Any] | None = None,
    fan_out_s: float = 0.0,
    top_k: int = 1,
) -> tuple[tuple[int, ...], float] | None:
    """Every non-empty subset that fits, the one with the lowest loss (ties: least energy):
    the reference `select` is checked against. None when nothing fits."""
    energy = np.asarray(energy_j, dtype=np.float64)
    latency = np.asarray(latency_s, dtype=np.float64)
    energy_budget, latency_budget = energy_budget * (1 + SLACK), latency_budget * (1 + SLACK)
    n = energy.size
    groups = list(groups) if groups is not None else list(range(n))
    best: tuple[tuple[int, ...], float, float] | None = None
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            e = float(energy[list(s)].sum())
            if e > energy_budget or set_latency(float(latency[list(s)].max()), r, fan_out_s, top_k) > latency_budget:
                continue
            v = float(loss(s))
            if best is None or v < best[1] - 1e-12 or (abs(v - best[1]) <= 1e-12 and e < best[2]):
                best = (s, v, e)
    return None if best is None else (best[0], best[1])
