"""What several verbs share: the model argument, the streaming flags, the cluster flags and the
default model."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from ..cluster.moe import DEFAULT_PATH, DEFAULT_TIMEOUT_S, PATHS
from ..devices import load_link, load_profile
from ..errors import EdgeMoEError
from ..planning.default_model import default_model_path
from ..runtime.options import StreamOptions
from ..units import parse_bytes


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag, what is wrong, the accepted form) and exit code 2.

    Every value flag has a `type` from this module, so a bad value stops at parsing, never
    deeper as a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def _bad(value: str, form: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {form}, got {value!r}")


def whole(least: int = 0, most: int | None = None) -> Callable[[str], int]:
    """A whole number in [least, most]."""
    form = f"a whole number >= {least}" if most is None else f"a whole number from {least} to {most}"

    def parse(value: str) -> int:
        try:
            n = int(value.strip())
        except ValueError:
            raise _bad(value, form) from None
        if n < least or (most is not None and n > most):
            raise _bad(value, form)
        return n

    parse.__name__ = "whole number"
    return parse


def number(least: float = 0.0, most: float | None = None, above: bool = False) -> Callable[[str], float]:
    """A finite number >= least (> least with above=True), <= most."""
    form = f"a number {'>' if above else '>='} {least:g}" + ("" if most is None else f" and <= {most:g}")

    def parse(value: str) -> float:
        try:
            x = float(value.strip())
        except ValueError:
            raise _bad(value, form) from None
        if not math.isfinite(x) or x < least or (above and x == least) or (most is not None and x > most):
            raise _bad(value, form)
        return x

    parse.__name__ = "number"
    return parse


def comma_list(item: Callable[[str], Any], form: str) -> Callable[[str], list[Any]]:
    """A comma-separated list, each part checked by `item` (an argparse type)."""

    def parse(value: str) -> list[Any]:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise _bad(value, form)
        try:
            return [item(p) for p in parts]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"expected {form}, got {value!r}: {e}") from None

    parse.__name__ = "list"
    return parse


def one_of(*names: str) -> Callable[[str], str]:
    """One of `names` (a type, for comma_list; a plain flag uses choices=)."""

    def parse(value: str) -> str:
        if value not in names:
            raise _bad(value, "one of " + ", ".join(names))
        return value

    parse.__name__ = "name"
    return parse


def int_of(*allowed: int) -> Callable[[str], int]:
    """One of the whole numbers `allowed` (a type, for comma_list)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = None
        if n not in allowed:
            raise _bad(value, "one of " + ", ".join(map(str, allowed)))
        return n

    parse.__name__ = "number"
    return parse


def checked(check: Callable[[str], Any], form: str) -> Callable[[str], str]:
    """The value as given, once `check(value)` accepts it: it raises EdgeMoEError or ValueError
    naming the problem otherwise. For values the program reads again later (fractions, profiles)."""

    def parse(value: str) -> str:
        try:
            check(value)
        except (EdgeMoEError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"expected {form}, got {value!r} ({e})") from None
        return value

    parse.__name__ = "value"
    return parse


P = TypeVar("P", bound=argparse.ArgumentParser)


def retype(parser: P, types: dict[str, Callable[[str], Any]]) -> P:
    """Gives the flags a library module declared (by their long option) the types above."""
    for action in parser._actions:
        if action.option_strings and action.option_strings[-1] in types:
            action.type = types[action.option_strings[-1]]
    return parser


def existing_file(value: str) -> str:
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"no such file: {value!r}; give the path of an existing file")
    return value


def existing_path(value: str) -> str:
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"no such file or directory: {value!r}")
    return value


def existing_dir(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"no such directory: {value!r}; give an existing directory")
    return value


def size_arg(value: str) -> str:
    """argparse type of a byte size: checked here so a bad value is a one-line usage error."""
    try:
        parse_bytes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _prefetch(value: str) -> None:
    StreamOptions(prefetch=value)


def _cluster_address(value: str) -> None:
    if value != "auto" and not re.fullmatch(r"(ray://)?[A-Za-z0-9.\-]+:\d{1,5}", value):
        raise ValueError("auto, HOST:PORT or ray://HOST:PORT")


profile_arg = checked(load_profile, "a device profile name (`edgemoe devices` lists them) or a profile .json")
link_arg = checked(load_link, "a link profile name (`edgemoe devices` lists them)")
prefetch_arg = checked(_prefetch, "a predictor")
cluster_arg = checked(_cluster_address, "a cluster address: auto, HOST:PORT or ray://HOST:PORT")
threads_arg = whole(1, 1024)


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
    p.add_argument("--threads", type=threads_arg, default=None, help="compute threads (default: all cores)")
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
        type=prefetch_arg,
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
        type=profile_arg,
        default=None,
        metavar="PROFILE",
        help="emulate this device profile's storage speed (devices/profiles, e.g. jetson-tx2-emmc)",
    )
    p.add_argument(
        "--fallback",
        type=number(0.0, above=True),
        default=None,
        metavar="THRESHOLD",
        help="on a miss for an expert whose gate weight is below THRESHOLD (e.g. 0.3), compute it from "
        "its low-bit copy (convert with --fallback-bits) instead of reading the full one",
    )
    p.add_argument(
        "--kv-cache",
        default="float16",
        choices=("float16", "float32"),
        help="what the KV cache keeps keys and values as: float16 (half the memory, each value rounded) or "
        "float32 (exact) (default float16)",
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """--cluster and --cluster-timeout: serve the experts from the devices of a Ray cluster too."""
    p.add_argument(
        "--cluster",
        type=cluster_arg,
        default=None,
        metavar="ADDRESS",
        help="serve experts from the devices of a Ray cluster as well: auto (the one started on this machine), "
        "HOST:PORT or ray://HOST:PORT (docs/cluster.md)",
    )
    p.add_argument(
        "--cluster-timeout",
        type=number(0.0, above=True),
        default=DEFAULT_TIMEOUT_S * 1e3,
        metavar="MS",
        help="how long a layer waits for a device before computing its experts here and marking it down "
        f"(default {DEFAULT_TIMEOUT_S * 1e3:.0f})",
    )
    p.add_argument(
        "--cluster-path",
        choices=PATHS,
        default=DEFAULT_PATH,
        help="how each layer's call travels to a device: socket (a TCP connection each device's server opens) or "
        f"ray (an actor call); default {DEFAULT_PATH} (docs/cluster.md, Data path)",
    )
    p.add_argument(
        "--device-memory",
        type=size_arg,
        default=None,
        help="RAM for experts on each device, e.g. 2GB (default: half of each device's available RAM)",
    )
    p.add_argument(
        "--plan",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="follow this placement plan (`edgemoe cluster plan --json FILE`; its devices are taken in the order "
        "of the cluster's) instead of planning from the devices measured",
    )
    p.add_argument(
        "--link",
        type=link_arg,
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
        kv_cache=args.kv_cache,
    )


def resolve_model(path: str | None) -> str:
    """A model directory: the one named, or the default model (converted into the cache on first use)."""
    return path or str(default_model_path())


def load_args(args: argparse.Namespace) -> dict[str, Any]:
    """edgemoe.load's keyword arguments from add_model_args' flags."""
    return {"memory_budget": args.memory_budget, "threads": args.threads, "options": stream_options(args)}
