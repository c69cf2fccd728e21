"""`edgemoe simulate MODEL (--text FILE | --trace FILE.npz)`: replay a routing trace under each
eviction policy and prefetch predictor (edgemoe.planning.simulate)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..format.routing_file import ROUTING_FILE, load_routing
from ..planning.predictors import RecordedPredictor
from ..planning.routing import collect_trace
from ..planning.simulate import DEFAULT_PREDICTORS, POLICIES, format_rows, run
from ..runtime.engine import load
from ..runtime.prefetch import DEFAULT_RATIO, Predictor, TablePredictor, expert_sizes, load_fits, table_from_routing
from ..runtime.trace import RoutingTrace
from .common import Parser, comma_list, existing_file, number, one_of, whole


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe simulate",
        description="Replay a routing trace through the expert cache under each eviction "
        "policy (LRU, LFU, structure-aware, Belady's oracle) and prefetch predictor.",
    )
    p.add_argument("model", help="a converted model directory (expert sizes; routing.json for the table predictor)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=existing_file, help="held-out text to trace (documents separated by a \\x1e line)")
    src.add_argument("--trace", type=existing_file, help="a trace saved by `edgemoe profile --traces DIR` (eval.npz)")
    p.add_argument("--max-tokens", type=whole(0), default=5000, help="tokens of --text to trace (default 5000)")
    p.add_argument("--window", type=whole(1), default=256)
    p.add_argument(
        "--budgets",
        type=comma_list(number(0.0, 1.0, above=True), "fractions in (0, 1] like 0.25,0.5"),
        default="0.25,0.5,0.75",
        help="fractions of all expert bytes",
    )
    p.add_argument(
        "--policies",
        type=comma_list(one_of(*POLICIES), f"policies from {', '.join(POLICIES)}"),
        default=",".join(POLICIES),
    )
    p.add_argument(
        "--prefetch",
        type=comma_list(one_of(*DEFAULT_PREDICTORS), f"predictors from {', '.join(DEFAULT_PREDICTORS)}"),
        default=",".join(DEFAULT_PREDICTORS),
        help="predictors to try: none, table (needs routing.json), lookahead_moe_in, "
        "lookahead_layer_out, fitted_moe_in, fitted_layer_out (a trace that recorded them)",
    )
    p.add_argument(
        "--ratio", type=number(0.0, above=True), default=DEFAULT_RATIO, help="prefetch bytes per layer / bytes needed"
    )
    p.add_argument("--json", default=None, help="write every row to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`edgemoe simulate MODEL (--text FILE | --trace FILE.npz)`: policies x budgets x predictors."""
    args = build_parser().parse_args(argv)

    m = load(args.model)
    sizes = expert_sizes(m)
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        if args.max_tokens:
            trace = trace[: args.max_tokens]
    else:
        trace = collect_trace(
            m, args.text, args.window, args.max_tokens, seed=1, fits=load_fits(args.model, m.config.rms_norm_eps)
        )
    predictors: dict[str, Predictor | None] = {}
    for name in args.prefetch:
        if name == "none":
            predictors[name] = None
        elif name == "table":
            if (Path(args.model) / ROUTING_FILE).exists():
                predictors[name] = TablePredictor(table_from_routing(load_routing(args.model)))
            else:
                print(f"no {ROUTING_FILE}: skipping the table predictor (run `edgemoe profile` first)", file=sys.stderr)
        elif name.removeprefix("lookahead_") in trace.lookahead:
            predictors[name] = RecordedPredictor(trace.top_k, name.removeprefix("lookahead_"))
        else:
            print(f"skipping predictor {name!r}: unknown, or not recorded in the trace", file=sys.stderr)
    rows = run(trace, sizes, args.budgets, args.policies, predictors, ratio=args.ratio)
    print(
        f"{trace.tokens} tokens, {len(trace.moe_layers)} MoE layers x {trace.num_experts} experts, "
        f"top-{trace.top_k}; all experts {sizes.sum() / 1e6:.2f} MB; bytes per token, 'waited' = read on a miss"
    )
    print(format_rows(rows, float(sizes.sum()), trace.tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
