"""Byte sizes as people write them ("300MB", "1.5GB", "512MiB") and as the CLI prints them."""

from __future__ import annotations

import re
from typing import overload

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@overload
def parse_bytes(value: None) -> None: ...
@overload
def parse_bytes(value: int | float | str) -> int: ...
def parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string like '1.5GB' (powers of 1000) or '512MiB' (powers of 1024)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a memory budget cannot be negative: {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read '{value}' as a size: write bytes or a number with KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
