"""What a core that has just been idle costs one expert's compute on this machine.

A cluster device computes a call, answers, and idles until the next layer's call one link
round trip later; the coordinator idles while it waits for the answers. On a virtual
machine an idle vCPU is given back to the host, and the work after it can run slower than
the same work back to back. This times one expert of a converted model for one token on one
thread, each run on another expert (so none is warm in the CPU caches from the run
before), back to back and after each --gaps idle pause, rounds interleaved:

    python tools/idle_cost.py MODEL_DIR                  # e.g. the cluster bench's model
    python tools/idle_cost.py MODEL_DIR --gaps 0.5,1,2,3 --runs 200 --rounds 3

Prints, per gap, the median and 90th percentile ms per expert and the ratio of the median
to back to back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a converted model directory")
    ap.add_argument("--gaps", default="1,2,3", help="idle pauses before each expert, ms (comma-separated)")
    ap.add_argument("--runs", type=int, default=200, help="experts timed per gap and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every gap")
    args = ap.parse_args()

    from edgemoe import _core
    from edgemoe.format.manifest import blob_tables

    _core.set_num_threads(1)
    manifest = json.loads((args.model / "manifest.json").read_text())
    offsets, lengths, _, _ = blob_tables(manifest)
    raw = np.fromfile(args.model / "experts.bin", np.uint8)
    blobs = [np.array(raw[int(o) : int(o + n)]) for o, n in zip(offsets.ravel(), lengths.ravel()) if n]
    del raw
    hidden = int(manifest["config"]["hidden_size"])
    x = np.full((1, hidden), 0.01, np.float32)
    gaps = [0.0] + [float(g) / 1e3 for g in args.gaps.split(",") if g]
    times: dict[float, list[float]] = {g: [] for g in gaps}
    step = 7 if len(blobs) % 7 else 5  # walk the experts out of file order
    i = 0
    for _ in range(args.rounds):
        for gap in gaps:
            for _ in range(args.runs):
                blob = blobs[(i * step) % len(blobs)]
                i += 1
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                _core.expert_forward(x, blob)
                times[gap].append(time.perf_counter() - t0)
    size = float(np.median([b.size for b in blobs]))
    base = float(np.median(times[0.0]))
    print(
        f"one expert ({size / 1e6:.2f} MB, {_core.simd()}), one token, one thread, {args.runs * args.rounds} runs each:"
    )
    print("| idle before each | median ms | p90 ms | median vs back to back |")
    print("|---|---|---|---|")
    for gap in gaps:
        t = np.array(times[gap]) * 1e3
        label = "none (back to back)" if gap == 0 else f"{gap * 1e3:g} ms"
        print(f"| {label} | {np.median(t):.3f} | {np.percentile(t, 90):.3f} | {np.median(t) / (1e3 * base):.2f}x |")


if __name__ == "__main__":
    main()
