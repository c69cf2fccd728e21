"""`edgemoe run [MODEL] -p PROMPT`: generate text, streamed, and say how it went."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..cluster import PlanFigures, attach, format_cluster_stats
from ..runtime.engine import Model, load
from ..runtime.stats import format_stats
from ..units import format_bytes
from .common import Parser, add_cluster_args, add_model_args, load_args, number, resolve_model, whole


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="edgemoe run", description="Generate text from a prompt.")
    add_model_args(p)
    add_cluster_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", type=whole(1), default=64, help="new tokens (default 64)")
    p.add_argument("--temperature", type=number(0.0), default=0.8, help="sampling temperature (default 0.8; 0: greedy)")
    p.add_argument("--top-k", type=whole(0), default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument(
        "--top-p", type=number(0.0, 1.0, above=True), default=0.95, help="nucleus sampling mass (default 0.95)"
    )
    p.add_argument(
        "--seed",
        type=whole(0, 2**63 - 1),
        default=None,
        help="sampling seed, for a reproducible text (default: random)",
    )
    p.add_argument("--stats", action="store_true", help="print a summary and a per-layer table of the statistics")
    p.add_argument("--stats-json", action="store_true", help="print every statistic as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    m = load(resolve_model(args.model), **load_args(args))
    try:
        if args.cluster:
            attach(
                m,
                args.cluster,
                timeout_s=args.cluster_timeout / 1e3,
                device_memory=args.device_memory,
                plan=args.plan,
                figures=PlanFigures(link=args.link),
                path=args.cluster_path,
            )
        generate(m, args)
    finally:
        m.close()  # a cluster's device servers stop with the command
    return 0


def generate(m: Model, args: argparse.Namespace) -> None:
    """Stream the continuation to stdout, then a summary (and the statistics asked for) to stderr."""
    pieces = m.generate(
        args.prompt,
        max_new_tokens=args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=True,
    )
    if not m.encoder_decoder:  # a decoder continues the prompt; an encoder-decoder answers it
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = m.stats()
    print(
        f"[{s['tokens_generated']} tokens, {s['decode_tokens_per_s']:.1f} tok/s decode, "
        f"prefill {s['prompt_tokens']} tokens in {s['prefill_seconds']:.2f}s, "
        f"cache hit rate {100 * s['cache_hit_rate']:.1f}%, read {format_bytes(s['bytes_read'])} "
        f"({'O_DIRECT' if s['direct_io'] else 'buffered'}), peak RSS {format_bytes(s['peak_rss_bytes'])}]",
        file=sys.stderr,
    )
    if args.stats:
        print(format_stats(s), file=sys.stderr)
        if "cluster" in s:
            print(format_cluster_stats(s), file=sys.stderr)
    if args.stats_json:
        print(json.dumps(s, indent=2), file=sys.stderr)
