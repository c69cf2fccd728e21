"""Device profiles (data files in profiles/), auto-configuration for this machine,
and real resource limits for benchmarks (limits.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_bytes: int
    cpu_cores: int
    storage_kind: str
    read_bytes_per_s: int
    read_latency_s: float

    @classmethod
    def from_dict(cls, d: dict) -> DeviceProfile:
        s = d["storage"]
        return cls(
            d["name"],
            d.get("description", ""),
            int(d["ram_bytes"]),
            int(d["cpu_cores"]),
            s["kind"],
            int(s["read_bytes_per_s"]),
            float(s["read_latency_s"]),
        )


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name: str) -> DeviceProfile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no device profile '{name}'; known: {', '.join(list_profiles())}")
    return DeviceProfile.from_dict(json.loads(path.read_text()))


def this_machine() -> DeviceProfile:
    """This machine's RAM and cores from psutil; storage figures unknown (0) until measured."""
    return DeviceProfile(
        "this-machine",
        "detected with psutil",
        int(psutil.virtual_memory().total),
        os.cpu_count() or 1,
        "unknown",
        0,
        0.0,
    )


def suggest_memory_budget(backbone_bytes: int, reserve_bytes: int = 256 << 20) -> int:
    """Expert budget that fits in what is available now: available RAM minus the backbone and a reserve."""
    return max(0, int(psutil.virtual_memory().available) - backbone_bytes - reserve_bytes)
