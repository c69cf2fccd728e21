"""What several verbs share: the model argument, the streaming flags, the cluster flags and the
default model."""

from __future__ import annotations

import argparse
from typing import Any

from ..cluster.moe import DEFAULT_TIMEOUT_S
from ..planning.default_model import default_model_path
from ..runtime.options import StreamOptions
from ..units import parse_bytes


def size_arg(value: str) -> str:
    """argparse type of a byte size: checked here so a bad value is a one-line usage error."""
    try:
        parse_bytes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --memory-budget, --threads and the streaming flags (StreamOptions)."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a converted model directory (default: the shipped default model, converted on first use)",
    )
    p.add_argument(
        "--memory-budget",
        type=size_arg,
        default=None,
        help="RAM for expert weights, e.g. 300MB or 1.5GB (default: unbounded)",
    )
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--buffered-io", action="store_true", help="read experts through the page cache, not O_DIRECT")
    p.add_argument(
        "--policy",
        default="lru",
        choices=("lru", "lfu", "structure"),
        help="expert cache eviction: least recently used, least used, or structure-aware "
        "(decayed use rate over distance to the expert's layer) (default lru)",
    )
    p.add_argument(
        "--prefetch",
        default=None,
        help="predictive preloading: table, lookahead or fitted (default: none); see `edgemoe profile`",
    )
    p.add_argument(
        "--preload",
        default="auto",
        choices=("auto", "all", "warm", "none"),
        help="what is read at load: every expert, a warm start of the most used ones that fit the "
        "budget, or nothing (default auto: all when the budget holds them, else warm)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="PROFILE",
        help="emulate this device profile's storage speed (devices/profiles, e.g. jetson-tx2-emmc)",
    )
    p.add_argument(
        "--fallback",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="on a miss for an expert whose gate weight is below THRESHOLD (e.g. 0.3), compute it from "
        "its low-bit copy (convert with --fallback-bits) instead of reading the full one",
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """--cluster and --cluster-timeout: serve the experts from the devices of a Ray cluster too."""
    p.add_argument(
        "--cluster",
        default=None,
        metavar="ADDRESS",
        help="serve experts from the devices of a Ray cluster as well: auto (the one started on this machine), "
        "HOST:PORT or ray://HOST:PORT (docs/cluster.md)",
    )
    p.add_argument(
        "--cluster-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S * 1e3,
        metavar="MS",
        help="how long a layer waits for a device before computing its experts here and marking it down "
        f"(default {DEFAULT_TIMEOUT_S * 1e3:.0f})",
    )
    p.add_argument(
        "--device-memory",
        type=size_arg,
        default=None,
        help="RAM for experts on each device, e.g. 2GB (default: half of each device's available RAM)",
    )
    p.add_argument(
        "--plan",
        default=None,
        metavar="FILE",
        help="follow this placement plan (`edgemoe cluster plan --json FILE`; its devices are taken in the order "
        "of the cluster's) instead of planning from the devices measured",
    )
    p.add_argument(
        "--link",
        default=None,
        metavar="LINK",
        help="plan with this link profile's round trip and bandwidth instead of measuring them (devices/links.json)",
    )


def stream_options(args: argparse.Namespace) -> StreamOptions:
    """The StreamOptions the flags of add_model_args ask for."""
    return StreamOptions(
        policy=args.policy,
        prefetch=args.prefetch,
        preload=args.preload,
        device=args.device,
        fallback=args.fallback,
        direct_io=not args.buffered_io,
    )


def resolve_model(path: str | None) -> str:
    """A model directory: the one named, or the default model (converted into the cache on first use)."""
    return path or str(default_model_path())


def load_args(args: argparse.Namespace) -> dict[str, Any]:
    """edgemoe.load's keyword arguments from add_model_args' flags."""
    return {"memory_budget": args.memory_budget, "threads": args.threads, "options": stream_options(args)}
