"""Readable summaries of Model.stats(): one line of totals and a per-MoE-layer table
(what `edgemoe run --stats` prints)."""

from __future__ import annotations

from typing import Any

from ..units import format_bytes

# (header, key in a layer row, format); None values print as "-"
COLUMNS = (
    ("layer", "layer", "{}"),
    ("hit rate", "hit_rate", "{:.0%}"),
    ("hits", "hits", "{}"),
    ("misses", "misses", "{}"),
    ("loads", "loads", "{}"),
    ("MB read", "bytes_read", "mb"),
    ("pf hits", "prefetch_hits", "{}"),
    ("pf wasted MB", "wasted_prefetch_bytes", "mb"),
    ("precision", "precision", "{:.0%}"),
    ("recall", "recall", "{:.0%}"),
    ("stall ms", "stall_seconds", "ms"),
    ("compute ms", "compute_seconds", "ms"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.1f}"
    if fmt == "ms":
        return f"{1e3 * value:.1f}"
    return fmt.format(value)


def _total_row(layers: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": "all"}
    for _, key, _ in COLUMNS[2:]:
        if key not in ("precision", "recall"):
            row[key] = sum(r[key] for r in layers)
    row["hit_rate"] = s["cache_hit_rate"]
    pf = s.get("prefetch")
    row["precision"] = pf["precision"] if pf else None
    row["recall"] = pf["recall"] if pf else None
    return row


def format_layer_table(s: dict[str, Any]) -> str:
    """A fixed-width table of s["layers"] with a total row."""
    layers = s["layers"]
    rows = [[h for h, _, _ in COLUMNS]]
    for r in [*layers, _total_row(layers, s)]:
        rows.append([_cell(r.get(key), fmt) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    return "\n".join(lines)


def format_stats(s: dict[str, Any]) -> str:
    """Totals (speed, cache, I/O, memory, prefetch) then the per-layer table."""
    io = "O_DIRECT" if s["direct_io"] else "buffered"
    if s.get("storage_emulation"):
        io += f", storage emulating {s['storage_emulation']}"
    budget = format_bytes(s["memory_budget"]) if s["memory_budget"] else "unbounded"
    lines = [
        f"decode        {s['tokens_generated']} tokens, {s['decode_tokens_per_s']:.2f} tok/s; "
        f"prefill {s['prompt_tokens']} tokens in {s['prefill_seconds']:.3f} s",
        f"expert cache  budget {budget}, peak {format_bytes(s['expert_cache_peak_bytes'])}; "
        f"hit rate {s['cache_hit_rate']:.1%} ({s['cache_hits']} hits, {s['cache_misses']} misses), "
        f"{s['evictions']} evictions",
        f"reads         {s['expert_loads']} experts, {format_bytes(s['bytes_read'])} ({io}): "
        f"{format_bytes(s['demand_bytes'])} on demand, {format_bytes(s['prefetch_bytes'])} prefetched",
        f"time          MoE compute {s['compute_seconds']:.3f} s, stalled on reads {s['stall_seconds']:.3f} s, "
        f"reading {s['read_seconds']:.3f} s (summed over I/O threads)",
        f"memory        backbone {format_bytes(s['backbone_bytes'])}, peak RSS {format_bytes(s['peak_rss_bytes'])}",
    ]
    pf = s.get("prefetch")
    if pf:
        lines.append(
            f"prefetch      {pf['predictor']} ({pf['mode']}, {pf['ratio']}x bytes): precision "
            f"{pf['precision']:.1%}, recall {pf['recall']:.1%}, {pf['bytes_ratio']:.2f}x the bytes needed; "
            f"{s['prefetch_hits']} hits, {format_bytes(s['wasted_prefetch_bytes'])} evicted unused"
        )
    fb = s.get("fallback")
    if fb:
        lines.append(
            f"fallback      gate weight < {fb['threshold']:.2f}: {fb['uses']} uses of low-bit copies, "
            f"{fb['loads']} read ({format_bytes(fb['bytes_read'])}), "
            f"{format_bytes(fb['bytes_saved'])} of full copies not read"
        )
    lines += ["", format_layer_table(s)]
    return "\n".join(lines)
