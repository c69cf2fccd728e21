"""`edgemoe convert SRC -o DST`: a thin command over converters.convert.convert (and, with
--bits auto, planning.allocate.convert_auto)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from ..converters.convert import convert
from ..converters.gguf import format_gguf_report
from ..errors import EdgeMoEError
from ..planning.allocate import convert_auto, format_allocation, parse_fraction, parse_tokens
from ..planning.routing import profile_model
from .common import Parser, checked, comma_list, existing_file, existing_path, int_of, whole

# --tolerance, --expert-bytes: checked here, read again by parse_fraction where used
fraction = checked(parse_fraction, "a fraction like 2% or 0.02")


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe convert",
        description="Convert a Hugging Face MoE checkpoint (safetensors) or a llama.cpp GGUF file into an "
        "edgemoe model directory.",
    )
    p.add_argument("src", help="checkpoint folder (config.json + *.safetensors + tokenizer files), or a .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="DST", help="model directory to create")
    p.add_argument(
        "--bits",
        choices=("16", "8", "4", "3", "2", "auto"),
        default=None,
        help="expert bitwidth: 16 keeps the checkpoint's floats, 8/4/3/2 group-quantize, auto picks one "
        "per expert from its measured importance (default 16; a GGUF: its experts' type's, Q4_0 -> 4, "
        "Q8_0 -> 8, carried over exactly)",
    )
    p.add_argument(
        "--backbone-bits",
        type=int_of(16, 8, 4),
        choices=(16, 8, 4),
        default=None,
        help="bitwidth of the backbone's attention/MLP/output matrices (routers, embeddings and norms "
        "stay as stored); default 16 with --bits 16, else 8 (a GGUF: its attention matrices' type's)",
    )
    p.add_argument(
        "--group-size",
        type=int_of(32, 64, 128),
        choices=(32, 64, 128),
        default=None,
        help="columns per quantization group (default 64; a GGUF: 32, as its Q4_0/Q8_0 blocks)",
    )
    p.add_argument(
        "--symmetric",
        action="store_true",
        default=None,
        help="symmetric quantization (default asymmetric; a GGUF whose experts carry over: symmetric)",
    )
    p.add_argument(
        "--fallback-bits",
        type=int_of(4, 3, 2),
        choices=(4, 3, 2),
        default=None,
        help="also store a low-bit copy of every expert kept at more bits (experts.fallback.bin), "
        "read on a cache miss for a low gate weight with load(..., fallback=THRESHOLD)",
    )
    a = p.add_argument_group("--bits auto", "a bitwidth per expert, the most important kept at higher precision")
    a.add_argument(
        "--tolerance",
        type=fraction,
        default=None,
        help="allowed perplexity increase over 16-bit on a text of --promise-tokens tokens like --calib, "
        "verified on calibration documents the importance profile did not see, as an upper "
        "prediction bound (default 2%%)",
    )
    a.add_argument(
        "--expert-bytes",
        type=fraction,
        default=None,
        help="expert bytes as a share of the 16-bit experts' instead, e.g. 35%%",
    )
    a.add_argument(
        "--calib", type=existing_file, default=None, help="calibration text (documents separated by a \\x1e line)"
    )
    a.add_argument(
        "--importance",
        type=existing_path,
        default=None,
        help="importance.json (or a model directory holding one) measured on this checkpoint; "
        "default: profile a temporary 16-bit conversion on --calib",
    )
    a.add_argument(
        "--bits-choices",
        type=comma_list(int_of(16, 8, 4, 3, 2), "bitwidths from 16, 8, 4, 3, 2 like 8,4,3,2"),
        default="8,4,3,2",
        help="bitwidths to choose from (default 8,4,3,2; add 16)",
    )
    a.add_argument(
        "--measure",
        choices=("kl", "loss_increase"),
        default="kl",
        help="importance measure the allocation ranks by: the KL from the 16-bit model's predictions "
        "(low noise, default) or the measured calibration loss increase",
    )
    a.add_argument(
        "--calib-tokens",
        type=whole(0),
        default=8192,
        help="leading calibration tokens the importance profile sees, at most half the text "
        "(default 8192; 0: half); candidates are verified on the documents after them",
    )
    a.add_argument(
        "--verify-tokens",
        type=whole(0),
        default=32768,
        help="held-out calibration tokens a candidate is measured on (default 32768; 0: all the rest)",
    )
    a.add_argument(
        "--confidence",
        type=checked(lambda v: parse_fraction(v, zero_ok=True), "a confidence level like 90% or 0.9 (0: none)"),
        default="90%",
        help="level of the one-sided upper bound of the held-out perplexity increase that --tolerance "
        "must hold for (document bootstrap, widened per --promise-tokens; default 90%%; 0: the "
        "measured value itself)",
    )
    a.add_argument(
        "--max-rounds",
        type=whole(1),
        default=None,
        help="most candidates --tolerance measures on the held-out text (default 6); each is tested at "
        "1 - (1 - confidence) / max-rounds so that the one kept holds at --confidence",
    )
    a.add_argument(
        "--promise-tokens",
        type=checked(parse_tokens, "a token count like 50000 (0 or inf: the mean)"),
        default=None,
        metavar="N",
        help="length in tokens of the text --tolerance is promised for: the bound covers the increase on "
        "one new text of N tokens like --calib, its own sampling variation included (a prediction "
        "bound: the confidence margin times sqrt(1 + held-out tokens / N)); default: as long as the "
        "held-out text (margin x sqrt(2)); 0 or inf: the mean over unlimited text (confidence bound)",
    )
    p.add_argument(
        "--routing-calib",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="after converting, trace the model's routing on this text and store the statistics and "
        "predictors in DST (routing.json; what `edgemoe profile DST` shows and prefetch uses)",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    try:
        if args.routing_calib and not os.path.isfile(args.routing_calib):  # before a long conversion, not after
            raise EdgeMoEError(f"--routing-calib {args.routing_calib}: no such file; give a UTF-8 text file")
        if args.bits == "auto":
            choices = args.bits_choices
            expert_bytes, tolerance = parse_fraction(args.expert_bytes), parse_fraction(args.tolerance)
            if tolerance is None and expert_bytes is None:
                tolerance = 0.02
            confidence = parse_fraction(args.confidence, zero_ok=True)
            promise_tokens = parse_tokens(args.promise_tokens)
            m = convert_auto(
                args.src,
                args.output,
                calib=args.calib,
                tolerance=tolerance,
                expert_bytes=expert_bytes,
                importance=args.importance,
                choices=choices,
                group_size=args.group_size or 64,
                symmetric=bool(args.symmetric),
                backbone_bits=args.backbone_bits,
                max_tokens=args.calib_tokens or None,
                measure=args.measure,
                confidence=confidence,
                verify_tokens=args.verify_tokens or None,
                promise_tokens=promise_tokens,
                max_rounds=6 if args.max_rounds is None else args.max_rounds,
                fallback_bits=args.fallback_bits,
                overwrite=args.force,
                progress=not args.quiet,
                log=None if args.quiet else sys.stderr,
            )
        else:
            extra = [
                o
                for o, v in (
                    ("--tolerance", args.tolerance),
                    ("--expert-bytes", args.expert_bytes),
                    ("--calib", args.calib),
                    ("--importance", args.importance),
                    ("--promise-tokens", args.promise_tokens),
                    ("--max-rounds", args.max_rounds),
                )
                if v is not None
            ]
            if extra:
                raise EdgeMoEError(f"{extra[0]} only applies to --bits auto (got --bits {args.bits})")
            m = convert(
                args.src,
                args.output,
                bits=None if args.bits is None else int(args.bits),
                group_size=args.group_size,
                symmetric=args.symmetric,
                progress=not args.quiet,
                overwrite=args.force,
                backbone_bits=args.backbone_bits,
                fallback_bits=args.fallback_bits,
            )
        if args.routing_calib:
            profile_model(args.output, args.routing_calib, log=None if args.quiet else sys.stderr)
    except EdgeMoEError as e:
        print(f"edgemoe convert: error: {e}", file=sys.stderr)
        return 2
    ex = m["experts"]
    if not args.quiet and m["source"].get("format") == "gguf":
        print(format_gguf_report(m), file=sys.stderr)
    if not args.quiet:
        if args.bits == "auto":
            print(format_allocation(m), file=sys.stderr)
        print(
            f"wrote {args.output}: {m['architecture']}, {len(ex['blobs'])} experts at {m['quantization']['bits']} bits "
            f"({ex['file_bytes'] / 1e6:.1f} MB) + backbone at {m['backbone']['bits']} bits "
            f"({m['backbone']['bytes'] / 1e6:.1f} MB) "
            + (
                f"+ {len(m['fallback']['blobs'])} {m['fallback']['bits']}-bit fallback copies "
                f"({m['fallback']['file_bytes'] / 1e6:.1f} MB) "
                if "fallback" in m
                else ""
            )
            + f"in {time.monotonic() - t0:.1f} s",
            file=sys.stderr,
        )
    return 0
