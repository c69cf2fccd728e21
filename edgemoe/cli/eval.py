"""`edgemoe eval [MODEL] --text FILE`: perplexity and tokens/s."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..planning.default_model import shipped_text
from ..planning.evaluate import perplexity
from ..runtime.engine import load
from .common import Parser, existing_file, resolve_model, size_arg, threads_arg, whole


def build_parser() -> Parser:
    p = Parser(prog="edgemoe eval", description="Perplexity of a model on a text file.")
    p.add_argument(
        "model", nargs="?", default=None, help="a converted model directory (default: the shipped default model)"
    )
    p.add_argument(
        "--text",
        type=existing_file,
        default=None,
        help="UTF-8 text file; documents separated by a line holding only "
        "\\x1e (default for the default model: its shipped test.txt)",
    )
    p.add_argument("--window", type=whole(1), default=256, help="tokens per window (default 256)")
    p.add_argument(
        "--stride",
        type=whole(1),
        default=None,
        help="tokens between window starts (default: the window, i.e. no overlap)",
    )
    p.add_argument("--max-tokens", type=whole(1), default=None, help="score only the first N tokens of the text")
    p.add_argument(
        "--memory-budget", type=size_arg, default=None, help="RAM for expert weights, e.g. 20MB (default: unbounded)"
    )
    p.add_argument("--threads", type=threads_arg, default=None, help="compute threads (default: all cores)")
    p.add_argument("--buffered-io", action="store_true", help="read experts through the page cache, not O_DIRECT")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`edgemoe eval [MODEL] --text FILE`: perplexity and tokens/s."""
    args = build_parser().parse_args(argv)

    text = shipped_text(args.text, args.model, "test.txt", "no text to score: pass --text FILE")
    m = load(
        resolve_model(args.model),
        memory_budget=args.memory_budget,
        threads=args.threads,
        direct_io=not args.buffered_io,
    )
    r = perplexity(
        m,
        Path(text),
        window=args.window,
        stride=args.stride,
        max_tokens=args.max_tokens,
        log=None if args.json else sys.stderr,
    )
    r["expert_bytes"] = m.info()["expert_bytes"]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"perplexity {r['ppl']:.4f} (nll {r['nll']:.4f} nats/token) over {r['tokens']} tokens of {text}, "
            f"{r['windows']} windows of {r['window']}; {r['tokens_per_s']:.0f} tokens/s"
        )
    return 0
