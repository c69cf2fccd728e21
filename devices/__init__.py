"""Device profiles (data files in profiles/) and link profiles (links.json), this machine's
description (detect.py), and real resource limits for benchmarks (limits.py).

Every figure in a profile carries its public source under "sources" (field -> document or
URL and what it says); a figure that is an estimate says so there and how it was derived.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..errors import DeviceProfileError

PROFILE_DIR = Path(__file__).parent / "profiles"
LINKS_FILE = Path(__file__).parent / "links.json"

# The int4 expert kernel on one decode token is a matrix-vector product, bound by memory
# (docs/benchmarks/kernels.md). Without a measurement its weight throughput is estimated as
# the smaller of a share of peak DRAM bandwidth and what the cores unpack per cycle.
MEMORY_SHARE = 0.5
BYTES_PER_CYCLE = 2.0  # bytes of 4-bit codes (4 weights) per core and cycle: one 128-bit SIMD multiply-add


def estimate_int4_bytes_per_s(memory_bytes_per_s: float, cores: int, cpu_hz: float) -> int:
    """Estimated bytes of 4-bit expert weights per second the CPU streams through a decode
    matmul: min(MEMORY_SHARE x memory bandwidth, cores x clock x BYTES_PER_CYCLE)."""
    return int(min(MEMORY_SHARE * memory_bytes_per_s, cores * cpu_hz * BYTES_PER_CYCLE))


@dataclass(frozen=True)
class LinkProfile:
    """A network link between the coordinator and a device: round trip and bandwidth."""

    kind: str
    rtt_s: float
    bits_per_s: float
    description: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    """A board as the runtime and the placement planner see it. The first seven fields are
    what storage emulation needs (`load(device=...)`); the rest describe compute, power and
    the default network link. A figure that is 0 is unknown (this_machine before measuring)."""

    name: str
    description: str
    ram_bytes: int
    cpu_cores: int
    storage_kind: str
    read_bytes_per_s: int
    read_latency_s: float
    memory_bytes_per_s: int = 0
    cpu_hz: float = 0.0
    int4_bytes_per_s: int = 0
    idle_w: float = 0.0
    active_w: float = 0.0
    link: LinkProfile | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def is_estimate(self, path: str) -> bool:
        """Whether the figure at `path` (as in PROFILE_FIELDS) is an estimate, by its source."""
        return self.sources.get(path, "").lower().startswith("estimate")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "the profile") -> DeviceProfile:
        """A profile from its JSON document; `where` names the file in errors."""
        if not isinstance(d, dict):
            raise DeviceProfileError(f"{where} is not a JSON object: write the profile as in {PROFILE_DIR}")
        v = {p: _field(d, p, where) for p in ("name", *PROFILE_FIELDS)}
        sources = d.get("sources")
        if not isinstance(sources, dict):
            raise DeviceProfileError(
                f'{where} has no "sources" object: every figure needs its source, '
                f'e.g. "sources": {{"ram_bytes": "data sheet or URL: what it says"}}'
            )
        for p in PROFILE_FIELDS:
            if not str(sources.get(p, "")).strip():
                raise DeviceProfileError(
                    f'{where} gives no source for "{p}": add "{p}" to its "sources" '
                    f'(a URL or document name and what it says, or "estimate: how it was derived")'
                )
        return cls(
            name=str(v["name"]),
            description=str(d.get("description", "")),
            ram_bytes=_number(v, "ram_bytes", where, int),
            cpu_cores=_number(v, "cpu_cores", where, int),
            storage_kind=str(v["storage.kind"]),
            read_bytes_per_s=_number(v, "storage.read_bytes_per_s", where, int),
            read_latency_s=_number(v, "storage.read_latency_s", where, float),
            memory_bytes_per_s=_number(v, "memory_bytes_per_s", where, int),
            cpu_hz=_number(v, "compute.cpu_hz", where, float),
            int4_bytes_per_s=_number(v, "compute.int4_bytes_per_s", where, int),
            idle_w=_number(v, "power.idle_w", where, float),
            active_w=_number(v, "power.active_w", where, float),
            link=load_link(str(v["link"]), where=f'{where}, "link"'),
            sources={str(k): str(s) for k, s in sources.items()},
        )


# Fields every profile file carries, each with an entry in its "sources" (dotted: nested keys).
PROFILE_FIELDS = (
    "ram_bytes",
    "cpu_cores",
    "storage.kind",
    "storage.read_bytes_per_s",
    "storage.read_latency_s",
    "memory_bytes_per_s",
    "compute.cpu_hz",
    "compute.int4_bytes_per_s",
    "power.idle_w",
    "power.active_w",
    "link",
)


def _field(d: dict[str, Any], path: str, where: str) -> Any:
    node: Any = d
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise DeviceProfileError(f'{where} has no "{path}": add it, with its source under "sources"')
        node = node[key]
    return node


def _number(v: dict[str, Any], path: str, where: str, kind: type) -> Any:
    x = v[path]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
        raise DeviceProfileError(f'{where}: "{path}" must be a number >= 0, got {x!r}')
    return kind(x)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """A profile from a JSON file anywhere (the shipped ones are in PROFILE_DIR)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeviceProfileError(f"{p} cannot be read as a device profile ({e})") from None
    return DeviceProfile.from_dict(doc, where=str(p))


def load_profile(name: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path (ending in .json)."""
    if name.endswith(".json") and Path(name).is_file():
        return load_profile_file(name)
    path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise DeviceProfileError(f"no device profile '{name}'; known: {', '.join(list_profiles())}")
    return load_profile_file(path)


def load_links() -> dict[str, LinkProfile]:
    """The link profiles of links.json, by name."""
    where = str(LINKS_FILE)
    try:
        doc = json.loads(LINKS_FILE.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeviceProfileError(f"{where} cannot be read ({e}): reinstall edgemoe") from None
    out = {}
    for name, link in doc.get("links", {}).items():
        at = f'{where}, link "{name}"'
        for key in ("rtt_s", "bits_per_s"):
            x = link.get(key)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0:
                raise DeviceProfileError(f'{at}: "{key}" must be a number > 0, got {x!r}')
            if not str(link.get("sources", {}).get(key, "")).strip():
                raise DeviceProfileError(f'{at} gives no source for "{key}": add it under the link\'s "sources"')
        out[name] = LinkProfile(name, float(link["rtt_s"]), float(link["bits_per_s"]), link.get("description", ""))
    return out


def list_links() -> list[str]:
    return sorted(load_links())


def load_link(name: str, where: str = "") -> LinkProfile:
    links = load_links()
    if name not in links:
        at = f"{where}: " if where else ""
        raise DeviceProfileError(f"{at}no link profile '{name}'; known: {', '.join(sorted(links))}")
    return links[name]


def this_machine() -> DeviceProfile:
    """This machine's RAM and cores from psutil; storage figures unknown (0) until measured
    (detect.detect_machine measures them)."""
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
