"""What one cache miss costs a decode token, and the floor that puts under the ratio to
all-in-RAM: each configuration in its own process (files dropped from the page cache),
--warmup tokens generated, then --tokens timed, rounds interleaved.

Configurations: all experts in RAM; the structure policy at --budget with the usual two
I/O threads; the same with io_threads=0, where the decoding thread reads each miss
itself, so the whole read is stall and nothing overlaps it. From the last two:

    floor us/token = RAM us/token + misses/token x (read us per miss + extra compute us per miss)

"extra compute" is the expert compute beyond RAM's (a freshly read blob is cold in the CPU
caches). It is what a perfect policy with this miss count, and no read hidden behind
compute, could reach; --misses replaces the measured miss count (e.g. Belady's from
`edgemoe simulate`).

    python tools/miss_cost.py                       # the default model at 50%
    python tools/miss_cost.py --misses 1.3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def worker(spec: dict) -> dict:
    import edgemoe
    from edgemoe.bench.modes import bench_prompt
    from edgemoe.devices.limits import drop_page_cache

    drop_page_cache(spec["model"])
    if spec["config"] == "ram":
        m = edgemoe.load(spec["model"])
        m.preload()
        m.cache.wait_idle()
    else:
        m = edgemoe.load(
            spec["model"],
            memory_budget=spec["budget"],
            policy="structure",
            io_threads=2 if spec["config"] == "async" else 0,
        )
    m.eos_ids = set()
    tokens = m.generate(
        bench_prompt(m, 16, spec["seed"]),
        max_new_tokens=spec["warmup"] + spec["tokens"] + 1,
        temperature=0.8,
        top_p=0.95,
        seed=spec["seed"],
        stream=True,
    )
    for _ in range(spec["warmup"] + 1):
        next(tokens)
    a, t0 = m.stats(), time.perf_counter()
    n = sum(1 for _ in tokens)
    dt, s = time.perf_counter() - t0, m.stats()
    uses = s["cache_hits"] + s["cache_misses"] - a["cache_hits"] - a["cache_misses"]
    return {
        "us_per_token": 1e6 * dt / n,
        "stall_us": 1e6 * (s["stall_seconds"] - a["stall_seconds"]) / n,
        "compute_us": 1e6 * (s["compute_seconds"] - a["compute_seconds"]) / n,
        "read_us": 1e6 * (s["read_seconds"] - a["read_seconds"]) / n,
        "misses": (s["cache_misses"] - a["cache_misses"]) / n,
        "hit_rate": (s["cache_hits"] - a["cache_hits"]) / uses if uses else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    ap.add_argument("--model", default=None, help="a converted model directory (default: the default model)")
    ap.add_argument("--budget", default="50%", help="expert budget as a share of the expert bytes (default 50%%)")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--misses", type=float, default=None, help="misses per token for the floor (default: measured)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import edgemoe
    from edgemoe.planning.allocate import parse_fraction
    from edgemoe.planning.default_model import default_model_path

    path = str(args.model or default_model_path())
    probe = edgemoe.load(path, memory_budget="1TB", preload="none")
    budget = max(probe.min_budget, int(parse_fraction(args.budget) * probe.info()["expert_bytes"]))
    runs: dict[str, list[dict]] = {"ram": [], "async": [], "sync": []}
    for _ in range(args.rounds):
        for config in runs:
            spec = {
                "model": path,
                "config": config,
                "budget": budget,
                "tokens": args.tokens,
                "warmup": args.warmup,
                "seed": args.seed,
            }
            r = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=True
            )
            runs[config].append(json.loads(r.stdout.strip().splitlines()[-1]))

    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in runs.items()}
    print(
        f"{path}, budget {budget / 1e6:.1f} MB, {args.tokens} tokens after {args.warmup}, "
        f"median of {args.rounds} rounds\n"
    )
    print("| config | us/token | stall us/token | expert compute us/token | read us/token | misses/token | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for c, name in (("ram", "all in RAM"), ("async", "edgemoe, 2 I/O threads"), ("sync", "edgemoe, io_threads=0")):
        r = med[c]
        print(
            f"| {name} | {r['us_per_token']:.0f} | {r['stall_us']:.0f} | {r['compute_us']:.0f} | "
            f"{r['read_us']:.0f} | {r['misses']:.2f} | {100 * r['hit_rate']:.1f}% |"
        )
    sync, ram = med["sync"], med["ram"]
    per_miss_read = sync["read_us"] / sync["misses"]
    per_miss_compute = max(0.0, sync["compute_us"] - ram["compute_us"]) / sync["misses"]
    misses = args.misses if args.misses is not None else med["async"]["misses"]
    floor = ram["us_per_token"] + misses * (per_miss_read + per_miss_compute)
    print(
        f"\nper miss: {per_miss_read:.0f} us read + {per_miss_compute:.0f} us more expert compute; "
        f"at {misses:.2f} misses/token the floor with no read hidden behind compute is {floor:.0f} us/token, "
        f"{floor / ram['us_per_token']:.2f}x all-in-RAM (measured: {med['async']['us_per_token'] / ram['us_per_token']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
