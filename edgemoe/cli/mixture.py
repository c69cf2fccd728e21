"""`edgemoe mixture SUBCOMMAND`: a mixture of specialist models (docs/mixture.md).

edgemoe mixture plan MIX --devices P,... --energy J --latency MS   choose the specialists to enable, say why
edgemoe mixture run MIX -p PROMPT [--cluster ADDR] [--devices ...]  generate with the gated mixture
edgemoe mixture bench MIX ...                                       the quality/latency/energy frontier
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import list_links, list_profiles, load_profile
from ..errors import MixtureError
from .common import Parser, checked, cluster_arg, comma_list, existing_dir, link_arg, number, retype, size_arg, whole

DEVICES_HELP = (
    "device profiles, one per specialist in mixture.json's order, comma-separated (one name: every "
    f"specialist on that device); known: {', '.join(list_profiles())}"
)


def _latency_classes(value: str) -> dict[str, float]:
    """'50' or 'chat=50,batch=400' (milliseconds per token) -> {class: seconds}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, ms = part.rpartition("=")
        name = name.strip() if sep else "default"
        x = float(ms)
        if not np.isfinite(x) or x <= 0 or not name:
            raise ValueError(f"{part!r} is not CLASS=MS with MS > 0")
        out[name] = x / 1e3
    if not out:
        raise ValueError("no budget given")
    return out


latency_arg = checked(_latency_classes, "milliseconds per token, or CLASS=MS,... per request class (chat=50,batch=400)")
devices_arg = comma_list(checked(load_profile, "a device profile name or .json"), "device profiles, comma-separated")


def add_mixture_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mix", type=existing_dir, help="a mixture directory (mixture.json, specialists, gate.onnx)")
    p.add_argument("--devices", type=devices_arg, default=None, metavar="PROFILES", help=DEVICES_HELP)
    p.add_argument(
        "--link",
        type=link_arg,
        default=None,
        help=f"the link to every device (default each profile's): {', '.join(list_links())}",
    )


def add_budget_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--energy",
        type=number(0.0, above=True),
        required=required,
        default=None,
        metavar="J",
        help="energy budget: joules per token summed over the enabled specialists",
    )
    p.add_argument(
        "--latency",
        type=latency_arg,
        required=required,
        default=None,
        metavar="MS",
        help="latency budget in milliseconds per token (the slowest enabled specialist plus its link); "
        "per request class as CLASS=MS,...",
    )


def format_choice(
    names: Sequence[str],
    costs: Any,
    heldout: Any,
    choice: Any,
    energy_budget: float,
    latency_budget: float,
    cls: str,
) -> str:
    """The choice for one request class and why: what it costs, what the best single specialist
    that fits would lose, and why each other specialist is not enabled."""
    order = [costs.names.index(n) for n in names]
    energy, latency = costs.energy_j[order], costs.latency_s[order]
    enabled = list(choice.enabled)
    lines = [
        f"class {cls}: latency <= {latency_budget * 1e3:.4g} ms per token, energy <= {energy_budget:.4g} J per token",
        f"  enable      {', '.join(names[i] for i in enabled)}",
        f"  expected    {choice.loss:.4f} nats per token (perplexity {np.exp(choice.loss):.3f}) on the held-out set",
        f"  costs       {choice.energy_j:.4g} J per token, {choice.latency_s * 1e3:.4g} ms per token "
        f"(slowest: {names[enabled[int(np.argmax(latency[enabled]))]]})",
    ]
    fits = [i for i in range(len(names)) if energy[i] <= energy_budget and latency[i] <= latency_budget]
    if fits:
        best = min(fits, key=lambda i: heldout.loss((i,)))
        lb = heldout.loss((best,))
        gain = (1 - np.exp(choice.loss) / np.exp(lb)) * 100
        lines.append(
            f"  vs single   {names[best]} alone (the best that fits): perplexity {np.exp(lb):.3f}; the choice's is "
            f"{gain:.1f}% lower"
        )
    for i in range(len(names)):
        if i in enabled:
            continue
        if i in choice.excluded:
            why = choice.excluded[i]
        elif choice.energy_j + energy[i] > energy_budget:
            why = f"adding it would spend {choice.energy_j + energy[i]:.4g} J per token, over the energy budget"
        else:
            with_i = heldout.loss(tuple(sorted(enabled + [i])))
            why = f"adding it would not lower the expected loss ({with_i:.4f} nats)"
        lines.append(f"  not {names[i]}: {why}")
    lines.append(
        f"  search      {choice.evaluated} loss evaluations (of {2 ** len(names) - 1} subsets), "
        f"{choice.pruned_infeasible} branches cut as infeasible, {choice.pruned_dominated} as dominated, "
        f"{choice.seconds * 1e3:.1f} ms"
    )
    return "\n".join(lines)


def format_costs(costs: Any) -> str:
    rows = [f"{'specialist':<16} {'device':<24} {'ms/token':>9} {'link ms':>8} {'J/token':>10}"]
    for r in costs.table():
        rows.append(
            f"{r['name']:<16} {r['device']:<24} {r['device_s'] * 1e3:>9.4g} {r['link_s'] * 1e3:>8.3g} {r['energy_j']:>10.4g}"
        )
    return "\n".join(rows)


def build_plan_parser() -> Parser:
    p = Parser(
        prog="edgemoe mixture plan",
        description="Choose the specialists to enable per request class: the lowest expected loss on the "
        "held-out set (the gate restricted to them, top-k) within an energy budget and a latency budget, "
        "from device profiles. Prints the choice and why.",
    )
    add_mixture_args(p)
    add_budget_args(p, required=True)
    p.add_argument("--json", metavar="FILE", default=None, help="also write the choice as JSON")
    return p


def plan_main(argv: Sequence[str]) -> int:
    from ..mixture.gate import Gate
    from ..mixture.runtime import mixture_costs
    from ..mixture.select import HeldoutLoss, select
    from ..mixture.spec import MixtureSpec

    args = build_plan_parser().parse_args(argv)
    if args.devices is None:
        raise MixtureError("plan needs the specialists' devices: --devices PROFILE,... (one per specialist)")
    spec = MixtureSpec.load(args.mix)
    gate = Gate.load(spec)
    costs = mixture_costs(spec, args.devices, args.link)
    heldout = HeldoutLoss.load(spec, gate)
    names = list(gate.names)
    order = [costs.names.index(n) for n in names]
    print(format_costs(costs))
    out: dict[str, Any] = {"costs": costs.table(), "classes": {}}
    for cls, lb in _latency_classes(args.latency).items():
        choice = select(
            heldout.loss, costs.energy_j[order], costs.latency_s[order], args.energy, lb, names=names, top_k=spec.top_k
        )
        print()
        print(format_choice(names, costs, heldout, choice, args.energy, lb, cls))
        out["classes"][cls] = {"latency_budget_s": lb, "energy_budget_j": args.energy, **choice.to_json(names)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"choice written to {args.json}", file=sys.stderr)
    return 0


def build_run_parser() -> Parser:
    p = Parser(
        prog="edgemoe mixture run",
        description="Generate with the gated mixture: the top-k of the enabled specialists mixed at every "
        "token. With --energy and --latency the enabled specialists are planned first (needs --devices).",
    )
    add_mixture_args(p)
    add_budget_args(p, required=False)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("-n", "--max-new-tokens", type=whole(1, 1 << 16), default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=number(0.0), default=0.0, help="0 is greedy (default)")
    p.add_argument("--seed", type=whole(0), default=None, help="sampling seed")
    p.add_argument(
        "--cluster",
        type=cluster_arg,
        default=None,
        metavar="ADDRESS",
        help="run each specialist on a node of this Ray cluster",
    )
    p.add_argument(
        "--timeout",
        type=number(0.0, above=True),
        default=30.0,
        metavar="S",
        help="seconds a token waits for a specialist before dropping it (default 30)",
    )
    p.add_argument("--class", dest="request_class", default=None, help="the request class whose plan serves it")
    p.add_argument("--json", action="store_true", help="print the answer and stats as JSON")
    return p


def run_main(argv: Sequence[str]) -> int:
    from ..mixture.runtime import load

    args = build_run_parser().parse_args(argv)
    if (args.energy is None) != (args.latency is None):
        raise MixtureError("give both --energy and --latency to plan, or neither to enable every specialist")
    mix = load(args.mix, cluster=args.cluster, devices=args.devices, link=args.link, timeout_s=args.timeout)
    with mix:
        cls = args.request_class or "default"
        if args.energy is not None:
            classes = _latency_classes(args.latency)
            mix.plan(args.energy, classes)
            cls = args.request_class or next(iter(classes))
        answer = mix.generate(
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            request_class=cls,
            details=True,
        )
        if args.json:
            print(json.dumps({"answer": answer.to_json(), "stats": mix.stats()}, indent=1))
            return 0
        print(answer.text)
        if answer.note:
            print(f"note: {answer.note}", file=sys.stderr)
        s = mix.stats()
        served = ", ".join(f"{n} ({w:.2f})" for n, w in zip(answer.specialists, answer.weights))
        print(f"served by {served}; {s['seconds_per_token'] * 1e3:.1f} ms per token", file=sys.stderr)
    return 0


def build_bench_parser() -> Parser:
    from ..bench.mixture import add_arguments

    p = Parser(
        prog="edgemoe mixture bench",
        description="Perplexity on held-out text against time and energy per token: each specialist alone, all "
        "mixed, and the planned choice at a sweep of latency and energy budgets, on Ray nodes (--testbed LINK: "
        "`edgemoe cluster local` nodes, one per specialist) or in this process.",
    )
    add_arguments(p)
    return retype(
        p,
        {
            "--devices": devices_arg,
            "--link": link_arg,
            "--testbed": link_arg,
            "--cluster": cluster_arg,
            "--node-memory": size_arg,
            "--requests": whole(1, 10000),
            "--calibration-requests": whole(1, 10000),
            "--warmup": whole(0, 10000),
            "--tokens": whole(2, 4096),
            "--budgets": whole(2, 12),
            "--pace-scale": number(0.0),
            "--timeout": number(0.0, above=True),
        },
    )


def bench_main(argv: Sequence[str]) -> int:
    from ..bench.mixture import main as bench

    parser = build_bench_parser()
    args = parser.parse_args(argv)
    if not Path(args.mix).is_dir():
        parser.error(f"argument mix: no such directory: {args.mix!r}; give a mixture directory")
    return bench(args, argv)


SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "plan": (plan_main, "choose the specialists to enable under energy and latency budgets, and say why"),
    "run": (run_main, "generate with the gated mixture of the enabled specialists"),
    "bench": (bench_main, "perplexity against time and energy per token: singles, all mixed, the planned frontier"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        text = "usage: edgemoe mixture SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(
            f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"{text}\n\nedgemoe mixture: error: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        print(text, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return SUBCOMMANDS[argv[0]][0](argv[1:])
