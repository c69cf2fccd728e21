"""Next-layer expert predictors, how well they do, and the prefetcher that hands
their guesses to the expert cache while the current layer computes.

Two predictors with one interface, `predict(m_next, ctx) -> (ids, probs)`, ids in
decreasing probability of being needed by MoE layer m_next (a moe index, see
routing.py) for the tokens in flight:

- TablePredictor: EdgeMoE's offline table P(experts at l+1 | experts at l-1, l)
  from routing.json, backing off to l alone, then to layer l+1's frequency.
- LookaheadPredictor: HOBBIT's gate look-ahead, layer l+1's router (with its
  ffn_norm) applied to a hidden state of layer l: "moe_in" (the residual stream at
  layer l's MoE input, known when l routes) or "layer_out" (after l's residual add:
  known one MoE computation later, so less time to read). With a LookaheadFit the
  router is replaced by a linear map fitted on calibration text to predict layer
  l+1's router logits from that hidden state (started from, and pulled towards,
  the router itself): "fitted" in load(prefetch=...).

A guess costs bandwidth, never correctness: the real router always decides.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import _core
from .errors import EdgeMoEError, ModelDirectoryError
from .models.base import RouteObserver, route_softmax_topk, softmax
from .routing import (LOOKAHEAD_POINTS, RoutingTrace, TransitionTable, expert_sizes, load_routing,
                      lookahead_logits, table_from_routing)

if TYPE_CHECKING:
    from .model import Model

PREDICTORS = ("table", "lookahead", "fitted")  # each may end in ":moe_in" or ":layer_out" (look-aheads)
FIT_FILE = "routing.safetensors"
DEFAULT_RATIO = 1.5  # prefetch byte budget per layer, in units of the bytes a token needs


@dataclasses.dataclass
class RouteContext:
    """What is known about the tokens in flight: per MoE index the routed experts and
    gate weights ([T, k], None until routed) and the hidden states a look-ahead reads."""

    experts: list[np.ndarray | None]
    weights: list[np.ndarray | None]
    hidden: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, num_moe_layers: int) -> "RouteContext":
        return cls([None] * num_moe_layers, [None] * num_moe_layers)


def needed_probs(p: np.ndarray, k: int) -> np.ndarray:
    """[E] probability that each expert is needed by any of T tokens, from slot
    probabilities p [T, E] (rows sum to 1, k slots per token)."""
    q = np.minimum(1.0, k * p)
    return q[0] if len(q) == 1 else 1.0 - np.prod(1.0 - q, axis=0)


class Predictor:
    """Base: subclasses give slot probabilities for live contexts and for recorded traces."""

    name = "predictor"
    point = "route"  # when its guess for l+1 is ready: at l's routing ("route") or after l ("layer_out")

    def __init__(self, top_k: int):
        self.top_k = top_k

    def probs(self, m_next: int, ctx: RouteContext) -> np.ndarray:
        """Slot probabilities [T, E] of MoE layer m_next's experts."""
        raise NotImplementedError

    def trace_probs(self, trace: RoutingTrace, m_next: int) -> np.ndarray:
        """The same for every token of a recorded trace [T, E] (for offline evaluation)."""
        raise NotImplementedError

    def logits(self, m_next: int, ctx: RouteContext) -> np.ndarray | None:
        """Logits [T, E] whose softmax is probs(), for predictors that have them (else None)."""
        return None

    def predict(self, m_next: int, ctx: RouteContext) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids int32 [E], probability each is needed [E]), most likely first."""
        z = self.logits(m_next, ctx)
        if z is not None and len(z) == 1:
            # a decode step: one native softmax and sort instead of a chain of tiny numpy calls
            # (this runs once per MoE layer per token, in the time budget of the layer's compute)
            ids, p = route_softmax_topk(np.ascontiguousarray(z, np.float32), z.shape[1], False)
            return ids[0], np.minimum(1.0, self.top_k * p[0])
        q = needed_probs(self.probs(m_next, ctx) if z is None else softmax(z), self.top_k)
        order = np.argsort(-q, kind="stable")
        return order.astype(np.int32), q[order]


class TablePredictor(Predictor):
    """EdgeMoE's table. order 2: condition on (l-1, l); order 1: on l alone.
    weighted: weight each context expert by its gate weight (default: equal)."""

    name = "table"

    def __init__(self, table: TransitionTable, order: int = 2, weighted: bool = False):
        super().__init__(table.top_k)
        self.table, self.order, self.weighted = table, order, weighted

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs: Any) -> "TablePredictor":
        return cls(table_from_routing(load_routing(path)), **kwargs)

    def _probs(self, n: int, e1: np.ndarray | None, e2: np.ndarray | None, w1: Any, w2: Any) -> np.ndarray:
        if self.order < 2:
            e2 = None
        if not self.weighted:
            w1 = w2 = None
        return self.table.probs(n, e1, e2, w1, w2)

    def probs(self, m_next: int, ctx: RouteContext) -> np.ndarray:
        n = m_next
        e1 = ctx.experts[n - 1] if n >= 1 else None
        e2 = ctx.experts[n - 2] if n >= 2 else None
        w1 = ctx.weights[n - 1] if n >= 1 else None
        w2 = ctx.weights[n - 2] if n >= 2 else None
        return self._probs(n, e1, e2, w1, w2)

    def trace_probs(self, trace: RoutingTrace, m_next: int) -> np.ndarray:
        n = m_next
        e1, w1 = trace.experts[:, n - 1], trace.weights[:, n - 1]
        e2, w2 = (trace.experts[:, n - 2], trace.weights[:, n - 2]) if n >= 2 else (None, None)
        return self._probs(n, e1, e2, w1, w2)


class LookaheadFit:
    """A fitted gate look-ahead at one point: logits of MoE layer n ~= x W[n].T + b[n], with
    x = h / rms(h) (no weight), h = MoE layer n-1's hidden state at `point`."""

    def __init__(self, point: str, weights: dict[int, tuple[np.ndarray, np.ndarray]], eps: float = 1e-6):
        self.point, self.weights, self.eps = point, weights, eps
        self._w = {n: np.ascontiguousarray(W, np.float32) for n, (W, _) in weights.items()}  # [E, H]
        self._ones = {n: np.ones(W.shape[1], np.float32) for n, (W, _) in weights.items()}

    def logits(self, n: int, h: np.ndarray) -> np.ndarray:
        x = _core.rms_norm(np.ascontiguousarray(h, np.float32), self._ones[n], self.eps)  # h / rms(h)
        return _core.linear(x, self._w[n], "f32") + self.weights[n][1]

    def probs(self, n: int, h: np.ndarray) -> np.ndarray:
        return softmax(self.logits(n, h))

    def tensors(self) -> dict[str, tuple[np.ndarray, str]]:
        out = {}
        for n, (W, b) in self.weights.items():
            out[f"lookahead.{self.point}.{n}.weight"] = (np.ascontiguousarray(W, np.float32), "F32")
            out[f"lookahead.{self.point}.{n}.bias"] = (np.ascontiguousarray(b, np.float32), "F32")
        return out


def save_fits(model_dir: str | Path, fits: dict[str, LookaheadFit]) -> Path:
    from .converters.safetensors_io import write_safetensors

    tensors: dict[str, tuple[np.ndarray, str]] = {}
    for fit in fits.values():
        tensors.update(fit.tensors())
    path = Path(model_dir) / FIT_FILE
    tmp = path.with_suffix(".tmp")
    write_safetensors(tmp, tensors, metadata={"format": "edgemoe-lookahead", "version": "1"})
    tmp.replace(path)
    return path


def load_fits(model_dir: str | Path, eps: float = 1e-6) -> dict[str, LookaheadFit]:
    """point -> LookaheadFit from routing.safetensors (empty if the file is missing)."""
    from .converters.safetensors_io import read_safetensors

    path = Path(model_dir) / FIT_FILE
    if not path.exists():
        return {}
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, (a, _) in read_safetensors(path).items():
        _, point, n, what = name.split(".")
        found.setdefault(point, {}).setdefault(int(n), {})[what] = np.array(a, np.float32)
    return {p: LookaheadFit(p, {n: (d["weight"], d["bias"]) for n, d in sorted(layers.items())}, eps)
            for p, layers in found.items()}


class LookaheadFitter(RouteObserver):
    """Accumulates, while calibration text runs, the least-squares statistics that map each
    MoE layer's hidden state (at both points) to the next MoE layer's router logits."""

    def __init__(self, net: Any, moe_layers: Sequence[int], inner: RouteObserver | None = None):
        self.net, self.moe_layers, self.inner = net, list(moe_layers), inner
        self.pos = {layer: m for m, layer in enumerate(self.moe_layers)}
        H = net.cfg.hidden_size
        M = len(self.moe_layers)
        self.xtx = {p: np.zeros((M, H + 1, H + 1)) for p in LOOKAHEAD_POINTS}
        self.xtz = {p: np.zeros((M, H + 1, net.cfg.num_experts)) for p in LOOKAHEAD_POINTS}
        self.count = np.zeros(M, np.int64)
        self.pending: dict[str, dict[int, np.ndarray]] = {p: {} for p in LOOKAHEAD_POINTS}

    def _features(self, h: np.ndarray) -> np.ndarray:
        x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.net.cfg.rms_norm_eps)
        return np.hstack([x, np.ones((len(x), 1), x.dtype)]).astype(np.float64)

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        m = self.pos[layer]
        if m > 0:
            L = self.net.layers[layer]
            x = np.ascontiguousarray(resid / np.sqrt(np.mean(resid * resid, -1, keepdims=True)
                                                     + self.net.cfg.rms_norm_eps) * L["ffn_norm"], np.float32)
            z = L["router"](x).astype(np.float64)  # the logits this layer's router gave
            for p in LOOKAHEAD_POINTS:
                f = self.pending[p].pop(m - 1, None)
                if f is not None:
                    self.xtx[p][m] += f.T @ f
                    self.xtz[p][m] += f.T @ z
            self.count[m] += len(resid)
        self.pending["moe_in"][m] = self._features(resid)
        if self.inner is not None:
            self.inner.on_route(layer, resid, ids, weights)

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        if layer in self.pos:
            self.pending["layer_out"][self.pos[layer]] = self._features(h)
        if self.inner is not None:
            self.inner.on_layer_out(layer, h)

    def solve(self, ridge: float = 1e-3) -> dict[str, LookaheadFit]:
        """Ridge least squares pulled towards the router itself (W0 = router * ffn_norm, b0 = 0),
        with weight ridge x tokens, so little calibration text stays close to the router."""
        fits = {}
        for p in LOOKAHEAD_POINTS:
            weights = {}
            for m in range(1, len(self.moe_layers)):
                if not self.count[m]:
                    continue
                L = self.net.layers[self.moe_layers[m]]
                W0 = router_matrix(L["router"], len(L["ffn_norm"])) * L["ffn_norm"][None, :]  # [E, H]
                prior = np.vstack([W0.T, np.zeros((1, W0.shape[0]))])  # [H+1, E]
                lam = ridge * self.count[m]
                A = self.xtx[p][m] + lam * np.eye(len(prior))
                sol = np.linalg.solve(A, self.xtz[p][m] + lam * prior)  # [H+1, E]
                weights[m] = (sol[:-1].T.astype(np.float32), sol[-1].astype(np.float32))
            fits[p] = LookaheadFit(p, weights, self.net.cfg.rms_norm_eps)
        return fits


def router_matrix(linear: Any, hidden: int) -> np.ndarray:
    """A backbone Linear's weight [out, hidden] as float64, whatever its stored form
    (float or quantized): its response to the identity, less its bias."""
    eye = np.eye(hidden, dtype=np.float32)
    y = linear(eye).astype(np.float64)  # [hidden, out]
    if getattr(linear, "bias", None) is not None:
        y -= linear.bias
    return y.T


class LookaheadPredictor(Predictor):
    """Gate look-ahead from layer l's hidden state at `point` ("moe_in" or "layer_out"),
    through the router itself or, given `fit`, through the fitted map."""

    def __init__(self, net: Any, moe_layers: Sequence[int], top_k: int, point: str = "moe_in",
                 fit: LookaheadFit | None = None):
        if point not in LOOKAHEAD_POINTS:
            raise ValueError(f"look-ahead point must be one of {', '.join(LOOKAHEAD_POINTS)}, got {point!r}")
        super().__init__(top_k)
        self.net, self.moe_layers, self.la_point, self.fit = net, list(moe_layers), point, fit
        self.point = "route" if point == "moe_in" else "layer_out"
        self.key = f"fitted_{point}" if fit else point  # its name in RoutingTrace.lookahead
        self.name = f"fitted_{point}" if fit else f"lookahead_{point}"

    def logits(self, m_next: int, ctx: RouteContext) -> np.ndarray:
        h = ctx.hidden[self.la_point]
        if self.fit is not None:
            return self.fit.logits(m_next, h)
        return lookahead_logits(self.net, self.moe_layers[m_next], h)

    def probs(self, m_next: int, ctx: RouteContext) -> np.ndarray:
        return softmax(self.logits(m_next, ctx))

    def trace_probs(self, trace: RoutingTrace, m_next: int) -> np.ndarray:
        if self.key not in trace.lookahead:
            raise EdgeMoEError(f"this trace has no '{self.key}' look-ahead probabilities: record it with "
                               "lookahead=True (and the fits)")
        return trace.lookahead[self.key][:, m_next - 1].astype(np.float32)


class RecordedPredictor(Predictor):
    """Look-ahead probabilities already recorded in a trace under `key` (no model needed)."""

    def __init__(self, top_k: int, key: str = "moe_in"):
        super().__init__(top_k)
        self.key = key
        self.name = f"lookahead_{key}" if key in LOOKAHEAD_POINTS else key

    def trace_probs(self, trace: RoutingTrace, m_next: int) -> np.ndarray:
        return trace.lookahead[self.key][:, m_next - 1].astype(np.float32)


# -- choosing what to read ------------------------------------------------------------
def choose(ids: np.ndarray, probs: np.ndarray, sizes: Sequence[float], max_bytes: float,
           min_prob: float = 0.0) -> list[int]:
    """The longest prefix of ids (most likely first) whose bytes fit in max_bytes,
    dropping experts needed with probability below min_prob. sizes [E] per expert."""
    out: list[int] = []
    total = 0.0
    for e, q in zip(ids.tolist(), probs.tolist()):  # a few dozen at most: plain Python is fastest
        if q < min_prob:
            continue
        total += sizes[e]
        if total > max_bytes:
            break
        out.append(e)
    return out


def layer_byte_cap(sizes: np.ndarray, top_k: int, ratio: float) -> np.ndarray:
    """[M] prefetch bytes allowed per MoE layer: ratio x (top_k x the layer's mean expert bytes)."""
    present = np.where(sizes > 0, sizes, np.nan)
    return ratio * top_k * np.nan_to_num(np.nanmean(present, axis=1))


# -- offline evaluation ----------------------------------------------------------------
def _score(p: np.ndarray, actual: np.ndarray, sizes: np.ndarray, cap: float, k: int) -> dict[str, float]:
    """Counts for one layer: p [T, E] slot probabilities, actual [T, k] experts, sizes [E]."""
    T, E = p.shape
    order = np.argsort(-p, axis=1, kind="stable")
    need = np.zeros((T, E), bool)
    np.put_along_axis(need, actual.astype(np.int64), True, axis=1)
    hit_sorted = np.take_along_axis(need, order, axis=1)  # [T, E]: is the i-th guess needed
    cum_bytes = np.cumsum(sizes[order], axis=1)
    fetched = cum_bytes <= cap  # the operating point: a byte budget per token
    needed_bytes = float(sizes[actual.astype(np.int64)].sum())
    out = {"tokens": T, "needed": T * k, "needed_bytes": needed_bytes,
           "hits_k": int(hit_sorted[:, :k].sum()), "hits_2k": int(hit_sorted[:, :2 * k].sum()),
           "bytes_k": float(cum_bytes[:, k - 1].sum()), "bytes_2k": float(cum_bytes[:, min(2 * k, E) - 1].sum()),
           "hits_op": int((hit_sorted & fetched).sum()), "bytes_op": float((sizes[order] * fetched).sum()),
           "fetched_op": int(fetched.sum())}
    for c in range(1, min(2 * k, E) + 1):  # recall and bytes if we always read the c likeliest
        out[f"hits@{c}"] = int(hit_sorted[:, :c].sum())
        out[f"bytes@{c}"] = float(cum_bytes[:, c - 1].sum())
    return out


def _summarize(c: dict[str, float], k: int, ratio: float) -> dict[str, Any]:
    n, nb = max(1, c["needed"]), max(1.0, c["needed_bytes"])
    return {"recall_k": c["hits_k"] / n, "recall_2k": c["hits_2k"] / n,
            "bytes_ratio_k": c["bytes_k"] / nb, "bytes_ratio_2k": c["bytes_2k"] / nb,
            "operating_point": {"ratio_cap": ratio, "recall": c["hits_op"] / n, "bytes_ratio": c["bytes_op"] / nb,
                                "precision": c["hits_op"] / max(1, c["fetched_op"])},
            "curve": [{"read": int(key[5:]), "recall": c[key] / n, "bytes_ratio": c["bytes@" + key[5:]] / nb}
                      for key in c if key.startswith("hits@")]}


def evaluate(predictor: Predictor, trace: RoutingTrace, sizes: np.ndarray, ratio: float = DEFAULT_RATIO,
             first: int = 1) -> dict[str, Any]:
    """Next-layer recall of a predictor on a (held-out) trace, per MoE layer and overall.

    recall_k / recall_2k: share of the experts layer l+1 used that were among the k / 2k
    likeliest guesses; bytes_ratio_*: bytes of those guesses / bytes of the experts used.
    operating_point: read guesses in order within ratio x the layer's mean bytes per
    token (what the prefetcher does). sizes [M, E] bytes per expert.
    """
    k = trace.top_k
    caps = layer_byte_cap(sizes, k, ratio)
    per, total = [], None
    for n in range(max(1, first), trace.experts.shape[1]):
        c = _score(predictor.trace_probs(trace, n), trace.experts[:, n], sizes[n].astype(np.float64), caps[n], k)
        per.append({"moe_index": n, **_summarize(c, k, ratio)})
        total = c if total is None else {key: total[key] + c[key] for key in c}
    return {"name": predictor.name, "layers": per, "overall": _summarize(total, k, ratio) if total else {}}


def evaluate_all(table: TransitionTable, trace: RoutingTrace, sizes: np.ndarray,
                 ratio: float = DEFAULT_RATIO) -> dict[str, Any]:
    """Table (order 1 and 2) and every look-ahead the trace recorded."""
    out = {"table_l": evaluate(TablePredictor(table, order=1), trace, sizes, ratio),
           "table": evaluate(TablePredictor(table, order=2), trace, sizes, ratio)}
    out["table_l"]["name"] = "table_l"
    for key in trace.lookahead:
        p = RecordedPredictor(trace.top_k, key)
        out[p.name] = evaluate(p, trace, sizes, ratio)
    return out


# -- live prefetch ---------------------------------------------------------------------
def native_async_prefetch(cache: Any) -> bool:
    """Does this cache take `prefetch(layer, experts, max_bytes=0)` (non-blocking reads)?
    Every ExpertCache since a5b2a44 does; the Prefetcher no longer asks."""
    fn = getattr(cache, "prefetch", None)
    return fn is not None and hasattr(cache, "cancel_prefetches") and "max_bytes" in (fn.__doc__ or "")


class Prefetcher(RouteObserver):
    """Watches the forward pass; when MoE layer l's routing (or output) is known, asks the
    predictor for layer l+1 and queues those reads in the cache, most likely first,
    within ratio x the bytes a token needs. Keeps per-layer prediction statistics.

    mode: "async" (the cache's I/O threads read while layer l computes), "blocking"
    (reads one by one after layer l: for tests, never faster) or "off" (predict and
    count only).
    """

    MODES = ("async", "blocking", "off")

    def __init__(self, model: "Model", predictor: Predictor, ratio: float = DEFAULT_RATIO,
                 min_prob: float = 0.0, mode: str = "async"):
        if mode not in self.MODES:
            raise ValueError(f"prefetch mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.cache, self.predictor = model.cache, predictor
        self.moe_layers = list(model.manifest["experts"]["moe_layers"])
        self.pos = {layer: m for m, layer in enumerate(self.moe_layers)}
        self.sizes = expert_sizes(model).astype(np.float64)
        self.size_lists = self.sizes.tolist()
        self.caps = layer_byte_cap(self.sizes, predictor.top_k, ratio).tolist()
        self.ratio, self.min_prob = ratio, min_prob
        self.mode = mode
        self.ctx = RouteContext.empty(len(self.moe_layers))
        self.pending: list[list[int] | None] = [None] * len(self.moe_layers)  # guesses per target layer
        self.reset_stats()

    STATS = ("predictions", "issued", "needed", "hits", "issued_bytes", "needed_bytes", "hit_bytes")

    def reset_stats(self) -> None:
        self.counts = [[0.0] * len(self.STATS) for _ in self.moe_layers]  # per MoE layer, as STATS

    def _record(self, m: int, ids: np.ndarray) -> None:
        guess = self.pending[m]
        if guess is None:
            return
        self.pending[m] = None
        needed = set(ids.ravel().tolist())
        hit = needed.intersection(guess)
        s = self.size_lists[m]
        c = self.counts[m]
        c[0] += 1
        c[1] += len(guess)
        c[2] += len(needed)
        c[3] += len(hit)
        c[4] += sum(s[e] for e in guess)
        c[5] += sum(s[e] for e in needed)
        c[6] += sum(s[e] for e in hit)

    def _issue(self, m: int) -> None:
        n = m + 1
        if n >= len(self.moe_layers):
            return
        ids, q = self.predictor.predict(n, self.ctx)
        chosen = choose(ids, q, self.size_lists[n], self.caps[n], self.min_prob)
        self.pending[n] = chosen
        layer = self.moe_layers[n]
        if self.mode == "async":
            self.cache.prefetch(layer, chosen, max_bytes=int(self.caps[n]))
        elif self.mode == "blocking":
            for e in chosen:
                try:
                    self.cache.load(layer, e)
                except Exception:  # the budget is full of pinned experts: a prefetch is only a hint
                    break

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        m = self.pos[layer]
        if m == 0:
            self.ctx = RouteContext.empty(len(self.moe_layers))
        self._record(m, ids)
        self.ctx.experts[m], self.ctx.weights[m] = ids, weights
        self.ctx.hidden["moe_in"] = resid
        if self.mode == "async":
            self.cache.cancel_prefetches(layer)  # guesses for this layer not yet read are stale now
        if self.predictor.point == "route" and self.mode != "blocking":
            self._issue(m)

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        m = self.pos.get(layer)
        if m is None:
            return
        self.ctx.hidden["layer_out"] = h
        if self.predictor.point == "layer_out" or self.mode == "blocking":
            self._issue(m)

    def stats(self) -> dict[str, Any]:
        """Prediction recall and precision (experts), bytes issued / bytes needed, wasted bytes
        (issued, not needed), overall and per MoE layer. In mode "off", "issued" means
        what would have been read. The cache's own layer_stats() say what was read, hit,
        dropped and wasted, and how long moe_forward stalled."""
        c = np.asarray(self.counts).reshape(len(self.moe_layers), len(self.STATS))

        def summary(sl: Any) -> dict[str, float]:
            _, issued, needed, hits, issued_b, needed_b, hit_b = np.atleast_2d(c[sl]).sum(axis=0)
            return {"recall": float(hits / needed) if needed else 0.0,
                    "precision": float(hits / issued) if issued else 0.0,
                    "bytes_ratio": float(issued_b / needed_b) if needed_b else 0.0,
                    "issued_bytes": int(issued_b), "wasted_bytes": int(issued_b - hit_b)}

        return {"predictor": self.predictor.name, "mode": self.mode, "ratio": self.ratio,
                **summary(slice(None)),
                "layers": [{"moe_index": m, "layer": self.moe_layers[m], **summary(m)}
                           for m in range(1, len(self.moe_layers))]}


class _Clock(RouteObserver):
    def __init__(self, moe_layers: Sequence[int]):
        self.pos = {layer: m for m, layer in enumerate(moe_layers)}
        self.routed: list[tuple[int, float]] = []
        self.done: dict[int, float] = {}
        self.gaps: dict[str, list[list[float]]] = {p: [[] for _ in moe_layers] for p in LOOKAHEAD_POINTS}

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        now, m = time.perf_counter(), self.pos[layer]
        if m > 0 and self.routed and self.routed[-1][0] == m - 1:
            self.gaps["moe_in"][m].append(now - self.routed[-1][1])
            self.gaps["layer_out"][m].append(now - self.done[m - 1])
        self.routed.append((m, now))

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        if layer in self.pos:
            self.done[self.pos[layer]] = time.perf_counter()


def lead_times(model: "Model", prompt: Sequence[int], new_tokens: int = 16) -> dict[str, Any]:
    """Decode-time seconds between the moment a guess for MoE layer n can be issued and the
    moment layer n routes (median per layer): from layer n-1's routing ("moe_in") or from
    its output ("layer_out"). A prefetch read that takes longer than this still stalls."""
    clock = _Clock(model.manifest["experts"]["moe_layers"])
    inner, model.net.observer = model.net.observer, clock
    try:
        model.generate(list(prompt), max_new_tokens=1)  # prefill, not measured
        clock.gaps = {p: [[] for _ in clock.pos] for p in LOOKAHEAD_POINTS}
        model.generate(list(prompt), max_new_tokens=new_tokens + 1)
    finally:
        model.net.observer = inner
    return {p: [float(np.median(g[1:])) if len(g) > 1 else None for g in gaps]  # g[0]: the prefill pass
            for p, gaps in clock.gaps.items()}


def make_predictor(model: "Model", kind: str, point: str | None = None, order: int = 2) -> Predictor:
    """'table' (needs routing.json), 'lookahead' (the router) or 'fitted' (needs routing.safetensors).
    A look-ahead's point comes from `point` or a suffix ('lookahead:layer_out'); default moe_in."""
    kind, _, suffix = kind.partition(":")
    point = point or suffix or "moe_in"
    k = model.manifest["experts"]["top_k"]
    moe_layers = model.manifest["experts"]["moe_layers"]
    if kind == "table":
        return TablePredictor.from_model_dir(model.path, order=order)
    if kind == "lookahead":
        return LookaheadPredictor(model.net, moe_layers, k, point)
    if kind == "fitted":
        fits = load_fits(model.path, model.config.rms_norm_eps)
        if point not in fits:
            raise ModelDirectoryError(f"{model.path} has no fitted look-ahead ({FIT_FILE}, point {point}): profile "
                                      f"the model with `edgemoe profile {model.path} --calib TEXT_FILE`, or use "
                                      f"prefetch='lookahead'")
        return LookaheadPredictor(model.net, moe_layers, k, point, fit=fits[point])
    raise ValueError(f"unknown predictor {kind!r}: choose one of {', '.join(PREDICTORS)} (or None for no prefetch)")


def attach_prefetcher(model: "Model", kind: str, ratio: float = DEFAULT_RATIO, mode: str = "async",
                      min_prob: float = 0.0, **kwargs: Any) -> Prefetcher:
    """Build the predictor and install a Prefetcher on the model's forward pass."""
    pf = Prefetcher(model, make_predictor(model, kind, **kwargs), ratio=ratio, min_prob=min_prob, mode=mode)
    model.net.observer = pf
    return pf
