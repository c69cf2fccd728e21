"""Next-layer expert predictors and the prefetcher that hands their guesses to the
expert cache while the current layer computes (how well they do is measured offline,
in edgemoe.planning.predictors).

Two predictors with one interface, `predict(m_next, ctx) -> (ids, probs)`, ids in
decreasing probability of being needed by MoE layer m_next (a moe index, see
runtime/trace.py) for the tokens in flight:

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..errors import EdgeMoEError, ModelDirectoryError
from ..format.manifest import blob_tables, page_bytes
from ..format.routing_file import load_routing
from ..format.safetensors import read_safetensors, write_safetensors
from ..models.blocks import RouteObserver, route_softmax_topk, softmax
from .options import DEFAULT_PREFETCH_RATIO as DEFAULT_RATIO
from .options import LOOKAHEAD_POINTS, PREDICTORS
from .trace import RoutingTrace, lookahead_logits

FIT_FILE = "routing.safetensors"


@dataclasses.dataclass
class RouteContext:
    """What is known about the tokens in flight: per MoE index the routed experts and
    gate weights ([T, k], None until routed) and the hidden states a look-ahead reads."""

    experts: list[np.ndarray | None]
    weights: list[np.ndarray | None]
    hidden: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, num_moe_layers: int) -> RouteContext:
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


class TransitionTable:
    """EdgeMoE's table: counts of expert paths between consecutive MoE layers.

    c0[n, j]        tokens routed to expert j at layer n
    c1[n, i, j]     pairs (i at n-1, j at n)               (n >= 1)
    c2[n, h, i, j]  triples (h at n-2, i at n-1, j at n)   (n >= 2)
    A token with k experts per layer adds k^2 pairs and k^3 triples.

    `probs` turns them into P(expert j at n | experts at n-2, n-1) for each slot,
    Dirichlet-smoothed towards the lower order: an unseen (h, i) falls back to
    P(j | i), an unseen i to layer n's frequency.
    """

    def __init__(self, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, top_k: int, smoothing: float | None = None):
        self.c0, self.c1, self.c2 = c0.astype(np.float64), c1.astype(np.float64), c2.astype(np.float64)
        self.top_k = int(top_k)
        self.M, self.E = c0.shape
        self.smoothing = float(smoothing if smoothing is not None else top_k)
        self._p: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (p0, p1, p2), made on first use

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._p is None:
            b = self.smoothing
            p0 = (self.c0 + 1.0) / (self.c0.sum(axis=1, keepdims=True) + self.E)  # [M, E]
            p1 = (self.c1 + b * p0[:, None, :]) / (self.c1.sum(axis=2, keepdims=True) + b)  # [M, E, E]
            p2 = (self.c2 + b * p1[:, None, :, :]) / (self.c2.sum(axis=3, keepdims=True) + b)  # [M, E, E, E]
            self._p = p0, p1, p2
        return self._p

    def probs(
        self,
        n: int,
        prev1: np.ndarray | None,
        prev2: np.ndarray | None = None,
        w1: np.ndarray | None = None,
        w2: np.ndarray | None = None,
    ) -> np.ndarray:
        """Slot probabilities [T, E] of MoE layer n's experts (rows sum to 1).

        prev1 [T, k]: experts at n-1; prev2 [T, k]: experts at n-2 (None: first order
        only). w1, w2: their gate weights, to weight the contexts (None: equal weights).
        """
        p0, p1, p2 = self._tables()
        if prev1 is None or n == 0:
            return np.broadcast_to(p0[n], (1 if prev1 is None else len(prev1), self.E)).copy()
        prev1 = np.asarray(prev1, np.int64)
        if prev2 is None or n < 2:
            rows = p1[n][prev1]  # [T, k, E]
            a = np.ones(prev1.shape) if w1 is None else np.asarray(w1, np.float64)
        else:
            prev2 = np.asarray(prev2, np.int64)
            rows = p2[n][prev2[:, :, None], prev1[:, None, :]]  # [T, k, k, E]
            rows = rows.reshape(len(prev1), -1, self.E)
            a1 = np.ones(prev1.shape) if w1 is None else np.asarray(w1, np.float64)
            a2 = np.ones(prev2.shape) if w2 is None else np.asarray(w2, np.float64)
            a = (a2[:, :, None] * a1[:, None, :]).reshape(len(prev1), -1)
        a = a / a.sum(axis=1, keepdims=True)
        return np.einsum("tc,tce->te", a, rows)

    # -- routing.json --------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def sparse(c: np.ndarray) -> list[list[int]]:
            idx = np.argwhere(c > 0)
            return np.concatenate([idx, c[tuple(idx.T)][:, None]], axis=1).astype(np.int64).tolist()

        return {
            "smoothing": self.smoothing,
            "first_order": {str(n): sparse(self.c1[n]) for n in range(1, self.M)},
            "second_order": {str(n): sparse(self.c2[n]) for n in range(2, self.M)},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], usage: np.ndarray, top_k: int) -> TransitionTable:
        M, E = usage.shape
        c1 = np.zeros((M, E, E), np.int64)
        c2 = np.zeros((M, E, E, E), np.int64)
        for key, c in (("first_order", c1), ("second_order", c2)):
            for n, rows in d.get(key, {}).items():
                if rows:
                    a = np.asarray(rows, np.int64)
                    c[int(n)][tuple(a[:, :-1].T)] = a[:, -1]
        return cls(np.asarray(usage), c1, c2, top_k, d.get("smoothing"))


def table_from_routing(doc: dict[str, Any]) -> TransitionTable:
    """The transition table kept in a routing.json document."""
    return TransitionTable.from_json(doc["table"], np.asarray(doc["usage"], np.int64), doc["top_k"])


class TablePredictor(Predictor):
    """EdgeMoE's table. order 2: condition on (l-1, l); order 1: on l alone.
    weighted: weight each context expert by its gate weight (default: equal)."""

    name = "table"

    def __init__(self, table: TransitionTable, order: int = 2, weighted: bool = False):
        super().__init__(table.top_k)
        self.table, self.order, self.weighted = table, order, weighted

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs: Any) -> TablePredictor:
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
    path = Path(model_dir) / FIT_FILE
    if not path.exists():
        return {}
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, (a, _) in read_safetensors(path).items():
        _, point, n, what = name.split(".")
        found.setdefault(point, {}).setdefault(int(n), {})[what] = np.array(a, np.float32)
    return {
        p: LookaheadFit(p, {n: (d["weight"], d["bias"]) for n, d in sorted(layers.items())}, eps)
        for p, layers in found.items()
    }


class LookaheadPredictor(Predictor):
    """Gate look-ahead from layer l's hidden state at `point` ("moe_in" or "layer_out"),
    through the router itself or, given `fit`, through the fitted map."""

    def __init__(
        self, net: Any, moe_layers: Sequence[int], top_k: int, point: str = "moe_in", fit: LookaheadFit | None = None
    ):
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
            raise EdgeMoEError(
                f"this trace has no '{self.key}' look-ahead probabilities: record it with lookahead=True (and the fits)"
            )
        return trace.lookahead[self.key][:, m_next - 1].astype(np.float32)


def expert_sizes(model: Any) -> np.ndarray:
    """[M, E] bytes one read of each expert moves (blob length rounded up to 4 KiB, as O_DIRECT reads)."""
    _, lengths, _, _ = blob_tables(model.manifest)
    return page_bytes(lengths[model.manifest["experts"]["moe_layers"]])


# -- choosing what to read ------------------------------------------------------------
def choose(
    ids: np.ndarray, probs: np.ndarray, sizes: Sequence[float], max_bytes: float, min_prob: float = 0.0
) -> list[int]:
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


# -- live prefetch ---------------------------------------------------------------------
class Prefetcher(RouteObserver):
    """Watches the forward pass; when MoE layer l's routing (or output) is known, asks the
    predictor for layer l+1 and queues those reads in the cache, most likely first,
    within ratio x the bytes a token needs. Keeps per-layer prediction statistics.

    mode: "async" (the cache's I/O threads read while layer l computes), "blocking"
    (reads one by one after layer l: for tests, never faster) or "off" (predict and
    count only).
    """

    MODES = ("async", "blocking", "off")

    def __init__(
        self, model: Any, predictor: Predictor, ratio: float = DEFAULT_RATIO, min_prob: float = 0.0, mode: str = "async"
    ):
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
            return {
                "recall": float(hits / needed) if needed else 0.0,
                "precision": float(hits / issued) if issued else 0.0,
                "bytes_ratio": float(issued_b / needed_b) if needed_b else 0.0,
                "issued_bytes": int(issued_b),
                "wasted_bytes": int(issued_b - hit_b),
            }

        return {
            "predictor": self.predictor.name,
            "mode": self.mode,
            "ratio": self.ratio,
            **summary(slice(None)),
            "layers": [
                {"moe_index": m, "layer": self.moe_layers[m], **summary(m)} for m in range(1, len(self.moe_layers))
            ],
        }


def make_predictor(model: Any, kind: str, point: str | None = None, order: int = 2) -> Predictor:
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
            raise ModelDirectoryError(
                f"{model.path} has no fitted look-ahead ({FIT_FILE}, point {point}): profile "
                f"the model with `edgemoe profile {model.path} --calib TEXT_FILE`, or use "
                f"prefetch='lookahead'"
            )
        return LookaheadPredictor(model.net, moe_layers, k, point, fit=fits[point])
    raise ValueError(f"unknown predictor {kind!r}: choose one of {', '.join(PREDICTORS)} (or None for no prefetch)")


def attach_prefetcher(
    model: Any, kind: str, ratio: float = DEFAULT_RATIO, mode: str = "async", min_prob: float = 0.0, **kwargs: Any
) -> Prefetcher:
    """Build the predictor and install a Prefetcher on the model's forward pass."""
    pf = Prefetcher(model, make_predictor(model, kind, **kwargs), ratio=ratio, min_prob=min_prob, mode=mode)
    model.net.observer = pf
    return pf
