"""`edgemoe info [MODEL]`: what a converted model holds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..runtime.engine import load
from ..units import format_bytes
from .common import resolve_model


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgemoe info", description="What a converted model holds.")
    p.add_argument("model", nargs="?", default=None, help="a converted model directory (default: the default model)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    info = load(resolve_model(args.model)).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    total = info["backbone_bytes"] + info["file_embedding_bytes"] + info["expert_bytes"]
    emb = info["file_embedding_bytes"]
    bits = ", ".join(f"{b}-bit: {n}" for b, n in sorted(info["bitwidths"].items()))
    print(
        f"architecture   {info['architecture']}\n"
        f"layers         {info['layers']} ({info['moe_layers']} MoE)\n"
        f"experts        {info['experts_per_layer']} per layer, top-{info['top_k']}\n"
        f"hidden / vocab {info['hidden_size']} / {info['vocab_size']}\n"
        f"backbone       {format_bytes(info['backbone_bytes'])} in RAM ({100 * info['backbone_bytes'] / total:.1f}%)"
        + (f", embeddings {format_bytes(emb)} read by row from the file" if emb else "")
        + "\n"
        f"experts        {format_bytes(info['expert_bytes'])} ({100 * info['expert_bytes'] / total:.1f}%)\n"
        f"bitwidths      {bits}\n"
        f"min budget     {format_bytes(info['min_memory_budget'])}"
    )
    return 0
