"""One decode token's attention over a KV cache, as the decode step runs it (`_core.attention`).

Times one token's attention (a query [1, heads, head_dim] against the cache of each of
--layers layers, one call per layer, as a decode step makes them) on the pool's threads, for
each cache length in --positions. --layout: the cache kv head major, [kv_heads, positions,
head_dim] as the decode step keeps it (KVCache), or packed, [positions, kv_heads, head_dim];
--dtype: its keys and values as float16 (load's default, StreamOptions.kv_cache) or float32. "cold": a 64 MiB buffer
is written before each pass, so the caches come from memory as they do in a decode step,
where the experts' weights stream through the CPU caches between two layers' attention;
"warm": the same pass again right after. The default shape is the Mixtral-shaped bench
model's (16 heads, 4 kv heads, head_dim 64, 12 layers):

    python tools/bench_attention.py
    python tools/bench_attention.py --positions 512,2048,8192 --rounds 30
    python tools/bench_attention.py --layout packed --dtype float32

Prints per length the median ms for the layers' pass, cold and warm, and the cache's bytes
over the cold time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgemoe import _core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", default="64,512,2048", help="cache lengths (comma-separated)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="pool threads (default: as the pool has)")
    ap.add_argument("--layout", choices=["kv-head-major", "packed"], default="kv-head-major")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    args = ap.parse_args()
    if args.threads:
        _core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    evict = np.zeros(64 << 17)  # 64 MiB of float64
    print(
        f"{_core.get_num_threads()} threads, {args.heads} heads, {args.kv_heads} kv heads, head_dim {args.head_dim}, "
        f"{args.layers} layers, {args.layout}, {args.dtype}"
    )
    for S in (int(s) for s in args.positions.split(",")):
        major = args.layout == "kv-head-major"
        shape = (args.kv_heads, S, args.head_dim) if major else (S, args.kv_heads, args.head_dim)
        ks = [rng.standard_normal(shape, dtype=np.float32).astype(args.dtype) for _ in range(args.layers)]
        vs = [rng.standard_normal(shape, dtype=np.float32).astype(args.dtype) for _ in range(args.layers)]
        if major:  # the [positions, kv_heads, head_dim] views KVCache.append returns
            ks, vs = [k.transpose(1, 0, 2) for k in ks], [v.transpose(1, 0, 2) for v in vs]
        q = rng.standard_normal((1, args.heads, args.head_dim), dtype=np.float32)
        cold, warm = [], []
        for _ in range(args.rounds):
            evict += 1.0
            for out in (cold, warm):
                t0 = time.perf_counter()
                for k, v in zip(ks, vs):
                    _core.attention(q, k, v, S - 1)
                out.append(time.perf_counter() - t0)
        c, w = float(np.median(cold)), float(np.median(warm))
        nbytes = 2 * args.layers * S * args.kv_heads * args.head_dim * np.dtype(args.dtype).itemsize
        print(f"{S:6d} positions: cold {1e3 * c:7.3f} ms, warm {1e3 * w:7.3f} ms, cold {nbytes / c / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
