"""Kernel throughput against this machine's memory bandwidth.

Decode (T=1) matvec is memory-bound, so the figure of merit is the weight bytes
streamed per second compared with a plain streaming read of memory. The working
set is several matrices visited round-robin and larger than the L3 cache, so
weights come from DRAM as they would in a real decode step.

    /work/venv/bin/python tools/bench_kernels.py [--threads N] [--working-set-mb 256]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edgemoe import _core
from edgemoe import quant as q


def best_seconds(fn, repeats: int, min_seconds: float = 0.3) -> float:
    """Best time per call over rounds of `repeats` calls."""
    best = float("inf")
    t_end = time.perf_counter() + min_seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
        if time.perf_counter() > t_end:
            return best


def bandwidth_gbs(working_set: int) -> float:
    buf = np.ones(working_set, dtype=np.uint8)
    _core.stream_read(buf)
    return working_set / best_seconds(lambda: _core.stream_read(buf), 3) / 1e9


def quant_mats(rows, cols, bits, gs, working_set, rng):
    one = q.quantize_matrix(rng.standard_normal((rows, cols)).astype(np.float32), bits, gs, False)
    n = max(2, working_set // one.nbytes + 1)
    return [one.copy() for _ in range(n)]  # distinct buffers: no cache reuse across the round-robin


def float_mats(rows, cols, kind, working_set, rng):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    one = {"f32": w, "f16": w.astype(np.float16), "bf16": q.f32_to_bf16_bits(w)}[kind]
    n = max(2, working_set // one.nbytes + 1)
    return [one.copy() for _ in range(n)]


def bench(name, mats, cols, T, call, bw, rng):
    x = rng.standard_normal((T, cols)).astype(np.float32)
    it = iter(range(1 << 62))
    n = len(mats)

    def step():
        call(x, mats[next(it) % n])

    nbytes = mats[0].nbytes
    sec = best_seconds(lambda: [step() for _ in range(n)], 1) / n
    gbs = nbytes / sec / 1e9
    print(f"{name:<34} T={T:<3} {sec * 1e6:9.1f} us  {gbs:6.2f} GB/s  {100 * gbs / bw:5.1f}% of bandwidth"
          + (f"  {2 * T * nbytes / sec / 1e9 * (8 / 4.5 if 'int4' in name else 1):.0f}" if False else ""))
    return gbs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all)")
    ap.add_argument("--working-set-mb", type=int, default=192, help="bytes of weights cycled through (> L3)")
    ap.add_argument("--quick", action="store_true", help="INT4 expert matrices only")
    args = ap.parse_args()
    if args.threads:
        _core.set_num_threads(args.threads)
    ws = args.working_set_mb << 20
    rng = np.random.default_rng(0)
    print(f"simd={_core.simd()} threads={_core.get_num_threads()} working set {args.working_set_mb} MiB")
    bw = bandwidth_gbs(ws)
    print(f"streaming read bandwidth: {bw:.2f} GB/s")

    qcall = lambda x, m: _core.qmatrix_matmul(x, m)
    shapes = [(2816, 1024), (1024, 2816)]
    for rows, cols in shapes:
        mats = quant_mats(rows, cols, 4, 64, ws, rng)
        for T in (1, 4, 16):
            bench(f"int4 g64 {rows}x{cols}", mats, cols, T, qcall, bw, rng)
    if args.quick:
        return
    for bits in (2, 3, 8):
        mats = quant_mats(2816, 1024, bits, 64, ws, rng)
        for T in (1, 16):
            bench(f"int{bits} g64 2816x1024", mats, 1024, T, qcall, bw, rng)
    for gs in (32, 128):
        mats = quant_mats(2816, 1024, 4, gs, ws, rng)
        bench(f"int4 g{gs} 2816x1024", mats, 1024, 1, qcall, bw, rng)
    for kind in ("bf16", "f16", "f32"):
        mats = float_mats(2048, 2048, kind, ws, rng)
        for T in (1, 16):
            bench(f"{kind} linear 2048x2048", mats, 2048, T, lambda x, m, k=kind: _core.linear(x, m, k), bw, rng)


if __name__ == "__main__":
    main()
