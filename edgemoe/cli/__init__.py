"""The `edgemoe` command: one module per verb, each a thin main() over functions a Python
user can call too."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

from ..errors import EdgeMoEError

# verb -> (module in this package, one line of help)
VERBS = {
    "run": ("run", "generate text"),
    "chat": ("chat", "chat with a model in the terminal, streamed, with its chat template"),
    "serve": ("serve", "an OpenAI-compatible HTTP server with a live demo of the expert cache"),
    "info": ("info", "what a converted model holds"),
    "convert": ("convert", "convert a Hugging Face checkpoint into a model directory"),
    "eval": ("eval", "perplexity and tokens/s on a text file"),
    "profile": (
        "profile",
        "routing statistics and predictors (routing.json); with --importance, per-expert importance (importance.json)",
    ),
    "simulate": ("simulate", "replay a routing trace under each eviction policy and predictor"),
    "bench": ("bench", "compare expert-loading modes side by side, or edgemoe against llama.cpp (--peers)"),
    "devices": ("devices", "device profiles; with --detect, this machine measured and settings for a model"),
    "cluster": ("cluster", "one model's experts across several devices: `cluster plan` places them"),
    "mixture": ("mixture", "a mixture of specialist models: plan which to enable under budgets, run, bench"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [
        "usage: edgemoe VERB [options]   (edgemoe VERB -h for a verb's options)",
        "",
        "Run Mixture-of-Experts LLMs with experts on flash.",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"{usage()}\n\nedgemoe: error: unknown verb {verb!r}: choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return int(import_module(f".{VERBS[verb][0]}", __name__).main(rest))
    except EdgeMoEError as e:
        print(f"edgemoe {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # argparse's exits (-h, a bad value) as the verb's return code
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        raise


if __name__ == "__main__":
    sys.exit(main())
