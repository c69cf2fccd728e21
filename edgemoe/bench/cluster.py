"""`edgemoe bench --cluster LINKS`: one model's experts across local Ray nodes (edgemoe
cluster local: each node in its own network namespace and memory limit, its link emulated)
against one device with the same memory streaming from flash, and against every expert in
RAM in one process; and node kills mid-generation.

Per link profile: 3 nodes, each allowed NODE_SHARE of the model's expert bytes
(device_memory) inside a cgroup of that plus what its Ray processes take; the coordinator
(in the head's namespace) streams from the storage of --cluster-storage (emulated by the
store's throttle, as `bench --device` does) at its minimum budget, for the experts no node
holds. One device: the same budget, the best policy, storage local or emulated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..cluster import local
from ..devices import load_link
from ..runtime.engine import load
from . import modes

CORES = os.cpu_count() or 1

NODES = 3
NODE_SHARE = 0.40
NODE_OVERHEAD_BYTES = 450 << 20  # a node's raylet, worker and object store besides its experts
KILL_AT_TOKEN = 3
IDLE_S = 3.0  # how long the cluster's CPU is watched at rest before the runs


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--cluster",
        default=None,
        metavar="LINKS",
        help="instead: the model's experts on local Ray nodes over these link profiles (wired-gigabit,wifi5,"
        "crowded-wifi), against one device streaming from flash and all-in-RAM (docs/benchmarks/cluster.md)",
    )
    ap.add_argument("--cluster-nodes", type=int, default=NODES, help="device nodes (default 3)")
    ap.add_argument(
        "--node-share", type=float, default=100 * NODE_SHARE, help="each node's share of the expert bytes, %%"
    )
    ap.add_argument(
        "--coordinator-share",
        type=float,
        default=0.0,
        help="the coordinator's expert budget as a share of the expert bytes, %% (default 0: its minimum budget; "
        "--node-share gives it the memory of the one device it is compared with)",
    )
    ap.add_argument(
        "--flash-devices",
        default="local,jetson-tx2-emmc,raspberry-pi-4-sd",
        help="storage of the one-device runs: local (this disk) or device profiles to emulate",
    )
    ap.add_argument("--cluster-storage", default="jetson-tx2-emmc", help="storage the coordinator emulates (or local)")
    ap.add_argument("--kills", type=int, default=20, help="node kills mid-generation (default 20; 0: none)")
    ap.add_argument("--kill-link", default="wifi5", help="the link of the kill runs")
    ap.add_argument("--cluster-timeout", type=float, default=500.0, help="the deadline for a device, ms")
    ap.add_argument(
        "--coordinator-threads",
        type=int,
        default=0,
        help="the coordinator's compute threads in the cluster runs (default: all cores)",
    )
    ap.add_argument(
        "--node-cpus",
        type=int,
        default=CORES,
        help="the CPUs each node offers Ray, its expert server's threads (default: this machine's cores, as the "
        "one device and the all-in-RAM process use)",
    )
    ap.add_argument(
        "--serve-priority",
        type=int,
        default=local.NODE_SERVE_PRIORITY,
        help="the SCHED_FIFO priority the nodes' expert servers take calls at (default "
        f"{local.NODE_SERVE_PRIORITY}; 0: ordinary priority, so emulated devices wait behind one another for a core)",
    )
    ap.add_argument(
        "--cluster-path",
        default="socket",
        help="data paths to run over each link, comma-separated: socket (the devices' own TCP channels, the "
        "default) and/or ray (an actor call per device and layer)",
    )


# -- in the head's namespace -------------------------------------------------------------
def worker(spec: dict[str, Any]) -> None:
    """Load the model, attach the cluster, then for each run: generate (reporting the first
    token's time), print a JSON line. With "kills", before each run's KILL_AT_TOKEN-th token
    print {"kill": i} and wait for a line on stdin (the node is dead), and after the run wait
    until the cluster has planned again for the nodes there."""
    from ..cluster.moe import ClusterMoE, attach

    spaces = spec.get("namespaces", [])
    t0 = time.perf_counter()
    m = load(
        spec["model"],
        memory_budget=spec["budget"],
        device=spec.get("device"),
        policy="structure",
        threads=spec.get("threads") or None,
    )
    attach(
        m,
        spec["address"],
        timeout_s=spec["timeout_s"],
        device_memory=spec["device_memory"],
        path=spec.get("path", "socket"),
    )
    load_s = time.perf_counter() - t0
    cm = m.net.moe_override
    assert isinstance(cm, ClusterMoE)
    prompt = modes.bench_prompt(m, spec["prompt_tokens"], spec["seed"])
    m.eos_ids = set()
    print(json.dumps({"loaded": load_s, "plan": cm.stats()["cluster"]["plan"]}), flush=True)
    cm.settle()
    # the cluster's CPU while nobody asks it anything (Ray's own processes, the link emulator's
    # polling), per second: taken off each run's CPU so what is left is what the tokens cost
    idle0, t_idle = local.namespace_cpu_seconds(spaces), time.perf_counter()
    time.sleep(IDLE_S if spaces else 0.0)
    idle1, t_idle = local.namespace_cpu_seconds(spaces), time.perf_counter() - t_idle
    idle = {n: (idle1[n] - idle0[n]) / t_idle for n in spaces}
    lc = local.LocalCluster.load(Path(spec["cluster_state"])) if spec.get("cluster_state") else None
    if lc is not None and lc.emulator != "userspace":
        lc = None  # only the userspace emulator counts packets
    link_idle = None
    if lc is not None:  # what crosses the emulator while the model waits: Ray's own traffic
        c0 = local.link_counters(lc)
        time.sleep(IDLE_S)
        link_idle = local.counters_delta(local.link_counters(lc), c0)
    channel_ports = {d.channel.sock.getsockname()[1] for d in cm.devices if d.channel is not None}
    for run in range(spec["runs"]):
        m.reset_stats()
        times = []
        t0 = time.perf_counter()
        ids = []
        cpu0: dict[str, float] = {}
        link0: dict[str, Any] | None = None
        for i, token in enumerate(
            m.generate(
                prompt, max_new_tokens=spec["new_tokens"], temperature=0.8, top_p=0.95, seed=spec["seed"], stream=True
            )
        ):
            ids.append(token)
            times.append(time.perf_counter() - t0)
            if i == 0:  # the cluster's counters from here on are the decoded tokens', not the prompt's
                cm.reset_stats()
            if i == 0 and not spec.get("kills"):  # a node killed takes its CPU time with it
                paused = time.perf_counter()
                cpu0 = local.namespace_cpu_seconds(spaces)
                link0 = local.link_counters(lc) if lc is not None else None
                t0 += time.perf_counter() - paused  # the bench's own readings are not the run's time
            if spec.get("kills") and i == KILL_AT_TOKEN - 1:
                print(json.dumps({"kill": run}), flush=True)
                sys.stdin.readline()
                times[-1] = time.perf_counter() - t0  # the pause for the kill is not the run's
                t0 = time.perf_counter() - times[-1]
        cpu1 = local.namespace_cpu_seconds(spaces) if cpu0 else {}
        link = local.counters_delta(local.link_counters(lc), link0) if lc is not None and link0 is not None else None
        total = times[-1]
        ttft = times[0]
        decoded = max(1, len(ids) - 1)
        cpu = {_part(n): 0.0 for n in spaces}
        idle_cpu = {_part(n): 0.0 for n in spaces}
        for n in spaces if cpu0 else []:
            cpu[_part(n)] += (cpu1[n] - cpu0[n] - idle[n] * (total - ttft)) / decoded
            idle_cpu[_part(n)] += idle[n]
        gaps = [b - a for a, b in zip(times, times[1:])]
        s = m.stats()["cluster"]
        tokens = s["tokens"]
        print(
            json.dumps(
                {
                    "run": run,
                    "token_ids": ids,
                    "ttft_seconds": ttft,
                    "decode_seconds_per_token": (total - ttft) / decoded,
                    "cpu_seconds_per_token": cpu if cpu0 else None,
                    "idle_cpu_per_second": idle_cpu,
                    "max_token_gap_seconds": max(gaps) if gaps else 0.0,
                    "emulated_link": _link_per_token(link, decoded, channel_ports) if link else None,
                    "emulated_link_idle": _link_per_token(link_idle, IDLE_S, channel_ports)
                    if link_idle and run == 0
                    else None,
                    "bytes_per_token": sum(d["bytes_sent"] + d["bytes_received"] for d in s["devices"].values())
                    / max(1, tokens),
                    "cluster": {k: v for k, v in s.items() if k not in ("plan", "assignment")},
                }
            ),
            flush=True,
        )
        if spec.get("kills"):
            sys.stdin.readline()  # the node killed is back
            cm.settle()
            cm.refresh()  # it gets experts again (from its flash) before the next run


def _link_per_token(d: dict[str, Any], per: float, channel_ports: set[int]) -> dict[str, Any]:
    """The emulator's counters over a run (or at rest) per decoded token (or per second):
    packets and bytes in all and on the layers' channels, time queued behind other packets,
    and how late the emulator wrote them on average (its own delay beyond the link's)."""
    channel = [f for f in d["flows"] if f["sport"] in channel_ports or f["dport"] in channel_ports]
    return {
        "packets": d["packets"] / per,
        "bytes": d["bytes"] / per,
        "channel_packets": sum(f["packets"] for f in channel) / per,
        "channel_bytes": sum(f["bytes"] for f in channel) / per,
        "queued_s": sum(f["queued_s"] for f in d["flows"]) / per,
        "late_mean_s": d["late_sum_s"] / max(1, d["packets"]),
        "write_mean_s": d["write_sum_s"] / max(1, d["packets"]),
        "late_over_200us": d["late_over_200us"] / max(1, d["packets"]),
        "wakeups": d["wakeups"] / per,
        "top_flows": d["flows"][:6],
    }


def _part(netns: str) -> str:
    """What a local cluster's namespace holds, for the CPU accounting: the coordinator and
    the Ray head, the link emulator, or a device node."""
    return "coordinator" if netns.endswith("-head") else "link" if netns.endswith("-switch") else "nodes"


def _worker_main() -> None:
    worker(json.loads(sys.argv[2]))


# -- the comparison ----------------------------------------------------------------------
def ray_call_seconds(lc: local.LocalCluster, calls: int = 50) -> dict[str, float]:
    """What one empty call to a node costs beyond the link, measured from the head's
    namespace: the median round trip of an ExpertServer.ping actor call, and of an empty
    frame on the server's own channel (the socket path), each minus the link's TCP round trip."""
    script = f"""
import json, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from edgemoe.cluster.channel import PING, Channel
from edgemoe.cluster.connect import device_nodes
from edgemoe.cluster.server import ExpertServer
ray.init(address="{lc.address}", logging_level="error", log_to_driver=False)
node = device_nodes()[0]
a = ray.remote(ExpertServer).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False)).remote("probe", "probe")
ray.get(a.ping.remote(None))
ch = Channel(*ray.get(a.open_channel.remote(node.address))[:2], 30.0)
def timed(call):
    call()
    ts = []
    for _ in range({calls}):
        t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2], ts[int(0.9 * (len(ts) - 1))]
ray_med, ray_p90 = timed(lambda: ray.get(a.ping.remote(None)))
ch_med, ch_p90 = timed(lambda: ch.call(b"", time.monotonic() + 30, PING))
print(json.dumps({{"median": ray_med, "p90": ray_p90, "channel_median": ch_med, "channel_p90": ch_p90}}))
"""
    r = subprocess.run(lc.command([sys.executable, "-c", script]), capture_output=True, text=True, cwd="/", timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"timing Ray's calls failed: {r.stderr[-2000:]}")
    ray_rtt = json.loads(r.stdout.strip().splitlines()[-1])
    link = local.measure_link(lc, 0)
    return {
        "ray_call_median_s": ray_rtt["median"],
        "ray_call_p90_s": ray_rtt["p90"],
        "link_rtt_median_s": link["rtt_median_s"],
        "link_echo_bits_per_s": link["echo_bits_per_s"],
        "ray_cost_s": max(0.0, ray_rtt["median"] - link["rtt_median_s"]),
        "channel_call_median_s": ray_rtt["channel_median"],
        "channel_call_p90_s": ray_rtt["channel_p90"],
        "channel_cost_s": max(0.0, ray_rtt["channel_median"] - link["rtt_median_s"]),
    }


def _spawn(lc: local.LocalCluster, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        lc.command([sys.executable, "-m", "edgemoe.bench.cluster", "--worker", json.dumps(spec)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",  # devices import the installed edgemoe (Ray puts the driver's directory on their path)
    )


def _lines(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def run(args: argparse.Namespace, model_dir: Path, emit: Any) -> list[dict[str, Any]]:
    links = [x for x in args.cluster.split(",") if x]
    m = load(model_dir)
    info = m.info()
    expert_bytes = int(info["expert_bytes"])
    min_budget = int(m.min_budget)
    moe_layers = int(info["moe_layers"])
    share = args.node_share / 100
    device_memory = int(share * expert_bytes)
    node_memory = device_memory + NODE_OVERHEAD_BYTES
    coordinator_budget = max(min_budget, int(args.coordinator_share / 100 * expert_bytes))
    del m
    results: list[dict[str, Any]] = []
    emit(
        f"\n## cluster: {info['layers']} layers x {info['experts_per_layer']} experts, experts "
        f"{expert_bytes / 1e6:.0f} MB; {args.cluster_nodes} nodes, each {100 * share:.0f}% of the expert bytes "
        f"({device_memory / 1e6:.0f} MB) in a {node_memory / 1e6:.0f} MB cgroup; the coordinator holds "
        f"{coordinator_budget / 1e6:.1f} MB of experts (its minimum budget: {min_budget / 1e6:.1f} MB) and streams the "
        f"rest from {args.cluster_storage} storage\n"
    )
    emit(
        "| configuration | decode tok/s | ms/token | TTFT s | bytes sent/token | round trips/token "
        "| empty call ms: Ray / channel (link RTT) | CPU ms/token beyond idle: coordinator, link, nodes | same tokens |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )

    # everything in RAM, and one device with the same memory streaming from flash
    ram = modes.measure(model_dir, "ram", 0, _mode_args(args, None))
    ram.update(config="all in RAM, one process")
    want = ram["token_ids"]
    _row(emit, ram, want)
    results.append(ram)
    for storage in [x for x in args.flash_devices.split(",") if x]:
        device = None if storage == "local" else storage
        r = modes.measure(model_dir, "edgemoe", device_memory, _mode_args(args, device))
        r.update(config=f"one device, {100 * share:.0f}% budget, flash: {storage}")
        _row(emit, r, want)
        results.append(r)

    flash_root = Path(args.cache or ".") / "cluster-flash"
    paths = [x for x in args.cluster_path.split(",") if x]
    for link in links:
        rtt = load_link(link).rtt_s
        with local.local_cluster(
            args.cluster_nodes,
            node_memory,
            link,
            flash_dir=flash_root,
            node_cpus=args.node_cpus,
            serve_priority=args.serve_priority,
        ) as lc:
            cost = ray_call_seconds(lc)
            for path in paths:
                spec = _spec(args, model_dir, coordinator_budget, device_memory, lc, runs=args.repeat, path=path)
                proc = _spawn(lc, spec)
                out = list(_lines(proc))
                err = proc.communicate()[1]
                if proc.returncode != 0:
                    raise RuntimeError(f"cluster bench worker failed over {link}:\n{err[-3000:]}")
                runs = [x for x in out if "run" in x]
                best = sorted(runs, key=lambda x: x["decode_seconds_per_token"])[len(runs) // 2]
                best.update(
                    config=f"{args.cluster_nodes} nodes over {link}"
                    + ("" if path == "socket" else ", Ray actor calls"),
                    link=link,
                    path=path,
                    load_seconds=out[0]["loaded"],
                    plan=out[0]["plan"],
                    decode_tokens_per_s=1 / best["decode_seconds_per_token"],
                    all_runs_same_tokens=all(x["token_ids"] == want for x in runs),
                    node_memory=lc.node_memory_usage(),
                    emulator=lc.emulator,
                    **cost,
                )
                best["bound_seconds_per_token"] = ram["decode_seconds_per_token"] + moe_layers * rtt
                if best.get("emulated_link"):
                    best["floor"] = floor(
                        ram["decode_seconds_per_token"],
                        cost["link_rtt_median_s"],
                        best["emulated_link"]["channel_bytes"],
                        moe_layers,
                        load_link(link).bits_per_s,
                    )
                best["call_cost_s"] = cost["channel_cost_s" if path == "socket" else "ray_cost_s"]
                best["bound_with_calls_seconds_per_token"] = ram["decode_seconds_per_token"] + moe_layers * (
                    rtt + best["call_cost_s"]
                )
                _row(emit, best, want)
                results.append(best)
    emit("")
    for line in targets(results, moe_layers):
        emit(line)
    if args.kills:
        results.append(kills(args, model_dir, min_budget, device_memory, node_memory, want, flash_root, emit))
    return results


def _mode_args(args: argparse.Namespace, device: str | None) -> argparse.Namespace:
    return argparse.Namespace(
        seed=args.seed, prompt_tokens=args.prompt_tokens, tokens=args.tokens, device=device, repeat=args.repeat
    )


def _spec(
    args: argparse.Namespace,
    model_dir: Path,
    budget: int,
    device_memory: int,
    lc: local.LocalCluster,
    runs: int,
    kills: int = 0,
    path: str = "socket",
) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "budget": budget,
        "device": None if args.cluster_storage == "local" else args.cluster_storage,
        "address": lc.address,
        "namespaces": lc.namespaces,
        "cluster_state": str(lc.state_file),
        "threads": args.coordinator_threads,
        "timeout_s": args.cluster_timeout / 1e3,
        "device_memory": device_memory,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.tokens,
        "seed": args.seed,
        "runs": runs,
        "kills": kills,
        "path": path,
    }


def _row(emit: Any, r: dict[str, Any], want: list[int]) -> None:
    c = r.get("cluster")
    ray = (
        f"{1e3 * r['ray_call_median_s']:.2f} / {1e3 * r['channel_call_median_s']:.2f} ({1e3 * r['link_rtt_median_s']:.2f})"
        if c
        else "-"
    )
    same = r.get("all_runs_same_tokens", r.get("token_ids") == want)
    cpu = r.get("cpu_seconds_per_token")
    cpu_ms = ", ".join(f"{1e3 * cpu.get(k, 0.0):.1f}" for k in ("coordinator", "link", "nodes")) if cpu else "-"
    emit(
        f"| {r['config']} | {r['decode_tokens_per_s']:.2f} | {1e3 * r['decode_seconds_per_token']:.1f} | "
        f"{r['ttft_seconds']:.3f} | {(r['bytes_per_token'] / 1e3 if c else 0):.1f} KB | "
        f"{(c['round_trips_per_token'] if c else 0):.2f} | {ray} | {cpu_ms} | {'yes' if same else 'NO'} |"
    )


def targets(results: list[dict[str, Any]], moe_layers: int) -> list[str]:
    """The cluster's speed targets from the rows measured."""
    by = {r["config"]: r for r in results}
    lines = []
    tx2 = next((r for c, r in by.items() if c.endswith("flash: jetson-tx2-emmc")), None)
    for r in results:
        if not r.get("link"):
            continue
        t = r["decode_seconds_per_token"]
        line = f"- {r['config']}: {1e3 * t:.1f} ms/token"
        if tx2:
            line += f", {r['decode_tokens_per_s'] / tx2['decode_tokens_per_s']:.2f}x the tokens/s of one device on emulated TX2 eMMC (target >= 3x)"
        line += (
            f"; {t / r['bound_seconds_per_token']:.2f}x (all-in-RAM + {moe_layers} x the link's RTT) "
            f"= {1e3 * r['bound_seconds_per_token']:.1f} ms (target <= 1.3x); "
            f"{t / r['bound_with_calls_seconds_per_token']:.2f}x (all-in-RAM + {moe_layers} x (RTT + the data path's "
            f"cost per empty call {1e3 * r['call_cost_s']:.2f} ms)) = {1e3 * r['bound_with_calls_seconds_per_token']:.1f} ms"
        )
        cpu = r.get("cpu_seconds_per_token")
        if cpu:
            # what the cluster's processes spend per token, spread over every core of the machine
            floor = sum(cpu.values()) / CORES
            line += (
                f"; a token cost its processes {1e3 * sum(cpu.values()):.1f} ms of CPU beyond what the cluster "
                f"uses at rest, so with this data path on this machine's {CORES} cores no token takes less "
                f"than {1e3 * floor:.1f} ms"
            )
            if tx2:
                need = 1 / (3 * tx2["decode_tokens_per_s"])
                line += f" (3x the TX2 device needs {1e3 * need:.1f} ms: " + (
                    "below that floor)" if floor > need else "above that floor)"
                )
        lines.append(line)
        link = r.get("emulated_link")
        if link:
            lines.append(
                f"  - the emulated link per decoded token: {link['packets']:.0f} packets, {link['bytes'] / 1e3:.1f} KB "
                f"({link['channel_packets']:.0f} packets, {link['channel_bytes'] / 1e3:.1f} KB on the layers' channels), "
                f"{1e3 * link['queued_s']:.2f} ms queued behind other packets in all; the emulator began writing a packet "
                f"{1e6 * link['late_mean_s']:.0f} us after its due time on average "
                f"({100 * link['late_over_200us']:.0f}% over 200 us), and its write took {1e6 * link['write_mean_s']:.0f} us "
                "(the receiving namespace's TCP stack)"
            )
        c = r.get("cluster") or {}
        n = c.get("remote_layers") or 0
        if n:
            lines.append(
                f"  - a layer that called devices, on average over the median run's decoded tokens ({n} layers): "
                f"{1e3 * c['remote_layer_seconds'] / n:.2f} ms, of which packing and sending "
                f"{1e3 * c['send_seconds'] / n:.2f} ms, this process's own experts {1e3 * c['local_seconds'] / n:.2f} ms, "
                f"the slowest device's own time (unpacking, its experts, packing) {1e3 * c['slowest_device_seconds'] / n:.2f} ms, "
                f"and the hop {1e3 * c['hop_seconds'] / n:.2f} ms (from the last send to the last answer less that device's "
                "time: the link, both ends' TCP and their wake-ups)"
            )
            if c.get("tokens"):
                rest = r["decode_seconds_per_token"] - c["remote_layer_seconds"] / c["tokens"]
                lines.append(
                    f"  - the rest of a decoded token: {1e3 * rest:.2f} ms (attention, norms and routing, the layers "
                    "this process serves alone, the head and sampling)"
                )
        floor = r.get("floor")
        if floor and tx2:
            need = 1 / (3 * tx2["decode_tokens_per_s"])
            lines.append(
                f"  - floor = all-in-RAM {1e3 * floor['ram_s']:.1f} ms + {moe_layers} x (measured RTT "
                f"{1e3 * floor['rtt_s']:.2f} ms + a device's share of a layer's bytes at the link's rate "
                f"{1e3 * floor['wire_s']:.3f} ms) = {1e3 * floor['floor_s']:.1f} ms per token; 3x the TX2 device "
                f"needs {1e3 * need:.1f} ms: "
                + (
                    "the floor is above it, so 3x is out of reach on this test bed whatever the data path"
                    if floor["floor_s"] > need
                    else "the floor is below it"
                )
            )
    return lines


def floor(
    ram_s: float, link_rtt_s: float, channel_bytes_per_token: float, moe_layers: int, bits_per_s: float
) -> dict[str, float]:
    """The least a token can take with its experts on devices: the coordinator's work, which
    all-in-RAM bounds from below (on cores shared with the devices the experts' arithmetic
    costs the same core time wherever it runs), plus per MoE layer one round trip of the
    link as measured and the time its bytes take at the link's rate. A layer's call reaches
    at most two devices (top-2), each over its own link: half the layer's channel bytes is
    the least the slowest of them carries."""
    wire = channel_bytes_per_token / moe_layers / 2 * 8 / bits_per_s
    return {"ram_s": ram_s, "rtt_s": link_rtt_s, "wire_s": wire, "floor_s": ram_s + moe_layers * (link_rtt_s + wire)}


def kills(
    args: argparse.Namespace,
    model_dir: Path,
    budget: int,
    device_memory: int,
    node_memory: int,
    want: list[int],
    flash_root: Path,
    emit: Any,
) -> dict[str, Any]:
    """args.kills runs over args.kill_link; in each, node (run mod nodes) is SIGKILLed before
    the KILL_AT_TOKEN-th token and started again after the run."""
    deadline = args.cluster_timeout / 1e3
    with local.local_cluster(
        args.cluster_nodes,
        node_memory,
        args.kill_link,
        flash_dir=flash_root,
        node_cpus=args.node_cpus,
        serve_priority=args.serve_priority,
    ) as lc:
        proc = _spawn(lc, _spec(args, model_dir, budget, device_memory, lc, args.kills, kills=1))
        assert proc.stdin is not None
        runs = []
        killed = None
        for msg in _lines(proc):
            if "kill" in msg:
                killed = msg["kill"] % lc.nodes
                local.kill_node(lc, killed)
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif "run" in msg:
                runs.append(msg)
                if killed is not None:
                    local.start_node(lc, killed)
                    local.wait_for_nodes(lc, lc.nodes)
                    killed = None
                proc.stdin.write("go\n")
                proc.stdin.flush()
        err = proc.communicate()[1]
        if proc.returncode != 0:
            raise RuntimeError(f"kill bench worker failed:\n{err[-3000:]}")
        memory = lc.node_memory_usage()
        pids = local._pids(lc)
    left = [p for p in pids if local._alive(p)]
    same = sum(r["token_ids"] == want for r in runs)
    waits = [r["cluster"]["max_wait_seconds"] for r in runs]
    out = {
        "config": f"{args.kills} node kills over {args.kill_link}",
        "runs": len(runs),
        "same_tokens": same,
        "max_wait_seconds": max(waits) if waits else 0.0,
        "deadline_seconds": deadline,
        "max_token_gap_seconds": max(r["max_token_gap_seconds"] for r in runs) if runs else 0.0,
        "median_decode_seconds_per_token": statistics.median(r["decode_seconds_per_token"] for r in runs)
        if runs
        else 0.0,
        "recomputed_slots": sum(r["cluster"]["recomputed_slots"] for r in runs),
        "processes_left": len(left),
        "namespaces_left": [n for n in lc.namespaces if Path("/run/netns", n).exists()],
        "node_memory": memory,
        "runs_detail": runs,
    }
    emit(
        f"\n{out['config']}: {len(runs)} of {args.kills} runs completed, {same} with the all-in-RAM tokens; the "
        f"longest a layer waited on devices {1e3 * out['max_wait_seconds']:.0f} ms (deadline {1e3 * deadline:.0f} ms, "
        f"target <= 2x); longest gap between two tokens {1e3 * out['max_token_gap_seconds']:.0f} ms; "
        f"{out['recomputed_slots']} slots recomputed here; left behind: {len(left)} processes, "
        f"{len(out['namespaces_left'])} namespaces; node cgroup OOM kills: {sum(x['oom_kills'] for x in memory)}"
    )
    return out


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib  # deferred: optional (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "decode_tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    ax.barh([r["config"] for r in rows], [r["decode_tokens_per_s"] for r in rows], color="#4a7ab5")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s")
    ax.set_title("Mixtral-shaped model, 4-bit: 3 nodes against one device", loc="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: edgemoe bench --cluster LINKS (see edgemoe bench -h)")
    _worker_main()
