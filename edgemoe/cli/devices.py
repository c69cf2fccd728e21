"""`edgemoe devices`: the device profiles as a table; `edgemoe devices --detect [MODEL]`:
this machine, measured, and settings for MODEL on it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..cluster.settings import memory_terms, suggest
from ..devices import DeviceProfile, list_profiles, load_links, load_profile
from ..devices.detect import MachineInfo, detect_machine
from ..format.manifest import load_manifest
from ..units import format_bytes, parse_bytes
from .common import Parser, existing_dir, resolve_model, size_arg, whole


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, width)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def profile_rows(profiles: Sequence[DeviceProfile]) -> list[list[str]]:
    """One row per profile; '~' marks a figure whose source says it is an estimate."""

    def est(p: DeviceProfile, *paths: str) -> str:
        return "~" if any(p.is_estimate(x) for x in paths) else ""

    rows = []
    for p in profiles:
        link = p.link
        rows.append(
            [
                p.name,
                f"{p.ram_bytes / 2**30:.0f} GiB",
                f"{est(p, 'storage.read_bytes_per_s')}{p.read_bytes_per_s / 1e6:.0f} ({p.storage_kind})",
                f"{est(p, 'memory_bytes_per_s')}{p.memory_bytes_per_s / 1e9:.1f}",
                f"{est(p, 'compute.int4_bytes_per_s')}{p.int4_bytes_per_s / 1e9:.1f}",
                str(p.cpu_cores),
                f"{est(p, 'power.idle_w')}{p.idle_w:g} / {est(p, 'power.active_w')}{p.active_w:g}",
                link.kind if link else "-",
            ]
        )
    return rows


def describe(m: MachineInfo) -> str:
    r = m.read
    lines = [
        "this machine",
        f"  RAM          {format_bytes(m.ram_total_bytes)} total, {format_bytes(m.ram_available_bytes)} available",
        f"  cores        {m.physical_cores} physical, {m.logical_cores} logical, {m.cpu_hz / 1e9:.2f} GHz; "
        f"{' '.join(m.cpu_flags) or 'no SIMD flags found'}",
        f"  memory       {m.memory_bytes_per_s / 1e9:.1f} GB/s (one-thread numpy copy)",
        f"  int4 experts ~{m.int4_bytes_per_s() / 1e9:.1f} GB/s (estimate from memory bandwidth, cores and clock)",
    ]
    if r is not None:
        what = "a temporary file" if r.temporary else r.path
        how = "O_DIRECT" if r.direct else "page cache dropped"
        lines.append(
            f"  storage      {r.read_bytes_per_s / 1e6:.0f} MB/s, {1e3 * r.read_latency_s:.2f} ms per 4 KiB read "
            f"({how}, {format_bytes(r.bytes_read)} of {what})"
        )
    lines += [f"  note: {n}" for n in m.notes]
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe devices",
        description="Device profiles (devices/profiles): RAM, storage and memory speed, int4 expert compute, "
        "cores, power and default link; '~' marks an estimate. With --detect, this machine measured, "
        "and settings for MODEL.",
    )
    p.add_argument(
        "model", nargs="?", default=None, help="with --detect: a converted model (default: the default model)"
    )
    p.add_argument("--detect", action="store_true", help="describe this machine and suggest settings for MODEL")
    p.add_argument(
        "--probe-size",
        type=size_arg,
        default="64MiB",
        help="bytes read to measure storage: of MODEL's experts file, or of a temporary file (default 64MiB)",
    )
    p.add_argument(
        "--probe-dir",
        type=existing_dir,
        default=None,
        help="where the temporary file goes (default: the temp directory)",
    )
    p.add_argument(
        "--context", type=whole(1), default=256, help="context tokens the suggestion plans for (default 256)"
    )
    p.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.detect:
        profiles = [load_profile(n) for n in list_profiles()]
        if args.json:
            print(json.dumps({pr.name: asdict(pr) for pr in profiles}, indent=1))
            return 0
        head = ["profile", "RAM", "storage MB/s", "memory GB/s", "int4 GB/s", "cores", "power W idle/active", "link"]
        print(table(head, profile_rows(profiles)))
        print('~ an estimate; each profile\'s "sources" say how it was derived (devices/profiles/*.json)')
        links = load_links()
        print(
            "\n"
            + table(
                ["link", "round trip", "bandwidth"],
                [[n, f"{1e3 * ln.rtt_s:g} ms", f"{ln.bits_per_s / 1e6:g} Mbit/s"] for n, ln in links.items()],
            )
        )
        return 0

    model = resolve_model(args.model)
    probe = None
    if args.model is not None:
        manifest = load_manifest(model)
        probe = Path(model) / manifest["experts"]["file"]
    m = detect_machine(probe, args.probe_dir, parse_bytes(args.probe_size))
    terms = memory_terms(model, args.context)
    s = suggest(terms, m.ram_available_bytes, m.physical_cores)
    if args.json:
        print(json.dumps({"machine": asdict(m), "suggestion": asdict(s)}, indent=1))
        return 0
    sizes = ", ".join(
        f"{k}{'' if k.startswith('as') else '-bit'}: {format_bytes(v)}" for k, v in terms.expert_bytes.items()
    )
    print(describe(m))
    print(
        f"\nmodel {model}\n"
        f"  besides experts {format_bytes(terms.other_bytes)} (Model.memory_needed at {terms.context_tokens} tokens, "
        f"less the budget)\n"
        f"  experts      {sizes}; least budget {format_bytes(terms.min_budget)}"
    )
    for n in s.notes:
        print(f"  note: {n}")
    if s.memory_budget:
        how = "streamed from flash" if s.streaming else "all in RAM"
        mb = s.memory_budget // 10**6 if s.streaming else -(-s.memory_budget // 10**6)  # round towards what works
        print(
            f"\nsuggested: convert with --bits {s.bits} ({how}); run with --memory-budget {mb}MB --threads {s.threads}"
        )
    return 0
