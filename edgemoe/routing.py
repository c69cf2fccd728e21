"""Routing traces and routing statistics: which experts every token uses in every
MoE layer, how skewed that use is, and how predictable layer l+1's experts are
from the experts of layers l-1 and l (EdgeMoE's table, kept in routing.json).

    m = edgemoe.load("model-dir")
    trace = collect_trace(m, "calib.txt", window=256, max_tokens=50_000)   # RoutingTrace
    trace.experts                      # int16 [tokens, moe_layers, top_k], router order
    profile_model("model-dir", "calib.txt", eval_file="val.txt")          # writes model-dir/routing.json

MoE layers are numbered by position ("moe index" m = 0..M-1) in
manifest["experts"]["moe_layers"], which maps them to model layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import EdgeMoEError, ModelDirectoryError
from . import _core
from .models.base import RouteObserver, softmax

if TYPE_CHECKING:
    from .model import Model

ROUTING_FILE = "routing.json"
ROUTING_VERSION = 1
LOOKAHEAD_POINTS = ("moe_in", "layer_out")


# -- traces ------------------------------------------------------------------------
@dataclasses.dataclass
class RoutingTrace:
    """Per token, per MoE layer, the routed experts (tokens in the order they were run).

    experts  int16 [T, M, k]  expert ids, largest gate weight first
    weights  float32 [T, M, k] their gate weights as the model applies them
    lookahead  name -> float16 [T, M, E]: row m holds MoE layer m+1's router
        probabilities computed from layer m's hidden state ("moe_in": the residual
        stream at layer m's MoE input; "layer_out": after layer m's residual add;
        "fitted_moe_in" / "fitted_layer_out": the same through a look-ahead fitted on
        calibration, see predict.LookaheadFit). Row M-1 is unused (zeros). Empty when
        not recorded.
    ids      int32 [T] the tokens (None when not kept)
    """

    experts: np.ndarray
    weights: np.ndarray
    moe_layers: list[int]
    num_experts: int
    lookahead: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ids: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, sl: slice) -> "RoutingTrace":
        return RoutingTrace(self.experts[sl], self.weights[sl], list(self.moe_layers), self.num_experts,
                            {p: a[sl] for p, a in self.lookahead.items()}, None if self.ids is None else self.ids[sl])

    @staticmethod
    def concat(traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        first = traces[0]
        points = set.intersection(*(set(t.lookahead) for t in traces))
        return RoutingTrace(np.concatenate([t.experts for t in traces]), np.concatenate([t.weights for t in traces]),
                            list(first.moe_layers), first.num_experts,
                            {p: np.concatenate([t.lookahead[p] for t in traces]) for p in sorted(points)},
                            None if any(t.ids is None for t in traces) else np.concatenate([t.ids for t in traces]))

    def save(self, path: str | Path) -> None:
        """An .npz file (numpy only)."""
        arrays = {"experts": self.experts, "weights": self.weights, "moe_layers": np.asarray(self.moe_layers),
                  "num_experts": np.asarray(self.num_experts)}
        arrays.update({f"lookahead_{p}": a for p, a in self.lookahead.items()})
        if self.ids is not None:
            arrays["ids"] = self.ids
        with open(path, "wb") as f:  # np.savez would append .npz to a str path
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with np.load(path) as z:
            return cls(z["experts"], z["weights"], [int(x) for x in z["moe_layers"]], int(z["num_experts"]),
                       {k[len("lookahead_"):]: z[k] for k in z.files if k.startswith("lookahead_")},
                       z["ids"] if "ids" in z.files else None)


def lookahead_logits(net: Any, layer: int, h: np.ndarray) -> np.ndarray:
    """Model layer `layer`'s router logits [T, E] applied to a hidden state h [T, hidden]
    taken from an earlier layer (with `layer`'s own ffn_norm): HOBBIT's gate look-ahead."""
    L = net.layers[layer]
    return L["router"](_core.rms_norm(np.ascontiguousarray(h, np.float32), L["ffn_norm"], net.cfg.rms_norm_eps))


def lookahead_probs(net: Any, layer: int, h: np.ndarray) -> np.ndarray:
    """The same as probabilities [T, E]."""
    return softmax(lookahead_logits(net, layer, h))


# name -> (point, fn(next moe index, hidden state [T, hidden]) -> probabilities [T, E])
Lookaheads = dict[str, tuple[str, Callable[[int, np.ndarray], np.ndarray]]]


def router_lookaheads(net: Any, moe_layers: Sequence[int], fits: dict[str, Any] | None = None) -> Lookaheads:
    """The gate look-ahead at both points, and the fitted ones given (point -> predict.LookaheadFit)."""
    out: Lookaheads = {p: (p, lambda n, h: lookahead_probs(net, moe_layers[n], h)) for p in LOOKAHEAD_POINTS}
    for p, fit in (fits or {}).items():
        out[f"fitted_{p}"] = (p, fit.probs)
    return out


class TraceRecorder(RouteObserver):
    """Collects routing (and, optionally, look-ahead probabilities) as the model runs.
    Forwards every hook to `inner` (e.g. a prefetcher) so both can watch one run."""

    def __init__(self, net: Any, moe_layers: Sequence[int], lookahead: Lookaheads | None = None,
                 inner: RouteObserver | None = None):
        self.net, self.moe_layers, self.inner = net, list(moe_layers), inner
        self.pos = {layer: m for m, layer in enumerate(self.moe_layers)}
        M = len(self.moe_layers)
        self.ids: list[list[np.ndarray]] = [[] for _ in range(M)]
        self.w: list[list[np.ndarray]] = [[] for _ in range(M)]
        self.fns = dict(lookahead or {})
        self.la: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in range(M)] for name in self.fns}

    def _look(self, point: str, m: int, h: np.ndarray) -> None:
        if m + 1 < len(self.moe_layers):
            for name, (p, fn) in self.fns.items():
                if p == point:
                    self.la[name][m].append(fn(m + 1, h).astype(np.float16))

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        m = self.pos[layer]
        self.ids[m].append(ids.astype(np.int16))
        self.w[m].append(np.asarray(weights, np.float32).copy())
        self._look("moe_in", m, resid)
        if self.inner is not None:
            self.inner.on_route(layer, resid, ids, weights)

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        m = self.pos.get(layer)
        if m is not None:
            self._look("layer_out", m, h)
        if self.inner is not None:
            self.inner.on_layer_out(layer, h)

    def trace(self) -> RoutingTrace:
        M, E = len(self.moe_layers), self.net.cfg.num_experts
        experts = np.stack([np.concatenate(x) for x in self.ids], axis=1)  # [T, M, k]
        weights = np.stack([np.concatenate(x) for x in self.w], axis=1)
        T = experts.shape[0]
        lookahead = {}
        for p, rows in self.la.items():
            a = np.zeros((T, M, E), np.float16)
            for m in range(M - 1):
                a[:, m] = np.concatenate(rows[m])
            lookahead[p] = a
        return RoutingTrace(experts, weights, list(self.moe_layers), E, lookahead)


def trace_routing(model: "Model", prompt: str | Sequence[int], window: int | None = None,
                  lookahead: bool = True, fits: dict[str, Any] | None = None,
                  observer: RouteObserver | None = None) -> RoutingTrace:
    """Run a prompt (text or token ids) through the model and record its routing.

    window: prefill windows of this many tokens, the KV cache reset before each
    (None: one window). lookahead: also record the gate look-ahead at both points,
    and through `fits` (point -> predict.LookaheadFit). observer: one more watcher
    of the run (e.g. predict.LookaheadFitter). The model's own observer keeps running.
    """
    ids = model.encode(prompt) if isinstance(prompt, str) else list(prompt)
    arr = model._check_ids(ids)
    window = window or len(arr)
    net = model.net
    moe_layers = model.manifest["experts"]["moe_layers"]
    fns = router_lookaheads(net, moe_layers, fits) if lookahead else {}
    saved = net.observer
    if observer is not None:
        observer.inner = saved
    rec = TraceRecorder(net, moe_layers, fns, inner=observer if observer is not None else saved)
    net.observer = rec
    try:
        for s in range(0, len(arr), window):
            model.reset()
            net.forward(arr[s:s + window], model.kv, 0, all_logits=False)
    finally:
        net.observer = saved
    trace = rec.trace()
    trace.ids = arr.astype(np.int32)
    return trace


def read_token_stream(model: "Model", path: str | Path, max_tokens: int | None = None, seed: int = 0) -> np.ndarray:
    """Token ids of a text file. Documents (separated by a line holding only \\x1e) each
    start with BOS; with max_tokens they are taken in a seeded random order so a cap
    still samples the whole file."""
    from .evaluate import read_text, split_documents

    docs = split_documents(read_text(path))
    if not docs:
        raise EdgeMoEError(f"{path} holds no text: give a UTF-8 text file to profile on")
    if len(docs) == 1:  # one long document: encode it in pieces of whole lines
        lines, docs, cur, size = docs[0].splitlines(keepends=True), [], [], 0
        for line in lines:
            cur.append(line)
            size += len(line)
            if size > 16384:
                docs.append("".join(cur))
                cur, size = [], 0
        docs.append("".join(cur))
        order: Sequence[int] = range(len(docs))
        bos_each = False
    else:
        order = np.random.default_rng(seed).permutation(len(docs)) if max_tokens else range(len(docs))
        bos_each = True
    out: list[int] = []
    for n, i in enumerate(order):
        if bos_each or n == 0:
            if model.bos_id is not None:
                out.append(int(model.bos_id))
        out.extend(model.encode(docs[i]))
        if max_tokens and len(out) >= max_tokens:
            break
    return np.asarray(out[:max_tokens] if max_tokens else out, np.int64)


def collect_trace(model: "Model", path: str | Path, window: int = 256, max_tokens: int | None = None,
                  lookahead: bool = True, seed: int = 0, fits: dict[str, Any] | None = None) -> RoutingTrace:
    """Routing trace of a text file: prefill windows of `window` tokens (KV cache reset per window)."""
    ids = read_token_stream(model, path, max_tokens, seed)
    return trace_routing(model, ids, window=window, lookahead=lookahead, fits=fits)


# -- statistics --------------------------------------------------------------------
def usage_counts(trace: RoutingTrace) -> np.ndarray:
    """[M, E] number of tokens routed to each expert of each MoE layer."""
    T, M, k = trace.experts.shape
    E = trace.num_experts
    flat = (np.arange(M)[None, :, None] * E + trace.experts.astype(np.int64)).ravel()
    return np.bincount(flat, minlength=M * E).reshape(M, E)


def usage_stats(counts: np.ndarray) -> list[dict[str, float]]:
    """Per layer: entropy relative to uniform (1.0 = every expert used equally), the share
    of activations taken by the 25% most used experts (0.25 when uniform), max/min shares."""
    out = []
    E = counts.shape[1]
    q = max(1, math.ceil(E / 4))
    for c in counts:
        p = c / max(1, c.sum())
        nz = p[p > 0]
        out.append({"entropy": float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 1.0,
                    "top_quarter_share": float(np.sort(p)[::-1][:q].sum()),
                    "max_share": float(p.max()), "min_share": float(p.min())})
    return out


def path_coverage(trace: RoutingTrace, fraction: float = 0.2) -> list[float | None]:
    """Per MoE layer n >= 2: the share of expert paths (e at n-2, e' at n-1, e'' at n) that
    fall on the `fraction` most frequent of the E^3 possible paths. A token routed to k
    experts per layer walks k^3 paths. EdgeMoE: 20% of paths cover >99% of tokens;
    uniform routing gives about `fraction`."""
    E = trace.num_experts
    x = trace.experts.astype(np.int64)
    out: list[float | None] = []
    for n in range(trace.experts.shape[1]):
        if n < 2:
            out.append(None)
            continue
        keys = (x[:, n - 2, :, None, None] * E + x[:, n - 1, None, :, None]) * E + x[:, n, None, None, :]
        c = np.sort(np.bincount(keys.ravel(), minlength=E ** 3))[::-1]
        top = max(1, int(round(fraction * E ** 3)))
        out.append(float(c[:top].sum() / max(1, c.sum())))
    return out


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
        self._p0 = self._p1 = self._p2 = None

    @classmethod
    def fit(cls, trace: RoutingTrace, smoothing: float | None = None) -> "TransitionTable":
        T, M, k = trace.experts.shape
        E = trace.num_experts
        x = trace.experts.astype(np.int64)
        c0 = usage_counts(trace)
        c1 = np.zeros((M, E, E), np.int64)
        c2 = np.zeros((M, E, E, E), np.int64)
        for n in range(1, M):
            keys = x[:, n - 1, :, None] * E + x[:, n, None, :]
            c1[n] = np.bincount(keys.ravel(), minlength=E * E).reshape(E, E)
            if n >= 2:
                keys = (x[:, n - 2, :, None, None] * E + x[:, n - 1, None, :, None]) * E + x[:, n, None, None, :]
                c2[n] = np.bincount(keys.ravel(), minlength=E ** 3).reshape(E, E, E)
        return cls(c0, c1, c2, k, smoothing)

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._p0 is None:
            b = self.smoothing
            p0 = (self.c0 + 1.0) / (self.c0.sum(axis=1, keepdims=True) + self.E)  # [M, E]
            p1 = (self.c1 + b * p0[:, None, :]) / (self.c1.sum(axis=2, keepdims=True) + b)  # [M, E, E]
            p2 = (self.c2 + b * p1[:, None, :, :]) / (self.c2.sum(axis=3, keepdims=True) + b)  # [M, E, E, E]
            self._p0, self._p1, self._p2 = p0, p1, p2
        return self._p0, self._p1, self._p2

    def probs(self, n: int, prev1: np.ndarray | None, prev2: np.ndarray | None = None,
              w1: np.ndarray | None = None, w2: np.ndarray | None = None) -> np.ndarray:
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

        return {"smoothing": self.smoothing,
                "first_order": {str(n): sparse(self.c1[n]) for n in range(1, self.M)},
                "second_order": {str(n): sparse(self.c2[n]) for n in range(2, self.M)}}

    @classmethod
    def from_json(cls, d: dict[str, Any], usage: np.ndarray, top_k: int) -> "TransitionTable":
        M, E = usage.shape
        c1 = np.zeros((M, E, E), np.int64)
        c2 = np.zeros((M, E, E, E), np.int64)
        for key, c in (("first_order", c1), ("second_order", c2)):
            for n, rows in d.get(key, {}).items():
                if rows:
                    a = np.asarray(rows, np.int64)
                    c[int(n)][tuple(a[:, :-1].T)] = a[:, -1]
        return cls(np.asarray(usage), c1, c2, top_k, d.get("smoothing"))


# -- routing.json --------------------------------------------------------------------
def build_routing(calib: RoutingTrace, eval_trace: RoutingTrace | None = None, sizes: np.ndarray | None = None,
                  source: dict[str, Any] | None = None, ratio: float = 1.5) -> dict[str, Any]:
    """The routing.json document: usage and path statistics of the calibration trace, the
    transition table fitted on it, and (with eval_trace) how well each predictor does
    on held-out tokens. sizes [M, E]: bytes per expert (for the prefetched/needed ratio)."""
    from . import predict

    counts = usage_counts(calib)
    table = TransitionTable.fit(calib)
    cov = path_coverage(calib)
    layers = []
    for m, (u, c) in enumerate(zip(usage_stats(counts), cov)):
        layers.append({"moe_index": m, "layer": calib.moe_layers[m], **{k: round(v, 6) for k, v in u.items()},
                       "path_coverage_20": None if c is None else round(c, 6)})
    doc: dict[str, Any] = {
        "format": "edgemoe-routing", "version": ROUTING_VERSION,
        "num_experts": calib.num_experts, "top_k": calib.top_k, "moe_layers": list(calib.moe_layers),
        "calibration": {"tokens": calib.tokens, **(source or {})},
        "usage": counts.tolist(),
        "layers": layers,
        "table": table.to_json(),
    }
    if eval_trace is not None:
        if sizes is None:
            sizes = np.ones((len(calib.moe_layers), calib.num_experts))
        doc["evaluation"] = {"tokens": eval_trace.tokens,
                             "predictors": predict.evaluate_all(table, eval_trace, sizes, ratio=ratio)}
    return doc


def save_routing(model_dir: str | Path, doc: dict[str, Any]) -> Path:
    path = Path(model_dir) / ROUTING_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def load_routing(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / ROUTING_FILE
    if not path.exists():
        raise ModelDirectoryError(f"{model_dir} has no {ROUTING_FILE}: profile the model first with "
                                  f"`edgemoe profile {model_dir} --calib TEXT_FILE`")
    doc = json.loads(path.read_text())
    if doc.get("format") != "edgemoe-routing":
        raise ModelDirectoryError(f"{path} is not an edgemoe routing file: profile the model again")
    if doc.get("version", 0) > ROUTING_VERSION:
        raise ModelDirectoryError(f"{path} is routing version {doc['version']}, this edgemoe reads up to "
                                  f"{ROUTING_VERSION}: upgrade edgemoe or profile the model again")
    return doc


def table_from_routing(doc: dict[str, Any]) -> TransitionTable:
    return TransitionTable.from_json(doc["table"], np.asarray(doc["usage"], np.int64), doc["top_k"])


def expert_sizes(model: "Model") -> np.ndarray:
    """[M, E] bytes one read of each expert moves (blob length rounded up to 4 KiB, as O_DIRECT reads)."""
    from .manifest import blob_tables, page_bytes

    _, lengths, _, _ = blob_tables(model.manifest)
    return page_bytes(lengths[model.manifest["experts"]["moe_layers"]])


def profile_model(model_dir: str | Path, text_file: str | Path, eval_file: str | Path | None = None,
                  window: int = 256, max_tokens: int | None = 50_000, eval_max_tokens: int | None = 20_000,
                  save: bool = True, traces_dir: str | Path | None = None, ratio: float = 1.5,
                  fit: bool = True, model: "Model | None" = None, log: Any = None) -> dict[str, Any]:
    """Trace the model on a calibration text, fit the look-ahead maps on it, score every
    predictor on held-out text, and write routing.json (and routing.safetensors with the
    fitted look-ahead) into the model directory. Without eval_file the last 20% of the
    calibration tokens are held out (and left out of the table and the fit)."""
    from . import predict
    from .model import load

    def say(msg: str) -> None:
        if log:
            print(msg, file=log, flush=True)

    m = model or load(model_dir)
    ids = read_token_stream(m, text_file, max_tokens)
    if eval_file is not None:
        held_ids = read_token_stream(m, eval_file, eval_max_tokens, seed=1)
    else:
        cut = max(1, int(len(ids) * 0.8) // window * window)
        ids, held_ids = ids[:cut], ids[cut:]
    moe_layers = m.manifest["experts"]["moe_layers"]
    fitter = predict.LookaheadFitter(m.net, moe_layers) if fit else None
    t0 = time.perf_counter()
    calib = trace_routing(m, ids, window, lookahead=False, observer=fitter)
    say(f"calibration: {calib.tokens} tokens traced in {time.perf_counter() - t0:.1f}s")
    fits = fitter.solve() if fitter is not None else {}
    t0 = time.perf_counter()
    held = trace_routing(m, held_ids, window, lookahead=True, fits=fits)
    say(f"evaluation: {held.tokens} tokens traced in {time.perf_counter() - t0:.1f}s")
    if traces_dir is not None:
        Path(traces_dir).mkdir(parents=True, exist_ok=True)
        calib.save(Path(traces_dir) / "calib.npz")
        held.save(Path(traces_dir) / "eval.npz")
    source = {"file": str(text_file), "window": window}
    doc = build_routing(calib, held, expert_sizes(m), source, ratio=ratio)
    doc["evaluation"].update({"file": str(eval_file) if eval_file else f"last 20% of {text_file}"})
    if held.tokens >= 8:  # how early each look-ahead point is known, in decode
        doc["evaluation"]["lead_time_seconds"] = predict.lead_times(m, held.ids[:32].tolist(), 16)
    if save:
        path = save_routing(model_dir, doc)
        say(f"wrote {path}")
        if fits:
            say(f"wrote {predict.save_fits(model_dir, fits)}")
    return doc


# -- report --------------------------------------------------------------------------
SHORT_NAMES = {"table_l": "table(l)", "table": "table", "lookahead_moe_in": "la:moe_in",
               "lookahead_layer_out": "la:out", "fitted_moe_in": "fit:moe_in", "fitted_layer_out": "fit:out"}


def format_report(doc: dict[str, Any]) -> str:
    """The per-layer table `edgemoe profile` prints."""
    E, k = doc["num_experts"], doc["top_k"]
    ev = doc.get("evaluation", {}).get("predictors", {})
    names = [n for n in SHORT_NAMES if n in ev]
    ratio = ev[names[0]]["overall"]["operating_point"]["ratio_cap"] if names else 1.5
    lines = [f"{doc['calibration']['tokens']} calibration tokens, {E} experts, top-{k}"
             + (f"; predictors scored on {doc['evaluation']['tokens']} held-out tokens" if ev else "")]
    if names:
        lines.append(f"next-layer recall when reading the likeliest experts within {ratio:g}x the bytes a token needs:")
    head = f"{'moe':>3} {'layer':>5} {'entropy':>7} {'top25%':>6} {'paths20%':>8}"
    head += "".join(f" {SHORT_NAMES[n]:>10}" for n in names)
    lines.append(head)
    for L in doc["layers"]:
        m = L["moe_index"]
        cov = "-" if L["path_coverage_20"] is None else f"{100 * L['path_coverage_20']:.1f}%"
        row = f"{m:>3} {L['layer']:>5} {L['entropy']:>7.3f} {100 * L['top_quarter_share']:>5.1f}% {cov:>8}"
        for n in names:
            per = {p["moe_index"]: p for p in ev[n]["layers"]}
            cell = f"{100 * per[m]['operating_point']['recall']:.1f}%" if m in per else "-"
            row += f" {cell:>10}"
        lines.append(row)
    if names:
        lines.append("")
        lines.append("all layers: recall of the k and 2k likeliest, and within the byte budget "
                     "(bytes read / bytes needed)")
        for n in names:
            o = ev[n]["overall"]
            op = o["operating_point"]
            lines.append(f"  {SHORT_NAMES[n]:<11} top-{k} {100 * o['recall_k']:5.1f}%  top-{2 * k} "
                         f"{100 * o['recall_2k']:5.1f}%  budget: {100 * op['recall']:5.1f}% at "
                         f"{op['bytes_ratio']:.2f}x, precision {100 * op['precision']:.1f}%")
    lead = doc.get("evaluation", {}).get("lead_time_seconds")
    if lead:
        lines.append("")
        lines.append("decode time from when a guess for layer l+1 can be issued to layer l+1's routing (median, ms; "
                     "the table issues at moe_in):")
        for p, v in lead.items():
            lines.append(f"  {p:<10} " + " ".join("-" if x is None else f"{1e3 * x:.3f}" for x in v))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`edgemoe profile [MODEL] [--calib FILE] [--eval FILE]`: trace, write routing.json, print the table.
    Without --calib it prints the routing.json the model directory already holds; the default
    model is profiled on its shipped calib.txt (the validation split)."""
    p = argparse.ArgumentParser(prog="edgemoe profile",
                                description="Routing statistics of a model on calibration text (writes routing.json). "
                                            "With --importance: per-expert importance instead "
                                            "(see `edgemoe profile --importance -h`).")
    p.add_argument("model", nargs="?", default=None,
                   help="a converted model directory (default: the shipped default model)")
    p.add_argument("--calib", default=None, help="calibration text file (documents separated by a \\x1e line); "
                   "without it, show the model's stored routing.json (the default model: profile its calib.txt "
                   "if none is stored)")
    p.add_argument("--eval", default=None, help="held-out text to score the predictors on "
                   "(default: the last 20%% of the calibration tokens)")
    p.add_argument("--window", type=int, default=256, help="prefill window in tokens; the KV cache resets per window")
    p.add_argument("--max-tokens", type=int, default=50_000, help="calibration tokens (0: the whole file)")
    p.add_argument("--eval-max-tokens", type=int, default=20_000, help="held-out tokens (0: the whole file)")
    p.add_argument("--ratio", type=float, default=1.5, help="prefetch byte budget per layer, as a multiple of the "
                   "bytes a token needs (default 1.5)")
    p.add_argument("--traces", default=None, help="also save the traces (calib.npz, eval.npz) in this directory")
    p.add_argument("--no-fit", action="store_true", help="do not fit the look-ahead maps (routing.safetensors)")
    p.add_argument("--no-save", action="store_true", help="do not write routing.json")
    p.add_argument("--json", action="store_true", help="print routing.json's statistics as JSON, not a table")
    args = p.parse_args(argv)
    from .cli import resolve_model
    from .default import shipped_text

    model_dir = resolve_model(args.model)
    if args.calib is None and (Path(model_dir) / ROUTING_FILE).exists():
        doc = load_routing(model_dir)
    else:
        calib = shipped_text(args.calib, args.model, "calib.txt",
                             f"{model_dir} holds no {ROUTING_FILE} yet: pass --calib FILE to profile it")
        doc = profile_model(model_dir, calib, args.eval, window=args.window, max_tokens=args.max_tokens or None,
                            eval_max_tokens=args.eval_max_tokens or None, save=not args.no_save,
                            traces_dir=args.traces, ratio=args.ratio, fit=not args.no_fit, log=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in doc.items() if k not in ("table", "usage")}, indent=2))
    else:
        print(format_report(doc))
    return 0
