"""`edgemoe bench`: loading modes side by side (edgemoe.bench.modes), or with --peers the
comparison with llama.cpp on the same weights and memory limits (edgemoe.bench.llama_cpp)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..bench import cluster, llama_cpp, modes, serve_load
from ..bench.synth import prepare
from ..cluster.local import LINK_PRIORITY
from ..devices import load_profile
from ..runtime.engine import load
from ..runtime.paths import cache_root
from ..units import parse_bytes
from .common import (
    Parser,
    checked,
    comma_list,
    int_of,
    link_arg,
    number,
    profile_arg,
    retype,
    size_arg,
    threads_arg,
    whole,
)


def _storages(value: str) -> None:
    for part in value.split(","):  # none, or profiles: several with --peers
        if part not in ("", "none"):
            load_profile(part)


storage_arg = checked(
    _storages, "none or a device profile name (`edgemoe devices` lists them), with --peers a comma list of them"
)


def _model_name(value: str) -> str:
    if value not in ("default", "mixtral-shaped") and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"expected default, mixtral-shaped or a model directory, got {value!r}")
    return value


def _mode(value: str) -> str:
    try:
        modes.mode_options(value, Path("."))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a mode, got {value!r}: {e}") from None
    return value


def as_given(parse):
    """The value as given once `parse` accepts it (the bench library splits these lists itself)."""

    def check(value: str) -> str:
        parse(value)
        return value

    check.__name__ = "list"
    return check


mode_list = as_given(comma_list(_mode, f"modes from {', '.join(modes.MODES)} or POLICY+PREDICTOR"))


def build_parser() -> Parser:
    intro, _, rest = (modes.__doc__ or "").partition("\n\n")
    ap = Parser(
        prog="edgemoe bench",
        description=intro.replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=rest,
    )
    ap.add_argument(
        "--models",
        type=as_given(comma_list(_model_name, "default, mixtral-shaped or model directories, comma-separated")),
        default="default,mixtral-shaped",
        help="comma list: default, mixtral-shaped, or model directories",
    )
    ap.add_argument(
        "--bits",
        type=int_of(16, 8, 4, 3, 2),
        choices=(16, 8, 4, 3, 2),
        default=None,
        help="bitwidth the bench models are converted at (default: 8 for default, 4 for mixtral-shaped)",
    )
    ap.add_argument("--modes", type=mode_list, default=",".join(modes.MODES), help="comma list of modes (see above)")
    ap.add_argument(
        "--budgets",
        type=comma_list(whole(1, 100), "percentages from 1 to 100 like 25,50,75"),
        default="25,50,75",
        help="expert budgets in %% of the expert bytes",
    )
    ap.add_argument("--tokens", type=whole(1), default=32, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=whole(1), default=16)
    ap.add_argument("--repeat", type=whole(1), default=3, help="runs per cell; the median is reported")
    ap.add_argument("--seed", type=whole(0, 2**63 - 1), default=0)
    ap.add_argument(
        "--device",
        type=storage_arg,
        default=None,
        metavar="PROFILE",
        help="emulate this device profile's storage speed (devices/profiles); none: the local disk",
    )
    ap.add_argument(
        "--cgroup-limit",
        type=size_arg,
        default=None,
        help="also run mixtral-shaped inside a cgroup memory limit of this size, e.g. 300MB",
    )
    ap.add_argument(
        "--cgroup-modes", type=mode_list, default="ondemand,lru,edgemoe", help="modes run inside the cgroup"
    )
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
        type=checked(_peers, f"engines from {', '.join(llama_cpp.ENGINES[1:])}, comma-separated"),
        default=None,
        metavar="ENGINES",
        help="instead: edgemoe against these engines (llama.cpp) on the same weights and memory limits",
    )
    llama_cpp.add_arguments(ap)
    cluster.add_arguments(ap)
    # the libraries declare the --peers and --cluster options; their values are checked here like every flag's
    return retype(
        ap,
        {
            "--limits": checked(llama_cpp.parse_limits, "multiples of the GGUF size like unlimited,1.2,0.5"),
            "--peer-threads": threads_arg,
            "--peer-mode": _mode,
            "--run-timeout": number(0.0, above=True),
            "--cluster": as_given(comma_list(link_arg, "link profiles like wired-gigabit,wifi5,crowded-wifi")),
            "--flash-devices": as_given(comma_list(_storage, "local or device profiles, comma-separated")),
            "--cluster-storage": _storage,
            "--kill-link": link_arg,
            "--cluster-nodes": whole(1, 16),
            "--node-share": number(0.0, 100.0, above=True),
            "--coordinator-share": number(0.0, 100.0),
            "--kills": whole(0),
            "--cluster-timeout": number(0.0, above=True),
            "--cluster-path": as_given(comma_list(_data_path, "data paths: socket and/or ray, comma-separated")),
            "--coordinator-threads": whole(0, 1024),
            "--node-cpus": whole(1, 1024),
            "--serve-priority": whole(0, LINK_PRIORITY - 1),
        },
    )


def _data_path(value: str) -> str:
    """A cluster data path: socket or ray."""
    if value not in ("socket", "ray"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a data path (socket or ray)")
    return value


def _storage(value: str) -> str:
    """`local` (this disk) or a device profile whose storage is emulated."""
    return value if value == "local" else profile_arg(value)


def _budget(value: str) -> None:
    serve_load.budget_bytes(value, expert_bytes=1, min_budget=0)  # the form only: no model yet


def _limit(value: str) -> None:
    if value not in ("auto", "none"):
        parse_bytes(value)


def build_serve_parser() -> argparse.ArgumentParser:
    """`edgemoe bench --serve`'s options (edgemoe.bench.serve_load), their values checked."""
    p = serve_load.build_parser(Parser)
    return retype(
        p,
        {
            "--clients": whole(1, 1024),
            "--duration": number(0.0, above=True),
            "--alone": number(0.0, above=True),
            "--budget": checked(_budget, "a size like 20MB or a percentage of the expert bytes like 50%"),
            "--max-tokens": whole(1),
            "--limit": checked(_limit, "auto, none or a size like 300MB"),
            "--overhead-seconds": number(0.0, above=True),
            "--batch": comma_list(whole(1, 256), "server batch sizes from 1 to 256 like 1,8"),
        },
    )


def _peers(value: str) -> None:
    unknown = [p for p in value.split(",") if p and p not in llama_cpp.ENGINES[1:]]
    if unknown or not value.strip(","):
        raise ValueError(f"unknown peer {(unknown or [value])[0]!r}")


def main(argv: list[str] | None = None) -> int:
    if argv and "--serve" in argv:  # the server's load test has options of its own
        return serve_load.run(build_serve_parser().parse_args([a for a in argv if a != "--serve"]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.peers:
        return llama_cpp.run(args)
    if args.device in ("", "none"):
        args.device = None
    elif args.device and "," in args.device:
        parser.error(f"argument --device: one profile without --peers, got {args.device!r}")

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
                else [max(m.min_budget, expert_bytes * p // 100) for p in args.budgets]
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
