"""A streaming chat in the terminal with edgemoe's Python API.

    python examples/stream_chat.py [MODEL] [--memory-budget 40MB]

Type a line, watch the reply stream; an empty line or end of input quits. Without MODEL it
uses the shipped default model (a small Mixtral trained on Debian package texts: expect
man-page flavoured text, not answers).
"""

import argparse
import sys

import edgemoe
from edgemoe.planning.default_model import default_model_path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", nargs="?", help="a converted model directory (default: the default model)")
p.add_argument("--memory-budget", default=None, help="RAM for experts, e.g. 40MB (default: all of them)")
p.add_argument("--max-new-tokens", type=int, default=60)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

model = edgemoe.load(args.model or default_model_path(), memory_budget=args.memory_budget)
transcript = ""
for turn, line in enumerate(sys.stdin):
    if not line.strip():
        break
    transcript += f"User: {line.strip()}\nAssistant:"
    print("assistant>", end="", flush=True)
    reply = ""
    pieces = model.generate(
        transcript, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=args.seed + turn, stream=True
    )
    for piece in pieces:
        if "\n" in piece:  # the reply ends with its line
            reply += piece.split("\n")[0]
            print(piece.split("\n")[0], end="", flush=True)
            break
        reply += piece
        print(piece, end="", flush=True)
    transcript += reply + "\n"
    s = model.stats()
    print(f"\n  [{s['decode_tokens_per_s']:.0f} tok/s, cache hit rate {s['cache_hit_rate']:.0%}]", flush=True)
