"""`edgemoe info [MODEL]`: what a converted model holds; given a Hugging Face config.json (or a
folder holding one and no manifest.json), what the model would hold and the smallest memory it
runs in, before anything is downloaded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..format.quant import GROUP_SIZES
from ..planning.fit import BACKBONE_BITS, is_config_path, plan_config, read_config
from ..runtime.engine import load
from ..units import format_bytes
from .common import Parser, int_of, resolve_model, whole


def build_parser() -> Parser:
    p = Parser(
        prog="edgemoe info",
        description="What a converted model holds, or, from a Hugging Face config.json alone, what a model "
        "would hold and the smallest memory it runs in.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a converted model directory, or a config.json (or a folder holding one and no manifest.json) "
        "to size before downloading (default: the default model)",
    )
    p.add_argument("--json", action="store_true")
    sizing = p.add_argument_group("sizing from a config.json")
    sizing.add_argument(
        "--context", type=whole(1), default=256, help="tokens of context the memory limit allows (default 256)"
    )
    sizing.add_argument(
        "--group-size",
        type=int_of(*GROUP_SIZES),
        choices=GROUP_SIZES,
        default=64,
        help="quantization group (default 64)",
    )
    sizing.add_argument("--symmetric", action="store_true", help="symmetric quantization (no mins)")
    sizing.add_argument(
        "--backbone-bits",
        type=int_of(*BACKBONE_BITS),
        choices=BACKBONE_BITS,
        default=None,
        help="the backbone's bits in the memory limit (default as `edgemoe convert`: 16 with 16-bit experts, else 8)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None and is_config_path(args.model):
        plan = plan_config(
            read_config(args.model), args.context, args.group_size, args.symmetric, args.backbone_bits, args.model
        )
        print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
        return 0

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


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B"


def render_plan(plan: dict[str, Any]) -> str:
    """The plan of plan_config as a few lines and a table, one row per expert bitwidth."""
    params = plan["params"]
    runs = "edgemoe runs it" if plan["supported"] else plan["why_not"]
    backbone = ", ".join(f"{b}-bit {format_bytes(n)}" for b, n in plan["backbone_bytes"].items() if n is not None)
    where = "held in RAM (tied output head)" if plan["embeddings"] == "ram" else "read by row from the file"
    lines = [
        f"config         {plan['config']}",
        f"architecture   {plan['architecture']}: {runs}",
        f"parameters     {_billions(params['total'])} total, {_billions(params['active'])} active per token, "
        f"the embedding table's {_billions(params['embedding'])} included",
        f"layers         {plan['layers']} ({plan['moe_layers']} MoE), "
        f"{plan['experts_per_layer']} experts per layer, top-{plan['top_k']}",
        f"hidden / vocab {plan['hidden_size']} / {plan['vocab_size']}",
        f"backbone       {backbone}",
        f"embeddings     {format_bytes(plan['embedding_bytes'])}, {where} under a budget",
        "",
        f"{'experts':<9}{'all experts':>12}{'one expert':>12}{'min budget':>12}{'min memory limit':>18}  backbone",
    ]
    for bits, e in plan["experts"].items():
        if e is None:
            lines.append(f"{bits:>2}-bit    (the group size does not divide the expert's dimensions)")
            continue
        lines.append(
            f"{bits:>2}-bit   {format_bytes(e['bytes']):>12}{format_bytes(e['expert_bytes']):>12}"
            f"{format_bytes(e['min_budget']):>12}{format_bytes(e['min_memory_limit']):>18}  {e['backbone_bits']}-bit"
        )
    lines.append("")
    lines += [f"- {a}" for a in plan["assumptions"]]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
