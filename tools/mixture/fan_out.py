"""What a further specialist costs the coordinator per token, through each per-token path.

Starts a local Ray cluster (a head and two worker nodes offering the `edgemoe` resource,
separate processes on this machine, no link emulation), loads the mixture with its
specialists as Ray actors (specialist i on node i % 2), and times requests served by each of
two specialists alone and by both mixed, through Ray actor calls (transport="ray") and
through the actors' own TCP channels (transport="channel", the default), in the same run.
Prints per configuration the median and 95th percentile of the requests' time per decode
token, and the fan-out: the pair's median less the slower single's; docs/mixture.md records
a run.

    python tools/mixture/fan_out.py MIX [--pair sys,python] [--requests 40] [--tokens 12]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mix")
    ap.add_argument("--pair", default="sys,python", help="two specialists on different nodes (the 1st and 2nd)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    import edgemoe

    pair = args.pair.split(",")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"edgemoe": 1})
    cluster.wait_for_nodes()
    prompt = list(range(5, 40))
    try:
        for transport in ("ray", "channel"):
            with edgemoe.load_mixture(args.mix, cluster=cluster.address, transport=transport) as m:
                if len({m.members[n].where for n in pair}) != 2:
                    raise SystemExit(f"{pair} share a node: give two specialists that are 1st and 2nd modulo 2")
                res: dict[str, list[float]] = {}
                for cfg in ([pair[0]], [pair[1]], pair) * 2:  # twice, interleaved: drift hits all alike
                    m.enable(cfg)
                    for _ in range(3):  # warm-up
                        m.generate(prompt, 4)
                    for _ in range(args.requests // 2):
                        a = m.generate(prompt, args.tokens, details=True)
                        res.setdefault("+".join(cfg), []).append(float(np.mean(a.seconds_per_token[1:])))
                for k, v in res.items():
                    print(
                        f"{transport:8s} {k:16s} median {np.median(v) * 1e3:6.2f} ms, "
                        f"p95 {np.quantile(v, 0.95) * 1e3:6.2f} ms per token ({len(v)} requests)"
                    )
                slower = max(np.median(res[pair[0]]), np.median(res[pair[1]]))
                print(f"{transport:8s} fan-out: {(np.median(res['+'.join(pair)]) - slower) * 1e3:.2f} ms per token")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
