"""Kernel throughput against this machine's memory bandwidth.

Decode (T=1) matvec is memory-bound, so the figure of merit is the weight bytes
streamed per second compared with a plain streaming read of memory. The working
set is several matrices visited round-robin and larger than the L3 cache, so
weights come from DRAM as they would in a real decode step.

    python tools/bench_kernels.py [--threads N] [--working-set-mb 256]
    python tools/bench_kernels.py --prefill --threads 1   # prefill matmuls, GMAC/s of one core
    python tools/bench_kernels.py --mxfp4                 # MXFP4 against INT4 g32 (gpt-oss's shapes)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgemoe import _core
from edgemoe.format import quant as q


def call_seconds(fn, n: int, passes: int = 3, min_seconds: float = 0.3, clock=time.perf_counter) -> np.ndarray:
    """Seconds of each call fn(i), i cycling through range(n), over a few passes.

    Timed one call at a time: on a shared machine the fastest calls show what the
    kernel does when it has the cores, the median what it got on this run."""
    times = []
    t_end = time.perf_counter() + min_seconds
    p = 0
    while p < passes or time.perf_counter() < t_end:
        for i in range(n):
            t0 = clock()
            fn(i)
            times.append(clock() - t0)
        p += 1
    return np.array(times)


def summary(nbytes: int, times: np.ndarray) -> tuple[float, float]:
    """(GB/s of the 10% fastest calls, GB/s of the median call)."""
    return nbytes / np.percentile(times, 10) / 1e9, nbytes / np.median(times) / 1e9


def bandwidth_gbs(working_set: int, piece: int) -> tuple[float, float]:
    """Streaming-read GB/s over pieces of `piece` bytes cycled through `working_set`."""
    buf = np.ones(working_set, dtype=np.uint8)
    n = working_set // piece
    views = [buf[i * piece : (i + 1) * piece] for i in range(n)]
    return summary(piece, call_seconds(lambda i: _core.stream_read(views[i]), n))


def quant_mats(rows, cols, bits, gs, working_set, rng, symmetric=False):
    one = q.quantize_matrix(rng.standard_normal((rows, cols)).astype(np.float32), bits, gs, symmetric)
    n = max(2, working_set // one.nbytes + 1)
    return [one.copy() for _ in range(n)]  # distinct buffers: no cache reuse across the round-robin


def mxfp4_mats(rows, cols, working_set, rng):
    """MXFP4 matrices (kind 5) of random codes and E8M0 scales near 2^-4, as gpt-oss's experts hold."""
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    scales = rng.integers(119, 125, (rows, cols // 32), dtype=np.uint8)
    one = q.mxfp4_matrix(q.pack_codes(codes, 4), scales, rows, cols)
    n = max(2, working_set // one.nbytes + 1)
    return [one.copy() for _ in range(n)]


def float_mats(rows, cols, kind, working_set, rng):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    one = {"f32": w, "f16": w.astype(np.float16), "bf16": q.f32_to_bf16_bits(w)}[kind]
    n = max(2, working_set // one.nbytes + 1)
    return [one.copy() for _ in range(n)]


def bench(name, mats, rows, cols, T, call, bw, rng):
    x = rng.standard_normal((T, cols)).astype(np.float32)
    nbytes = mats[0].nbytes
    times = call_seconds(lambda i: call(x, mats[i]), len(mats))
    fast, med = summary(nbytes, times)
    t10 = np.percentile(times, 10)
    print(
        f"{name:<24} T={T:<3} {t10 * 1e6:8.1f} us  {fast:6.2f} GB/s  "
        f"{100 * fast / bw[0]:5.1f}% of bandwidth   (median {med:5.2f} GB/s, {100 * med / bw[1]:5.1f}%)"
        f"  {rows * cols * T / t10 / 1e9:6.1f} GMAC/s"
    )
    return fast


def bench_mxfp4(ws: int, bw, rng, rounds: int = 3) -> None:
    """MXFP4 (4.25 bits per weight) against INT4 in groups of 32 (symmetric: 4.5 bits, llama.cpp's
    Q4_0 layout; with mins: 5 bits) on gpt-oss-20b's expert shape (2880 x 2880: gate, up and down)
    and the Mixtral-shaped one: one token (the int8-x decode of both), 4 tokens (rows decoded to
    f32 once for the tokens), 16 (prefill: the int8 kernels where _core.prefill_int8 says so, else
    the f32 tile). The kinds take turns, `rounds` times; per kind the best round's fastest 10%, and
    the median over rounds of MXFP4's time over INT4 g32 symmetric's in the same round."""
    qcall = lambda x, m: _core.qmatrix_matmul(x, m)
    for rows, cols in ((2880, 2880), (2816, 1024)):
        mats = {
            "mxfp4": mxfp4_mats(rows, cols, ws, rng),
            "int4 g32 sym": quant_mats(rows, cols, 4, 32, ws, rng, symmetric=True),
            "int4 g32": quant_mats(rows, cols, 4, 32, ws, rng),
        }
        for T in (1, 4, 16):
            x = rng.standard_normal((T, cols)).astype(np.float32)
            t10: dict[str, list[float]] = {name: [] for name in mats}
            for _ in range(rounds):
                for name, ms in mats.items():
                    t10[name].append(float(np.percentile(call_seconds(lambda i: qcall(x, ms[i]), len(ms)), 10)))
            for name, ms in mats.items():
                best = min(t10[name])
                gbs = ms[0].nbytes / best / 1e9
                print(
                    f"{name:<13} {rows}x{cols} T={T:<3} {best * 1e6:8.1f} us  {gbs:6.2f} GB/s "
                    f"{100 * gbs / bw[0]:5.1f}% of bandwidth  {rows * cols * T / best / 1e9:6.1f} GMAC/s"
                )
            ratios = [a / b for a, b in zip(t10["mxfp4"], t10["int4 g32 sym"])]
            print(f"  mxfp4 / int4 g32 sym time, per round: {' '.join(f'{r:.2f}' for r in ratios)}")


def bench_attention(rng) -> None:
    """One decode token's attention over the KV cache: the default model's heads (4 heads, 2 kv
    heads of 64), the Mixtral-shaped model's (16 / 4 / 64) and a narrow-head case (8 / 2 / 32)."""
    print(f"simd={_core.simd()} threads={_core.get_num_threads()}; us per call, fastest 10% / median")
    for heads, kv_heads, hd in ((4, 2, 64), (16, 4, 64), (8, 2, 32)):
        for S in (64, 512, 2048):
            q = rng.standard_normal((1, heads, hd)).astype(np.float32)
            k = rng.standard_normal((S, kv_heads, hd)).astype(np.float32)
            v = rng.standard_normal((S, kv_heads, hd)).astype(np.float32)
            t = call_seconds(lambda i: _core.attention(q, k, v, S - 1, 0), 50)
            print(
                f"heads {heads:2d} / kv {kv_heads} / dim {hd:2d}, {S:4d} keys: "
                f"{1e6 * np.percentile(t, 10):7.1f} / {1e6 * np.median(t):7.1f} us"
            )


def bench_prefill(rng) -> None:
    """Prefill matmuls, compute-bound: the Mixtral-shaped model's expert matrices times the
    tokens one expert gets from a 512-token prompt (~128) and its attention projection times
    all 512, at 4 bits g32 symmetric (llama.cpp's Q4_0 arithmetic) and the other bitwidths.
    4- and 8-bit codes take the int8 kernels where _core.prefill_int8 says so; the other
    bitwidths the f32 tile. Then attention over a whole prompt of 16-512 tokens."""
    # one kernel thread runs on the calling thread: its CPU time leaves out what other
    # processes took from it, which on a shared machine is most of the spread
    one = _core.get_num_threads() == 1
    clock = time.thread_time if one else time.perf_counter
    print(
        f"simd={_core.simd()} threads={_core.get_num_threads()}; GMAC/s of the fastest 10% / median call"
        + (" (the thread's CPU time)" if one else " (wall time)")
    )
    for bits, gs, sym in ((4, 32, True), (4, 64, False), (2, 64, False), (3, 64, False), (8, 64, False)):
        for rows, cols, T in ((2816, 1024, 128), (1024, 2816, 128), (1024, 1024, 512)):
            buf = q.quantize_matrix(rng.standard_normal((rows, cols)).astype(np.float32), bits, gs, sym)
            x = rng.standard_normal((T, cols)).astype(np.float32)
            t = call_seconds(lambda i: _core.qmatrix_matmul(x, buf), 1, passes=5, clock=clock)
            macs = rows * cols * T
            int8 = getattr(_core, "prefill_int8", None)  # builds before the int8 prefill lack it
            path = "int8" if int8 and int8(buf) else "f32 tile"
            print(
                f"int{bits} g{gs}{' sym' if sym else ''} {rows}x{cols} T={T:<3} ({path}): "
                f"{macs / np.percentile(t, 10) / 1e9:6.1f} / {macs / np.median(t) / 1e9:6.1f} GMAC/s"
            )

    # attention over the whole prompt (T = S): the Mixtral-shaped model's heads
    heads, kv_heads, hd = 16, 4, 64
    for T in (16, 128, 512):
        qa = rng.standard_normal((T, heads, hd)).astype(np.float32)
        k = rng.standard_normal((T, kv_heads, hd)).astype(np.float32)
        v = rng.standard_normal((T, kv_heads, hd)).astype(np.float32)
        t = call_seconds(lambda i: _core.attention(qa, k, v, 0, 0), 1, passes=5, clock=clock)
        macs = 2 * heads * hd * T * (T + 1) // 2  # QK^T and PV over the causal half
        print(
            f"prompt attention heads {heads} / kv {kv_heads} / dim {hd}, T={T:<3}: "
            f"{macs / np.percentile(t, 10) / 1e9:6.1f} / {macs / np.median(t) / 1e9:6.1f} GMAC/s"
        )


def numpy_sample(logits: np.ndarray, temperature: float, top_p: float, u: float) -> int:
    """The numpy sampler the native one replaced (edgemoe/sampling.py before it): the nucleus
    from a sort of all the weights."""
    z = logits.astype(np.float64) / temperature
    w = np.exp(z - z.max())
    ws = np.sort(w)[::-1]
    keep = int(np.searchsorted(np.cumsum(ws / w.sum()), top_p) + 1)
    if keep < len(w):
        cut = np.partition(w, len(w) - keep)[len(w) - keep]
        above, at = np.flatnonzero(w > cut), np.flatnonzero(w == cut)
        pool = np.sort(np.concatenate([above, at[: keep - len(above)]]))
    else:
        pool = np.arange(len(w))
    c = np.cumsum(w[pool])
    return int(pool[min(int(np.searchsorted(c, u * c[-1], side="right")), len(pool) - 1)])


def bench_sampler(rng) -> None:
    """One sampled token (temperature 0.8, top-p 0.95) from the default model's logits at 200
    positions of its test text: the native sampler against the numpy one it replaced."""
    import edgemoe
    from edgemoe.planning.default_model import SHIPPED, default_model_path

    m = edgemoe.load(default_model_path())
    logits = m.logits(m.encode((SHIPPED / "test.txt").read_text(encoding="utf-8")[:4000])[:200])
    print(f"{len(logits)} rows of {logits.shape[1]} logits; us per call, fastest 10% / median")
    for name, fn in (
        ("numpy", lambda r, u: numpy_sample(r, 0.8, 0.95, u)),
        ("native", lambda r, u: _core.sample(r, 0.8, 0, 0.95, u)),
    ):
        t = call_seconds(lambda i: fn(logits[i % len(logits)], float(rng.random())), 5 * len(logits))
        print(f"{name:<7} {1e6 * np.percentile(t, 10):7.1f} / {1e6 * np.median(t):7.1f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all)")
    ap.add_argument("--working-set-mb", type=int, default=256, help="bytes of weights cycled through (> L3)")
    ap.add_argument("--quick", action="store_true", help="INT4 expert matrices only (g64, and g32 symmetric)")
    ap.add_argument(
        "--mxfp4", action="store_true", help="instead: MXFP4 against INT4 g32 on gpt-oss's expert shape, 1-16 tokens"
    )
    ap.add_argument(
        "--attention",
        action="store_true",
        help="instead: decode attention (one query token) against 64-2048 cached keys, us per call",
    )
    ap.add_argument(
        "--sampler",
        action="store_true",
        help="instead: one sampled token from the default model's logits, native against numpy",
    )
    ap.add_argument(
        "--prefill",
        action="store_true",
        help="instead: prefill matmuls (128-512 tokens) and prompt attention of the Mixtral-shaped model's shapes, GMAC/s",
    )
    args = ap.parse_args()
    if args.threads:
        _core.set_num_threads(args.threads)
    if args.attention:
        return bench_attention(np.random.default_rng(0))
    if args.sampler:
        return bench_sampler(np.random.default_rng(0))
    if args.prefill:
        return bench_prefill(np.random.default_rng(0))
    ws = args.working_set_mb << 20
    rng = np.random.default_rng(0)
    print(f"simd={_core.simd()} threads={_core.get_num_threads()} working set {args.working_set_mb} MiB")
    bw = bandwidth_gbs(ws, 2 << 20)
    print(f"streaming read bandwidth (2 MiB pieces): {bw[0]:.2f} GB/s fastest 10%, {bw[1]:.2f} GB/s median")
    print("kernel GB/s = weight bytes / time; fastest 10% of calls vs the same for the streaming read;")
    print("T > 1 is compute-bound: read GMAC/s there")
    if args.mxfp4:
        return bench_mxfp4(ws, bw, rng)

    qcall = lambda x, m: _core.qmatrix_matmul(x, m)
    shapes = [(2816, 1024), (1024, 2816)]
    for rows, cols in shapes:
        mats = quant_mats(rows, cols, 4, 64, ws, rng)
        for T in (1, 4, 16):
            bench(f"int4 g64 {rows}x{cols}", mats, rows, cols, T, qcall, bw, rng)
    # groups of 32, symmetric: the layout compared with llama.cpp's Q4_0 (edgemoe/peers.py)
    bench(
        "int4 g32 sym 2816x1024", quant_mats(2816, 1024, 4, 32, ws, rng, symmetric=True), 2816, 1024, 1, qcall, bw, rng
    )
    if args.quick:
        return
    for bits in (2, 3, 8):
        mats = quant_mats(2816, 1024, bits, 64, ws, rng)
        for T in (1, 16):
            bench(f"int{bits} g64 2816x1024", mats, 2816, 1024, T, qcall, bw, rng)
    for gs in (32, 128):
        mats = quant_mats(2816, 1024, 4, gs, ws, rng)
        bench(f"int4 g{gs} 2816x1024", mats, 2816, 1024, 1, qcall, bw, rng)
    for kind in ("bf16", "f16", "f32"):
        mats = float_mats(2048, 2048, kind, ws, rng)
        for T in (1, 16):
            bench(f"{kind} linear 2048x2048", mats, 2048, 2048, T, lambda x, m, k=kind: _core.linear(x, m, k), bw, rng)


if __name__ == "__main__":
    main()
