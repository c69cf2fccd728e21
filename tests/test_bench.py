"""edgemoe bench's reporting: the line that compares the measured rows with the streaming targets."""

from __future__ import annotations

from edgemoe.bench.modes import pooled_io_ratios, targets


def row(mode: str, tok_s: float, budget: int = 50, model: str = "default") -> dict:
    return {"model": model, "mode": mode, "decode_tokens_per_s": tok_s, "budget": budget, "expert_bytes": 100}


def test_targets_pool_interleaved_modes_by_their_median():
    rows = [
        row("edgemoe", 500.0),
        row("ondemand", 100.0),
        row("ram", 1000.0),
        row("edgemoe", 700.0),
        row("ondemand", 300.0),
        row("ram", 2000.0),
        row("edgemoe", 600.0),
        row("edgemoe", 900.0, budget=75),
    ]
    (line,) = targets(rows)
    # medians: edgemoe at 50% 600 (the 75% row is left out), on-demand 200, RAM 1500
    assert line == (
        "default: edgemoe at 50% = 3.00x on-demand (target >= 3x), all-in-RAM is 2.50x faster (target <= 1.3x)"
    )
    assert targets([row("edgemoe", 500.0), row("ram", 1000.0)]) == []  # no on-demand row: no line
    assert len(targets(rows + [dict(r, model="other") for r in rows])) == 2


def test_io_ratios_pool_every_run_of_a_mode():
    rows = [
        {"mode": "lru", "ratios_to_io_bound": [1.1, 1.2, 1.8]},
        {"mode": "edgemoe", "ratios_to_io_bound": [1.2, 1.3, 1.6]},
        {"mode": "edgemoe", "ratios_to_io_bound": [1.4, 1.7, 2.0]},
        {"mode": "ondemand", "ratios_to_io_bound": []},
    ]
    assert pooled_io_ratios(rows) == [
        "- lru: ratio to the I/O bound over 3 runs: median 1.20 (1.10-1.80), 2 of 3 runs within 1.5x",
        "- edgemoe: ratio to the I/O bound over 6 runs: median 1.50 (1.20-2.00), 3 of 6 runs within 1.5x",
    ]
