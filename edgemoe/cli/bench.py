"""`edgemoe bench`: loading modes side by side (edgemoe.bench.modes), or with --peers the
comparison with llama.cpp on the same weights and memory limits (edgemoe.bench.llama_cpp)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..bench import cluster, llama_cpp, modes, serve_load
from ..bench.synth import prepare
from ..runtime.engine import load
from ..runtime.paths import cache_root
from ..units import parse_bytes
from .common import size_arg


def main(argv: list[str] | None = None) -> int:
    if argv and "--serve" in argv:  # the server's load test has options of its own
        return serve_load.main([a for a in argv if a != "--serve"])
    intro, _, rest = (modes.__doc__ or "").partition("\n\n")
    ap = argparse.ArgumentParser(
        prog="edgemoe bench",
        description=intro.replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=rest,
    )
    ap.add_argument(
        "--models", default="default,mixtral-shaped", help="comma list: default, mixtral-shaped, or model directories"
    )
    ap.add_argument(
        "--bits",
        type=int,
        default=None,
        help="bitwidth the bench models are converted at (default: 8 for default, 4 for mixtral-shaped)",
    )
    ap.add_argument("--modes", default=",".join(modes.MODES), help="comma list of modes (see above)")
    ap.add_argument("--budgets", default="25,50,75", help="expert budgets in %% of the expert bytes")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device",
        default=None,
        metavar="PROFILE",
        help="emulate this device profile's storage speed (devices/profiles)",
    )
    ap.add_argument(
        "--cgroup-limit",
        type=size_arg,
        default=None,
        help="also run mixtral-shaped inside a cgroup memory limit of this size, e.g. 300MB",
    )
    ap.add_argument("--cgroup-modes", default="ondemand,lru,edgemoe", help="modes run inside the cgroup")
    ap.add_argument("--cache", default=None, help="where generated bench models go (default: the edgemoe cache)")
    ap.add_argument("--json", dest="json_out", default=None, help="write all results to this file")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="instead: a load test of `edgemoe serve` (edgemoe bench --serve -h for its options)",
    )
    ap.add_argument(
        "--peers",
        default=None,
        metavar="ENGINES",
        help="instead: edgemoe against these engines (llama.cpp) on the same weights and memory limits",
    )
    llama_cpp.add_arguments(ap)
    cluster.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.peers:
        return llama_cpp.run(args)

    cache = Path(args.cache) if args.cache else cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    if args.cluster:
        args.cache = str(cache)
        for name in [n for n in args.models.split(",") if n]:
            rs = cluster.run(args, prepare(name, cache, args.bits), emit)
            results += [dict(r, model=name) for r in rs]
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(lines) + "\n")
        if args.plot:
            cluster.plot(results, args.plot)
        return 0

    names = [n for n in args.models.split(",") if n]
    for name in names:
        model_dir = prepare(name, cache, args.bits)
        m = load(model_dir)
        info = m.info()
        expert_bytes = info["expert_bytes"]
        emit(
            f"\n## {name}: {info['layers']} layers, {info['experts_per_layer']} experts, top-{info['top_k']}, "
            f"experts {expert_bytes / 1e6:.1f} MB, backbone {m.backbone_bytes / 1e6:.1f} MB, "
            f"minimum budget {m.min_budget / 1e6:.2f} MB"
            + (f", storage emulating {args.device}" if args.device else "")
            + "\n"
        )
        emit(modes.HEADER)
        for mode in args.modes.split(","):
            budgets = (
                [0]
                if mode == "ram"
                else [m.min_budget]
                if mode == "ondemand"
                else [max(m.min_budget, expert_bytes * int(p) // 100) for p in args.budgets.split(",")]
            )
            for budget in budgets:
                r = modes.measure(model_dir, mode, budget, args)
                r.update(model=name, mode=mode, budget=budget, expert_bytes=expert_bytes, device=args.device)
                emit(modes.row(r))
                results.append(r)
    for line in modes.targets(results):
        emit("\n" + line)
    if args.cgroup_limit:
        name = "mixtral-shaped"
        rs = modes.run_cgroup(name, prepare(name, cache, args.bits), parse_bytes(args.cgroup_limit), args, emit)
        results += rs
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0
