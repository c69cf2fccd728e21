"""The least time a token can take on a local cluster of this machine, whatever the model:
every MoE layer that waits on devices costs one Ray round trip to them, and on a machine
whose cores are shared by the coordinator, the nodes' Ray processes and the link emulator,
that round trip is Ray's cost per call plus the emulated link's.

Starts `edgemoe cluster local` (N nodes over a link profile), and from the head's namespace
times "tokens" of LAYERS empty layers: at each, one empty call to each of FANOUT devices at
once and a wait for all (what ClusterMoE does for a token whose experts are on FANOUT
devices, with no compute and no payload), over both data paths: Ray actor calls, and the
channels the servers open (an empty frame on each device's TCP connection). Also the link's
own TCP round trip, so the rest is the data path's and the machine's, and the coordinator's
CPU per token on each path. Prints JSON.

    python tools/cluster_floor.py --link wifi5 --nodes 3 --layers 12 --fanout 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from edgemoe.cluster.channel import PING, Channel, receive
from edgemoe.cluster.connect import device_nodes
from edgemoe.cluster.server import ExpertServer
address, layers, fanout, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ray.init(address=address, logging_level="error", log_to_driver=False)
nodes = device_nodes()[:fanout]
servers = [
    ray.remote(ExpertServer).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n.id, soft=False)).remote("floor", n.name)
    for n in nodes
]
ray.get([s.ping.remote(None) for s in servers])
channels = [Channel(*ray.get(s.open_channel.remote(n.address))[:2], 30.0) for s, n in zip(servers, nodes)]

def ray_layer():
    ray.wait([s.ping.remote(None) for s in servers], num_returns=len(servers))

def channel_layer():
    end = time.monotonic() + 30
    for c in channels:
        c.send(b"", end, PING)
    assert all(a == b"" for a in receive(channels, end))

out = {}
for name, layer in (("ray", ray_layer), ("channel", channel_layer)):
    layer()
    per_token, worst = [], 0.0
    cpu0 = time.process_time()
    for _ in range(tokens):
        t0 = time.perf_counter()
        for _ in range(layers):
            t1 = time.perf_counter()
            layer()
            worst = max(worst, time.perf_counter() - t1)
        per_token.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / tokens
    per_token.sort()
    out[name] = {"token_median_s": per_token[len(per_token) // 2], "token_p90_s": per_token[int(0.9 * (len(per_token) - 1))],
                 "coordinator_cpu_per_token_s": cpu, "slowest_layer_s": worst}
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--link", default="wifi5")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--node-memory", default="500MB")
    p.add_argument("--layers", type=int, default=12, help="MoE layers per token (the Mixtral-shaped model: 12)")
    p.add_argument("--fanout", type=int, default=2, help="devices each layer waits on at once (top-2: up to 2)")
    p.add_argument("--tokens", type=int, default=50)
    args = p.parse_args()

    from edgemoe.cluster import local
    from edgemoe.devices import load_link
    from edgemoe.units import parse_bytes

    link = load_link(args.link)
    with local.local_cluster(args.nodes, parse_bytes(args.node_memory), args.link) as lc:
        measured = local.measure_link(lc, 0)
        r = subprocess.run(
            lc.command(
                [sys.executable, "-c", SCRIPT, lc.address, str(args.layers), str(args.fanout), str(args.tokens)]
            ),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=600,
        )
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        floor = json.loads(r.stdout.strip().splitlines()[-1])
        emulator = lc.emulator
    out = {
        "link": args.link,
        "emulator": emulator,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "layers": args.layers,
        "fanout": args.fanout,
        "profile_rtt_s": link.rtt_s,
        "measured_link_rtt_s": measured["rtt_median_s"],
    }
    for path, f in floor.items():
        out[path] = {
            "floor_token_s": f["token_median_s"],
            "floor_token_p90_s": f["token_p90_s"],
            "per_layer_s": f["token_median_s"] / args.layers,
            "path_and_machine_per_layer_s": f["token_median_s"] / args.layers - measured["rtt_median_s"],
            "coordinator_cpu_per_token_s": f["coordinator_cpu_per_token_s"],
            "slowest_layer_s": f["slowest_layer_s"],
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
