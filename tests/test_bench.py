"""edgemoe bench's reporting: the targets line of issue 4."""
from __future__ import annotations

from edgemoe.bench import targets


def row(mode: str, tok_s: float, budget: int = 50, model: str = "default") -> dict:
    return {"model": model, "mode": mode, "decode_tokens_per_s": tok_s, "budget": budget, "expert_bytes": 100}


def test_targets_pool_interleaved_modes_by_their_median():
    rows = [row("edgemoe", 500.0), row("ondemand", 100.0), row("ram", 1000.0), row("edgemoe", 700.0),
            row("ondemand", 300.0), row("ram", 2000.0), row("edgemoe", 600.0), row("edgemoe", 900.0, budget=75)]
    (line,) = targets(rows)
    # medians: edgemoe at 50% 600 (the 75% row is left out), on-demand 200, RAM 1500
    assert line == ("default: edgemoe at 50% = 3.00x on-demand (target >= 3x), "
                    "all-in-RAM is 2.50x faster (target <= 1.3x)")
    assert targets([row("edgemoe", 500.0), row("ram", 1000.0)]) == []  # no on-demand row: no line
    assert len(targets(rows + [dict(r, model="other") for r in rows])) == 2
