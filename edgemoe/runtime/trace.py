"""Routing traces: which experts every token used in every MoE layer as the model ran,
recorded by a RouteObserver on the forward pass, with the gate look-ahead's guesses.

    trace = model.trace_routing("some text")   # RoutingTrace
    trace.experts                              # int16 [tokens, moe_layers, top_k], router order

MoE layers are numbered by position ("moe index" m = 0..M-1) in
manifest["experts"]["moe_layers"], which maps them to model layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..models.blocks import RouteObserver, softmax
from .options import LOOKAHEAD_POINTS


@dataclasses.dataclass
class RoutingTrace:
    """Per token, per MoE layer, the routed experts (tokens in the order they were run).

    experts  int16 [T, M, k]  expert ids, largest gate weight first
    weights  float32 [T, M, k] their gate weights as the model applies them
    lookahead  name -> float16 [T, M, E]: row m holds MoE layer m+1's router
        probabilities computed from layer m's hidden state ("moe_in": the residual
        stream at layer m's MoE input; "layer_out": after layer m's residual add;
        "fitted_moe_in" / "fitted_layer_out": the same through a look-ahead fitted on
        calibration, see runtime.prefetch.LookaheadFit). Row M-1 is unused (zeros). Empty when
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

    def __getitem__(self, sl: slice) -> RoutingTrace:
        return RoutingTrace(
            self.experts[sl],
            self.weights[sl],
            list(self.moe_layers),
            self.num_experts,
            {p: a[sl] for p, a in self.lookahead.items()},
            None if self.ids is None else self.ids[sl],
        )

    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        first = traces[0]
        points = set.intersection(*(set(t.lookahead) for t in traces))
        return RoutingTrace(
            np.concatenate([t.experts for t in traces]),
            np.concatenate([t.weights for t in traces]),
            list(first.moe_layers),
            first.num_experts,
            {p: np.concatenate([t.lookahead[p] for t in traces]) for p in sorted(points)},
            None if any(t.ids is None for t in traces) else np.concatenate([t.ids for t in traces]),
        )

    def save(self, path: str | Path) -> None:
        """An .npz file (numpy only)."""
        arrays = {
            "experts": self.experts,
            "weights": self.weights,
            "moe_layers": np.asarray(self.moe_layers),
            "num_experts": np.asarray(self.num_experts),
        }
        arrays.update({f"lookahead_{p}": a for p, a in self.lookahead.items()})
        if self.ids is not None:
            arrays["ids"] = self.ids
        with open(path, "wb") as f:  # np.savez would append .npz to a str path
            # mypy matches **arrays against allow_pickle too; no key here is named so
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        with np.load(path) as z:
            return cls(
                z["experts"],
                z["weights"],
                [int(x) for x in z["moe_layers"]],
                int(z["num_experts"]),
                {k[len("lookahead_") :]: z[k] for k in z.files if k.startswith("lookahead_")},
                z["ids"] if "ids" in z.files else None,
            )


def lookahead_logits(net: Any, layer: int, h: np.ndarray) -> np.ndarray:
    """Model layer `layer`'s router logits [T, E] applied to a hidden state h [T, hidden]
    taken from an earlier layer (with `layer`'s own ffn_norm): HOBBIT's gate look-ahead."""
    L = net.layers[layer]
    x = net.normalize(np.ascontiguousarray(h, np.float32), L.ffn_norm, L.ffn_norm_bias)
    return L.moe.router(x)


def lookahead_probs(net: Any, layer: int, h: np.ndarray) -> np.ndarray:
    """The same as probabilities [T, E]."""
    return softmax(lookahead_logits(net, layer, h))


# name -> (point, fn(next moe index, hidden state [T, hidden]) -> probabilities [T, E])
Lookaheads = dict[str, tuple[str, Callable[[int, np.ndarray], np.ndarray]]]


def router_lookaheads(net: Any, moe_layers: Sequence[int], fits: dict[str, Any] | None = None) -> Lookaheads:
    """The gate look-ahead at both points, and the fitted ones given (point -> prefetch.LookaheadFit)."""
    out: Lookaheads = {p: (p, lambda n, h: lookahead_probs(net, moe_layers[n], h)) for p in LOOKAHEAD_POINTS}
    for p, fit in (fits or {}).items():
        out[f"fitted_{p}"] = (p, fit.probs)
    return out


class ChainedObserver(RouteObserver):
    """A RouteObserver that passes every hook on to `inner` (when set) after its own work:
    what trace_routing needs of the extra observer it is given, to keep the model's own running."""

    inner: RouteObserver | None


class TraceRecorder(ChainedObserver):
    """Collects routing (and, optionally, look-ahead probabilities) as the model runs.
    Forwards every hook to `inner` (e.g. a prefetcher) so both can watch one run."""

    def __init__(
        self,
        net: Any,
        moe_layers: Sequence[int],
        lookahead: Lookaheads | None = None,
        inner: RouteObserver | None = None,
    ):
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


def trace_routing(
    model: Any,
    prompt: str | Sequence[int] | np.ndarray,
    window: int | None = None,
    lookahead: bool = True,
    fits: dict[str, Any] | None = None,
    observer: ChainedObserver | None = None,
) -> RoutingTrace:
    """Run a prompt (text or token ids) through the model and record its routing.

    window: prefill windows of this many tokens, the KV cache reset before each
    (None: one window). lookahead: also record the gate look-ahead at both points,
    and through `fits` (point -> prefetch.LookaheadFit). observer: one more watcher
    of the run (e.g. planning.predictors.LookaheadFitter). The model's own observer keeps running.
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
            net.run_text(arr[s : s + window], model.kv)
    finally:
        net.observer = saved
    trace = rec.trace()
    trace.ids = arr.astype(np.int32)
    return trace
