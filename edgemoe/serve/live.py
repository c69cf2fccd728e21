"""What the server shows of the runtime while it works: a snapshot of the expert cache (per MoE
layer, which experts are resident, hits, misses and bytes read), speed, queue and memory, for
the demo page; the same figures in Prometheus' text format for /metrics."""

from __future__ import annotations

import time
from typing import Any

import psutil

from ..runtime.engine import Model, peak_rss_bytes
from .scheduler import Scheduler


def cache_snapshot(model: Model, scheduler: Scheduler, memory_needed: int) -> dict[str, Any]:
    """Per MoE layer: resident experts, hits, misses, loads, bytes read; totals, tokens/s,
    queue, memory. Counters are totals since start (a viewer takes differences)."""
    ex = model.manifest["experts"]
    cache = model.cache
    per_layer = cache.layer_stats()
    layers = []
    for layer in ex["moe_layers"]:
        c = per_layer[layer]
        layers.append(
            {
                "layer": layer,
                "resident": [e for e in range(ex["num_experts"]) if cache.contains(layer, e)],
                "hits": int(c["hits"]),
                "misses": int(c["misses"]),
                "loads": int(c["loads"]),
                "bytes_read": int(c["bytes_read"]),
            }
        )
    hits, misses = sum(r["hits"] for r in layers), sum(r["misses"] for r in layers)
    running = scheduler.running_count()
    return {
        "time": time.time(),
        "experts_per_layer": ex["num_experts"],
        "top_k": ex["top_k"],
        "layers": layers,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "bytes_read": sum(r["bytes_read"] for r in layers),
        "expert_cache_bytes": int(cache.resident_bytes),
        "expert_cache_peak_bytes": int(cache.stats()["peak_resident_bytes"]),
        "memory_budget": model.budget,
        "expert_bytes": model.info()["expert_bytes"],
        "rss_bytes": psutil.Process().memory_info().rss,
        "memory_needed": memory_needed,
        "tokens_per_s": scheduler.tokens_per_second(),
        "completion_tokens": scheduler.completion_tokens,
        "queue": scheduler.waiting,
        "running": running > 0,
        "running_requests": running,
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def prometheus(model: Model, scheduler: Scheduler, memory_needed: int) -> str:
    """/metrics: Prometheus' text exposition format (version 0.0.4)."""
    c = model.cache.stats()
    lookups = c["hits"] + c["misses"]
    ttft = list(scheduler.ttft)
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP edgemoe_{name} {help_}")
        out.append(f"# TYPE edgemoe_{name} {kind}")
        out.extend(
            f"edgemoe_{name}{labels} {value:g}" if isinstance(value, float) else f"edgemoe_{name}{labels} {value}"
            for labels, value in samples
        )

    metric(
        "requests_total",
        "counter",
        "Requests finished, by outcome (cancelled: the client left).",
        [(f'{{outcome="{k}"}}', v) for k, v in scheduler.counts.items()],
    )
    metric("queue_length", "gauge", "Requests waiting for the model.", [("", scheduler.waiting)])
    metric(
        "requests_running",
        "gauge",
        f"Requests generating now (at most {scheduler.batch}).",
        [("", scheduler.running_count())],
    )
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", scheduler.prompt_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", scheduler.completion_tokens)])
    metric(
        "tokens_per_second",
        "gauge",
        "Tokens generated per second over the last 10 s.",
        [("", float(scheduler.tokens_per_second()))],
    )
    metric(
        "time_to_first_token_seconds",
        "summary",
        "Seconds from a request's arrival to its first token (the last 1000 requests).",
        [
            ('{quantile="0.5"}', float(_quantile(ttft, 0.5))),
            ('{quantile="0.99"}', float(_quantile(ttft, 0.99))),
            ("_sum", float(sum(ttft))),
            ("_count", len(ttft)),
        ],
    )
    metric("expert_cache_hits_total", "counter", "Expert lookups found resident.", [("", int(c["hits"]))])
    metric("expert_cache_misses_total", "counter", "Expert lookups that had to read.", [("", int(c["misses"]))])
    metric(
        "expert_cache_hit_ratio",
        "gauge",
        "Hits over lookups since start.",
        [("", float(c["hits"] / lookups if lookups else 0.0))],
    )
    metric("expert_loads_total", "counter", "Expert blobs read from storage.", [("", int(c["loads"]))])
    metric(
        "expert_bytes_read_total", "counter", "Bytes of expert blobs read from storage.", [("", int(c["bytes_read"]))]
    )
    metric("expert_evictions_total", "counter", "Experts evicted from the cache.", [("", int(c["evictions"]))])
    metric("expert_cache_bytes", "gauge", "Bytes the expert cache holds now.", [("", int(c["resident_bytes"]))])
    metric("expert_cache_budget_bytes", "gauge", "The expert cache's byte budget (0: unbounded).", [("", model.budget)])
    metric(
        "memory_needed_bytes",
        "gauge",
        "Model.memory_needed at the server's context length plus the server's own overhead.",
        [("", memory_needed)],
    )
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident set of the server process.",
        [("", psutil.Process().memory_info().rss)],
    )
    metric("process_peak_resident_memory_bytes", "gauge", "Peak resident set (VmHWM).", [("", peak_rss_bytes())])
    return "\n".join(out) + "\n"
