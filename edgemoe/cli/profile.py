"""`edgemoe profile [MODEL]`: routing statistics and prefetch predictors (routing.json); with
--importance, per-expert importance (importance.json) for `edgemoe convert --bits auto`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..format.quant import GROUP_SIZES
from ..format.routing_file import ROUTING_FILE, load_routing
from ..planning.default_model import shipped_text
from ..planning.importance import format_report as format_importance
from ..planning.importance import profile_importance
from ..planning.routing import format_report, profile_model
from ..runtime.engine import load
from .common import Parser, comma_list, existing_file, int_of, number, resolve_model, threads_arg, whole


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe profile",
        description="Routing statistics of a model on calibration text (writes routing.json). "
        "With --importance: per-expert importance instead "
        "(see `edgemoe profile --importance -h`).",
    )
    p.add_argument(
        "model", nargs="?", default=None, help="a converted model directory (default: the shipped default model)"
    )
    p.add_argument(
        "--calib",
        type=existing_file,
        default=None,
        help="calibration text file (documents separated by a \\x1e line); "
        "without it, show the model's stored routing.json (the default model: profile its calib.txt "
        "if none is stored)",
    )
    p.add_argument(
        "--eval",
        type=existing_file,
        default=None,
        help="held-out text to score the predictors on (default: the last 20%% of the calibration tokens)",
    )
    p.add_argument(
        "--window", type=whole(1), default=256, help="prefill window in tokens; the KV cache resets per window"
    )
    p.add_argument("--max-tokens", type=whole(0), default=50_000, help="calibration tokens (0: the whole file)")
    p.add_argument("--eval-max-tokens", type=whole(0), default=20_000, help="held-out tokens (0: the whole file)")
    p.add_argument(
        "--ratio",
        type=number(0.0, above=True),
        default=1.5,
        help="prefetch byte budget per layer, as a multiple of the bytes a token needs (default 1.5)",
    )
    p.add_argument("--traces", default=None, help="also save the traces (calib.npz, eval.npz) in this directory")
    p.add_argument("--no-fit", action="store_true", help="do not fit the look-ahead maps (routing.safetensors)")
    p.add_argument("--no-save", action="store_true", help="do not write routing.json")
    p.add_argument("--json", action="store_true", help="print routing.json's statistics as JSON, not a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`edgemoe profile [MODEL] [--calib FILE] [--eval FILE]`: trace, write routing.json, print the table.
    Without --calib it prints the routing.json the model directory already holds; the default
    model is profiled on its shipped calib.txt (the validation split)."""
    if "--importance" in list(argv or []):
        return importance_main(argv)
    args = build_parser().parse_args(argv)

    model_dir = resolve_model(args.model)
    if args.calib is None and (Path(model_dir) / ROUTING_FILE).exists():
        doc = load_routing(model_dir)
    else:
        calib = shipped_text(
            args.calib,
            args.model,
            "calib.txt",
            f"{model_dir} holds no {ROUTING_FILE} yet: pass --calib FILE to profile it",
        )
        doc = profile_model(
            model_dir,
            calib,
            args.eval,
            window=args.window,
            max_tokens=args.max_tokens or None,
            eval_max_tokens=args.eval_max_tokens or None,
            save=not args.no_save,
            traces_dir=args.traces,
            ratio=args.ratio,
            fit=not args.no_fit,
            log=sys.stderr,
        )
    if args.json:
        print(json.dumps({k: v for k, v in doc.items() if k not in ("table", "usage")}, indent=2))
    else:
        print(format_report(doc))
    return 0


def build_importance_parser() -> Parser:
    p = Parser(
        prog="edgemoe profile --importance",
        description="Expert importance: calibration loss increase when one expert alone "
        "drops to a low bitwidth (writes importance.json).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a converted model directory, ideally 16-bit (default: the shipped default model)",
    )
    p.add_argument("--importance", action="store_true", help="accepted so `edgemoe profile` can pass its argv on")
    p.add_argument(
        "--calib",
        type=existing_file,
        default=None,
        help="calibration text (default for the default model: its calib.txt)",
    )
    p.add_argument(
        "--bits",
        type=comma_list(int_of(2, 3, 4, 8), "bitwidths from 2, 3, 4, 8 like 2 or 2,3"),
        default="2",
        help="bitwidth(s) one expert drops to, e.g. 2 or 2,3 (default 2)",
    )
    p.add_argument("--group-size", type=int_of(*GROUP_SIZES), choices=GROUP_SIZES, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--window", type=whole(1), default=256, help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=whole(0), default=8192, help="calibration tokens (default 8192; 0: all)")
    p.add_argument("--threads", type=threads_arg, default=None)
    p.add_argument("--no-save", action="store_true", help="do not write importance.json")
    p.add_argument("--json", action="store_true", help="print importance.json instead of a summary")
    return p


def importance_main(argv: Sequence[str] | None = None) -> int:
    """`edgemoe profile [MODEL] --importance --calib FILE`: measure, write importance.json, print a summary."""
    args = build_importance_parser().parse_args(argv)

    calib = str(shipped_text(args.calib, args.model, "calib.txt", "no calibration text: pass --calib FILE"))
    path = resolve_model(args.model)
    doc = profile_importance(
        path,
        calib,
        args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        window=args.window,
        max_tokens=args.max_tokens or None,
        save=not args.no_save,
        model=load(path, threads=args.threads),
        log=sys.stderr,
    )
    print(json.dumps(doc, indent=1) if args.json else format_importance(doc))
    return 0
