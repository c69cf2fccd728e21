"""Prefetch predictors offline: fitting the gate look-ahead on calibration text, scoring
every predictor on a held-out trace (recall, bytes read per byte needed), and timing how
early each look-ahead point is known in decode."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..models.blocks import RouteObserver
from ..runtime.engine import Model
from ..runtime.options import LOOKAHEAD_POINTS
from ..runtime.prefetch import DEFAULT_RATIO, LookaheadFit, Predictor, TablePredictor, TransitionTable, layer_byte_cap
from ..runtime.trace import ChainedObserver, RoutingTrace


class LookaheadFitter(ChainedObserver):
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
            x = np.ascontiguousarray(
                resid / np.sqrt(np.mean(resid * resid, -1, keepdims=True) + self.net.cfg.rms_norm_eps) * L.ffn_norm,
                np.float32,
            )
            z = L.moe.router(x).astype(np.float64)  # the logits this layer's router gave
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
                W0 = router_matrix(L.moe.router, len(L.ffn_norm)) * L.ffn_norm[None, :]  # [E, H]
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


class RecordedPredictor(Predictor):
    """Look-ahead probabilities already recorded in a trace under `key` (no model needed)."""

    def __init__(self, top_k: int, key: str = "moe_in"):
        super().__init__(top_k)
        self.key = key
        self.name = f"lookahead_{key}" if key in LOOKAHEAD_POINTS else key

    def trace_probs(self, trace: RoutingTrace, m_next: int) -> np.ndarray:
        return trace.lookahead[self.key][:, m_next - 1].astype(np.float32)


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
    out = {
        "tokens": T,
        "needed": T * k,
        "needed_bytes": needed_bytes,
        "hits_k": int(hit_sorted[:, :k].sum()),
        "hits_2k": int(hit_sorted[:, : 2 * k].sum()),
        "bytes_k": float(cum_bytes[:, k - 1].sum()),
        "bytes_2k": float(cum_bytes[:, min(2 * k, E) - 1].sum()),
        "hits_op": int((hit_sorted & fetched).sum()),
        "bytes_op": float((sizes[order] * fetched).sum()),
        "fetched_op": int(fetched.sum()),
    }
    for c in range(1, min(2 * k, E) + 1):  # recall and bytes if we always read the c likeliest
        out[f"hits@{c}"] = int(hit_sorted[:, :c].sum())
        out[f"bytes@{c}"] = float(cum_bytes[:, c - 1].sum())
    return out


def _summarize(c: dict[str, float], k: int, ratio: float) -> dict[str, Any]:
    n, nb = max(1, c["needed"]), max(1.0, c["needed_bytes"])
    return {
        "recall_k": c["hits_k"] / n,
        "recall_2k": c["hits_2k"] / n,
        "bytes_ratio_k": c["bytes_k"] / nb,
        "bytes_ratio_2k": c["bytes_2k"] / nb,
        "operating_point": {
            "ratio_cap": ratio,
            "recall": c["hits_op"] / n,
            "bytes_ratio": c["bytes_op"] / nb,
            "precision": c["hits_op"] / max(1, c["fetched_op"]),
        },
        "curve": [
            {"read": int(key[5:]), "recall": c[key] / n, "bytes_ratio": c["bytes@" + key[5:]] / nb}
            for key in c
            if key.startswith("hits@")
        ],
    }


def evaluate(
    predictor: Predictor, trace: RoutingTrace, sizes: np.ndarray, ratio: float = DEFAULT_RATIO, first: int = 1
) -> dict[str, Any]:
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


def evaluate_all(
    table: TransitionTable, trace: RoutingTrace, sizes: np.ndarray, ratio: float = DEFAULT_RATIO
) -> dict[str, Any]:
    """Table (order 1 and 2) and every look-ahead the trace recorded."""
    out = {
        "table_l": evaluate(TablePredictor(table, order=1), trace, sizes, ratio),
        "table": evaluate(TablePredictor(table, order=2), trace, sizes, ratio),
    }
    out["table_l"]["name"] = "table_l"
    for key in trace.lookahead:
        p = RecordedPredictor(trace.top_k, key)
        out[p.name] = evaluate(p, trace, sizes, ratio)
    return out


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


def lead_times(model: Model, prompt: Sequence[int], new_tokens: int = 16) -> dict[str, Any]:
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
    return {
        p: [float(np.median(g[1:])) if len(g) > 1 else None for g in gaps]  # g[0]: the prefill pass
        for p, gaps in clock.gaps.items()
    }
