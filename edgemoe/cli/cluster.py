"""`edgemoe cluster SUBCOMMAND`: one model's experts across several devices.

edgemoe cluster plan [MODEL] --devices PROFILE[xN],... [--link LINK]   place the experts, print the plan
edgemoe cluster local --nodes N --node-memory SIZE --link LINK [-- CMD]  Ray nodes on this machine
edgemoe cluster exec -- CMD                                            CMD beside the local cluster's head
edgemoe cluster down                                                   remove every local cluster
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cluster.local import LINK_PRIORITY, NODE_SERVE_PRIORITY
from ..cluster.placement import CoordinatorSpec, DeviceSpec, format_plan, model_inputs, plan_placement
from ..cluster.settings import coordinator_budget
from ..devices import DeviceProfile, list_links, list_profiles, load_link, load_profile
from ..devices.detect import detect_machine
from ..errors import EdgeMoEError
from ..format.manifest import load_manifest
from ..units import parse_bytes
from .common import Parser, checked, link_arg, number, resolve_model, size_arg, whole


def parse_devices(spec: str) -> list[tuple[str, DeviceProfile]]:
    """'jetson-orin-nano-nvmex2,raspberry-pi-5-sd' -> [(name, profile)], numbered when repeated."""
    out: list[tuple[str, DeviceProfile]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, count = item, 1
        m = re.fullmatch(r"(.+?)[x*](\d+)", item)
        if m and item not in list_profiles() and not item.endswith(".json"):
            name, count = m.group(1), int(m.group(2))
        profile = load_profile(name)
        for i in range(count):
            out.append((f"{profile.name}#{i + 1}" if count > 1 else profile.name, profile))
    names = [n for n, _ in out]
    for n in set(names):  # the same profile named twice in the list: number them all
        if names.count(n) > 1:
            k = 0
            for j, (nj, pj) in enumerate(out):
                if nj == n:
                    k += 1
                    out[j] = (f"{n}#{k}", pj)
    if not out:
        raise EdgeMoEError(f"--devices names no device; profiles: {', '.join(list_profiles())}")
    return out


def build_plan_parser() -> Parser:
    p = Parser(
        prog="edgemoe cluster plan",
        description="Place a converted model's experts on several devices (and the coordinator's cache and "
        "flash) to minimise the expected time per token, from the device profiles and the model's routing "
        "statistics (routing.json: `edgemoe profile MODEL`).",
    )
    p.add_argument("model", nargs="?", default=None, help="a converted model directory (default: the default model)")
    p.add_argument(
        "--devices",
        type=checked(parse_devices, "device profiles, comma-separated, each optionally xN"),
        required=True,
        help="device profiles, comma-separated, each optionally times N: jetson-orin-nano-nvmex2,raspberry-pi-5-sd "
        f"(known: {', '.join(list_profiles())}; a path to a profile .json works too)",
    )
    p.add_argument(
        "--link",
        type=link_arg,
        default=None,
        help=f"the link to every device, overriding each profile's: {', '.join(list_links())}",
    )
    p.add_argument(
        "--reserve",
        type=size_arg,
        default="1GiB",
        help="RAM each device keeps for its system and worker, not for experts (default 1GiB)",
    )
    p.add_argument(
        "--coordinator",
        type=checked(lambda v: v == "this" or load_profile(v), "'this' or a device profile"),
        default="this",
        help="the coordinator's profile, or 'this' for this machine measured (default)",
    )
    p.add_argument(
        "--coordinator-budget",
        type=size_arg,
        default=None,
        help="the coordinator's expert cache (default: what its free RAM leaves after the backbone and the rest)",
    )
    p.add_argument("--context", type=whole(1), default=256, help="context tokens the coordinator's budget plans for")
    p.add_argument(
        "--search-seconds",
        type=number(0.0, 3600.0),
        default=5.0,
        help="time for local search after the greedy (default 5)",
    )
    p.add_argument("--detail", action="store_true", help="list the experts of each layer")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the plan as JSON (Plan.to_json)")
    return p


def plan_main(argv: Sequence[str]) -> int:
    args = build_plan_parser().parse_args(argv)

    model = resolve_model(args.model)
    sizes, stats, moe_layers = model_inputs(model)  # names `edgemoe profile MODEL` when routing.json is missing
    link = load_link(args.link) if args.link else None
    reserve = parse_bytes(args.reserve)
    devices = [DeviceSpec.from_profile(prof, name, reserve, link) for name, prof in parse_devices(args.devices)]
    if args.coordinator == "this":
        experts_file = Path(model) / load_manifest(model)["experts"]["file"]
        machine = detect_machine(experts_file, probe_bytes=32 << 20)
        coord_profile, available = machine.profile(), machine.ram_available_bytes
    else:
        coord_profile = load_profile(args.coordinator)
        available = coord_profile.ram_bytes
    budget = (
        parse_bytes(args.coordinator_budget)
        if args.coordinator_budget
        else coordinator_budget(model, available, args.context)
    )
    coordinator = CoordinatorSpec.from_profile(coord_profile, budget)
    plan = plan_placement(devices, coordinator, sizes, stats, moe_layers, search_seconds=args.search_seconds)
    print(format_plan(plan, detail=args.detail))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json()) + "\n")
        print(f"plan written to {args.json}", file=sys.stderr)
    return 0


def build_local_parser() -> Parser:
    p = Parser(
        prog="edgemoe cluster local",
        description="Start a Ray cluster on this machine: a head and N device nodes, each node in its own "
        "network namespace and cgroup v1 memory limit, its link to the head emulated (tc netem, or a userspace "
        "emulator where the kernel has no netem). Addresses 10.77.0.0/24 exist only inside those namespaces. "
        "With `-- CMD`, run CMD beside the head (the coordinator) and remove the cluster afterwards; without, "
        "leave it running for `edgemoe cluster exec` and `edgemoe cluster down`.",
    )
    p.add_argument("--nodes", type=whole(1, 16), default=2, help="device nodes (default 2)")
    p.add_argument("--node-memory", type=size_arg, default="1GB", help="each node's memory limit (default 1GB)")
    p.add_argument(
        "--node-cpus",
        type=whole(1, 1024),
        default=1,
        help="the CPUs each node offers Ray, which its expert server uses as threads (default 1); the nodes share "
        "this machine's cores",
    )
    p.add_argument(
        "--serve-priority",
        type=whole(0, LINK_PRIORITY - 1),
        default=NODE_SERVE_PRIORITY,
        help="the SCHED_FIFO priority the nodes' expert servers take calls at, so an emulated device does not wait "
        f"behind another's work for a core (default {NODE_SERVE_PRIORITY}; 0: ordinary priority)",
    )
    p.add_argument(
        "--link", type=link_arg, default="wifi5", help=f"each node's link to the head: {', '.join(list_links())}"
    )
    return p


def local_main(argv: Sequence[str]) -> int:
    from ..cluster import local

    argv = list(argv)
    cmd: list[str] = []
    if "--" in argv:
        cmd = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = build_local_parser().parse_args(argv)
    lc = local.up(
        args.nodes,
        parse_bytes(args.node_memory),
        args.link,
        node_cpus=args.node_cpus,
        serve_priority=args.serve_priority,
    )
    print(
        f"local cluster {lc.tag}: {lc.nodes} nodes of {args.node_memory} over {lc.link} ({lc.emulator} links), "
        f"head at {lc.address} in namespace {lc.head_netns}",
        file=sys.stderr,
    )
    if not cmd:
        print(
            f"run the coordinator with: edgemoe cluster exec -- edgemoe run MODEL --cluster {lc.address} ...\n"
            "remove it with: edgemoe cluster down",
            file=sys.stderr,
        )
        return 0
    try:
        return subprocess.call(lc.command(cmd))
    finally:
        local.down(lc)


def exec_main(argv: Sequence[str]) -> int:
    from ..cluster import local

    cmd = list(argv[1:] if argv[:1] == ["--"] else argv)
    clusters = local.running()
    if not cmd or not clusters:
        print(
            "edgemoe cluster exec: error: "
            + ("no command: edgemoe cluster exec -- CMD" if not cmd else "no local cluster: edgemoe cluster local"),
            file=sys.stderr,
        )
        return 2
    return subprocess.call(clusters[-1].command(cmd))


def down_main(argv: Sequence[str]) -> int:
    from ..cluster import local

    if argv:
        print("usage: edgemoe cluster down  (removes every local cluster)", file=sys.stderr)
        return 2
    tags = local.down_all()
    print(f"removed {len(tags)} local cluster(s)" + (f": {', '.join(tags)}" if tags else ""), file=sys.stderr)
    return 0


# subcommand -> (its main, one line of help)
SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "plan": (plan_main, "place a model's experts on devices and print the plan"),
    "local": (local_main, "start Ray nodes on this machine, each with a memory limit and an emulated link"),
    "exec": (exec_main, "run a command beside the local cluster's head (where the coordinator runs)"),
    "down": (down_main, "remove every local cluster: processes, namespaces, cgroups"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        text = "usage: edgemoe cluster SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(
            f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"{text}\n\nedgemoe cluster: error: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        print(text, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return SUBCOMMANDS[argv[0]][0](argv[1:])
