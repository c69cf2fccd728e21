"""Routing statistics: which experts every token uses in every MoE layer of a
calibration text, how skewed that use is, and how predictable layer l+1's experts are
from the experts of layers l-1 and l (EdgeMoE's table, kept in routing.json).

    m = edgemoe.load("model-dir")
    trace = collect_trace(m, "calib.txt", window=256, max_tokens=50_000)   # RoutingTrace
    profile_model("model-dir", "calib.txt", eval_file="val.txt")          # writes model-dir/routing.json
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeMoEError
from ..format.routing_file import ROUTING_VERSION, save_routing
from ..runtime.engine import Model, load
from ..runtime.prefetch import TransitionTable, expert_sizes, save_fits
from ..runtime.trace import RoutingTrace, trace_routing
from . import predictors
from .evaluate import read_text, split_documents


def read_token_stream(model: Model, path: str | Path, max_tokens: int | None = None, seed: int = 0) -> np.ndarray:
    """Token ids of a text file. Documents (separated by a line holding only \\x1e) each
    start with BOS; with max_tokens they are taken in a seeded random order so a cap
    still samples the whole file."""
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
        order: range | np.ndarray = range(len(docs))
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


def collect_trace(
    model: Model,
    path: str | Path,
    window: int = 256,
    max_tokens: int | None = None,
    lookahead: bool = True,
    seed: int = 0,
    fits: dict[str, Any] | None = None,
) -> RoutingTrace:
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
        out.append(
            {
                "entropy": float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 1.0,
                "top_quarter_share": float(np.sort(p)[::-1][:q].sum()),
                "max_share": float(p.max()),
                "min_share": float(p.min()),
            }
        )
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
        c = np.sort(np.bincount(keys.ravel(), minlength=E**3))[::-1]
        top = max(1, int(round(fraction * E**3)))
        out.append(float(c[:top].sum() / max(1, c.sum())))
    return out


def fit_table(trace: RoutingTrace, smoothing: float | None = None) -> TransitionTable:
    """EdgeMoE's transition table counted from a calibration trace."""
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
            c2[n] = np.bincount(keys.ravel(), minlength=E**3).reshape(E, E, E)
    return TransitionTable(c0, c1, c2, k, smoothing)


# -- routing.json --------------------------------------------------------------------
def build_routing(
    calib: RoutingTrace,
    eval_trace: RoutingTrace | None = None,
    sizes: np.ndarray | None = None,
    source: dict[str, Any] | None = None,
    ratio: float = 1.5,
) -> dict[str, Any]:
    """The routing.json document: usage and path statistics of the calibration trace, the
    transition table fitted on it, and (with eval_trace) how well each predictor does
    on held-out tokens. sizes [M, E]: bytes per expert (for the prefetched/needed ratio)."""
    counts = usage_counts(calib)
    table = fit_table(calib)
    cov = path_coverage(calib)
    layers = []
    for m, (u, c) in enumerate(zip(usage_stats(counts), cov)):
        layers.append(
            {
                "moe_index": m,
                "layer": calib.moe_layers[m],
                **{k: round(v, 6) for k, v in u.items()},
                "path_coverage_20": None if c is None else round(c, 6),
            }
        )
    doc: dict[str, Any] = {
        "format": "edgemoe-routing",
        "version": ROUTING_VERSION,
        "num_experts": calib.num_experts,
        "top_k": calib.top_k,
        "moe_layers": list(calib.moe_layers),
        "calibration": {"tokens": calib.tokens, **(source or {})},
        "usage": counts.tolist(),
        "layers": layers,
        "table": table.to_json(),
    }
    if eval_trace is not None:
        if sizes is None:
            sizes = np.ones((len(calib.moe_layers), calib.num_experts))
        doc["evaluation"] = {
            "tokens": eval_trace.tokens,
            "predictors": predictors.evaluate_all(table, eval_trace, sizes, ratio=ratio),
        }
    return doc


def profile_model(
    model_dir: str | Path,
    text_file: str | Path,
    eval_file: str | Path | None = None,
    window: int = 256,
    max_tokens: int | None = 50_000,
    eval_max_tokens: int | None = 20_000,
    save: bool = True,
    traces_dir: str | Path | None = None,
    ratio: float = 1.5,
    fit: bool = True,
    model: Model | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Trace the model on a calibration text, fit the look-ahead maps on it, score every
    predictor on held-out text, and write routing.json (and routing.safetensors with the
    fitted look-ahead) into the model directory. Without eval_file the last 20% of the
    calibration tokens are held out (and left out of the table and the fit)."""

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
    fitter = predictors.LookaheadFitter(m.net, moe_layers) if fit else None
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
        assert held.ids is not None  # trace_routing keeps the ids
        doc["evaluation"]["lead_time_seconds"] = predictors.lead_times(m, held.ids[:32].tolist(), 16)
    if save:
        path = save_routing(model_dir, doc)
        say(f"wrote {path}")
        if fits:
            say(f"wrote {save_fits(model_dir, fits)}")
    return doc


# -- report --------------------------------------------------------------------------
SHORT_NAMES = {
    "table_l": "table(l)",
    "table": "table",
    "lookahead_moe_in": "la:moe_in",
    "lookahead_layer_out": "la:out",
    "fitted_moe_in": "fit:moe_in",
    "fitted_layer_out": "fit:out",
}


def format_report(doc: dict[str, Any]) -> str:
    """The per-layer table `edgemoe profile` prints."""
    E, k = doc["num_experts"], doc["top_k"]
    ev = doc.get("evaluation", {}).get("predictors", {})
    names = [n for n in SHORT_NAMES if n in ev]
    ratio = ev[names[0]]["overall"]["operating_point"]["ratio_cap"] if names else 1.5
    lines = [
        f"{doc['calibration']['tokens']} calibration tokens, {E} experts, top-{k}"
        + (f"; predictors scored on {doc['evaluation']['tokens']} held-out tokens" if ev else "")
    ]
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
        lines.append(
            "all layers: recall of the k and 2k likeliest, and within the byte budget (bytes read / bytes needed)"
        )
        for n in names:
            o = ev[n]["overall"]
            op = o["operating_point"]
            lines.append(
                f"  {SHORT_NAMES[n]:<11} top-{k} {100 * o['recall_k']:5.1f}%  top-{2 * k} "
                f"{100 * o['recall_2k']:5.1f}%  budget: {100 * op['recall']:5.1f}% at "
                f"{op['bytes_ratio']:.2f}x, precision {100 * op['precision']:.1f}%"
            )
    lead = doc.get("evaluation", {}).get("lead_time_seconds")
    if lead:
        lines.append("")
        lines.append(
            "decode time from when a guess for layer l+1 can be issued to layer l+1's routing (median, ms; "
            "the table issues at moe_in):"
        )
        for p, v in lead.items():
            lines.append(f"  {p:<10} " + " ".join("-" if x is None else f"{1e3 * x:.3f}" for x in v))
    return "\n".join(lines)
