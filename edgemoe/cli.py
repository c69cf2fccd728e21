"""The `edgemoe` command: thin verbs over functions a Python user can call too."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import EdgeMoEError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a converted model directory (default: the shipped default model, converted on first use)")
    p.add_argument("--memory-budget", default=None,
                   help="RAM for expert weights, e.g. 300MB or 1.5GB (default: unbounded)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--buffered-io", action="store_true", help="read experts through the page cache, not O_DIRECT")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu", "structure"), help="expert cache eviction (default lru)")
    p.add_argument("--prefetch", default=None,
                   help="predictive preloading: table, lookahead or fitted (default: none); see `edgemoe profile`")
    p.add_argument("--preload", default="auto", choices=("auto", "all", "warm", "none"),
                   help="what is read at load: every expert, a warm start of the most used ones that fit the "
                        "budget, or nothing (default auto: all when the budget holds them, else warm)")
    p.add_argument("--device", default=None, metavar="PROFILE",
                   help="emulate this device profile's storage speed (devices/profiles, e.g. jetson-tx2-emmc)")
    p.add_argument("--fallback", type=float, default=None, metavar="THRESHOLD",
                   help="on a miss for an expert whose gate weight is below THRESHOLD (e.g. 0.3), compute it from "
                        "its low-bit copy (convert with --fallback-bits) instead of reading the full one")


def resolve_model(path: str | None) -> str:
    """A model directory: the one named, or the default model (converted into the cache on first use)."""
    if path:
        return path
    from .default import default_model_path

    return str(default_model_path())


def cmd_run(args: argparse.Namespace) -> int:
    from .model import format_bytes, load

    m = load(resolve_model(args.model), memory_budget=args.memory_budget, threads=args.threads,
             direct_io=not args.buffered_io, policy=args.policy, prefetch=args.prefetch, device=args.device,
             preload={"auto": None, "none": False}.get(args.preload, args.preload),
             **({"fallback": True, "fallback_threshold": args.fallback} if args.fallback is not None else {}))
    pieces = m.generate(args.prompt, max_new_tokens=args.n, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stream=True)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = m.stats()
    print(f"[{s['tokens_generated']} tokens, {s['decode_tokens_per_s']:.1f} tok/s decode, "
          f"prefill {s['prompt_tokens']} tokens in {s['prefill_seconds']:.2f}s, "
          f"cache hit rate {100 * s['cache_hit_rate']:.1f}%, read {format_bytes(s['bytes_read'])} "
          f"({'O_DIRECT' if s['direct_io'] else 'buffered'}), peak RSS {format_bytes(s['peak_rss_bytes'])}]",
          file=sys.stderr)
    if args.stats:
        from .stats import format_stats

        print(format_stats(s), file=sys.stderr)
    if args.stats_json:
        print(json.dumps(s, indent=2), file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model import format_bytes, load

    info = load(resolve_model(args.model)).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    total = info["backbone_bytes"] + info["file_embedding_bytes"] + info["expert_bytes"]
    emb = info["file_embedding_bytes"]
    bits = ", ".join(f"{b}-bit: {n}" for b, n in sorted(info["bitwidths"].items()))
    print(f"architecture   {info['architecture']}\n"
          f"layers         {info['layers']} ({info['moe_layers']} MoE)\n"
          f"experts        {info['experts_per_layer']} per layer, top-{info['top_k']}\n"
          f"hidden / vocab {info['hidden_size']} / {info['vocab_size']}\n"
          f"backbone       {format_bytes(info['backbone_bytes'])} in RAM ({100 * info['backbone_bytes'] / total:.1f}%)"
          + (f", embeddings {format_bytes(emb)} read by row from the file" if emb else "") + "\n"
          f"experts        {format_bytes(info['expert_bytes'])} ({100 * info['expert_bytes'] / total:.1f}%)\n"
          f"bitwidths      {bits}\n"
          f"min budget     {format_bytes(info['min_memory_budget'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemoe", description="Run Mixture-of-Experts LLMs with experts on flash.")
    sub = parser.add_subparsers(dest="verb", required=True)

    sub.add_parser("convert", help="convert a Hugging Face checkpoint (see `edgemoe convert -h`)", add_help=False)
    sub.add_parser("bench", help="compare expert-loading modes side by side (see `edgemoe bench -h`)", add_help=False)
    sub.add_parser("eval", help="perplexity and tokens/s on a text file (see `edgemoe eval -h`)", add_help=False)
    sub.add_parser("profile", help="routing statistics and predictors (routing.json); with --importance, "
                   "per-expert importance (importance.json)", add_help=False)
    sub.add_parser("simulate", help="replay a routing trace under each eviction policy and predictor",
                   add_help=False)

    p = sub.add_parser("run", help="generate text")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", type=int, default=64, help="new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8; 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for a reproducible text (default: random)")
    p.add_argument("--stats", action="store_true", help="print a summary and a per-layer table of the statistics")
    p.add_argument("--stats-json", action="store_true", help="print every statistic as JSON")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("info", help="what a converted model holds")
    p.add_argument("model", nargs="?", default=None, help="a converted model directory (default: the default model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    return parser


# verbs with their own argument parsers: module (relative to this package), imported only when used
DELEGATED = {"convert": ".converters.cli", "bench": ".bench", "eval": ".evaluate", "profile": ".routing",
             "simulate": ".simulate"}


def _delegate(verb: str, argv: list[str]) -> int:
    from importlib import import_module

    module = ".importance" if verb == "profile" and "--importance" in argv else DELEGATED[verb]
    return import_module(module, __package__).main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        verb = argv[0] if argv else None
        if verb in DELEGATED:
            return _delegate(verb, argv[1:])
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
