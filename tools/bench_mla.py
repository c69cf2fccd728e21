"""One decode token through one layer of multi-head latent attention, as edgemoe runs it
(attention over the cached latents, kv_b folded into the query and the output) against
expanding every cached latent into per-head keys and values first, at DeepSeek-V2-Lite's
shapes (16 heads, q/k 128 + 64 RoPE, v 128, kv_lora_rank 512, hidden 2048), with the bytes
each keeps per token. Random weights; both give the same output (checked).

    python tools/bench_mla.py [--contexts 256,1024,4096] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgemoe import _core
from edgemoe.models.blocks import KVCache, LatentAttention, Linear, Rope, attention

HIDDEN, HEADS, NOPE, ROPE, V, RANK = 2048, 16, 128, 64, 128, 512
EPS = 1e-6


def layer(rng: np.random.Generator) -> tuple[LatentAttention, Linear]:
    """The attention block, and its kv_b as the Linear the expanding computation runs."""

    def f32(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv_b = f32(HEADS, NOPE + V, RANK)
    attn = LatentAttention(
        norm=np.ones(HIDDEN, np.float32),
        q=Linear(f32(HEADS * (NOPE + ROPE), HIDDEN), "F32"),
        q_a=None,
        q_a_norm=None,
        q_b=None,
        kv_a=Linear(f32(RANK + ROPE, HIDDEN), "F32"),
        kv_a_norm=np.ones(RANK, np.float32),
        k_b=kv_b[:, :NOPE],
        v_b=kv_b[:, NOPE:],
        o=Linear(f32(HIDDEN, HEADS * V), "F32"),
        heads=HEADS,
        nope=NOPE,
        rope_dim=ROPE,
        scale=(NOPE + ROPE) ** -0.5,
    )
    return attn, Linear(kv_b.reshape(-1, RANK), "F32")


def expanded_step(
    a: LatentAttention, kv_b: Linear, x: np.ndarray, rope: Rope, latents: np.ndarray, pos: int
) -> np.ndarray:
    """The token at `pos` with keys and values expanded from every cached latent [pos + 1, 1, RANK + ROPE]."""
    q = a.q(x).reshape(1, HEADS, NOPE + ROPE)  # type: ignore[misc]
    q_rope = rope(np.ascontiguousarray(q[:, :, NOPE:]), pos)
    c, k_rope = latents[:, 0, :RANK], latents[:, :, RANK:]  # k_rope already rotated when cached
    k = np.empty((pos + 1, HEADS, NOPE + ROPE), np.float32)
    kv = kv_b(np.ascontiguousarray(c)).reshape(pos + 1, HEADS, NOPE + V)  # kv_b over every cached latent
    k[:, :, :NOPE] = kv[:, :, :NOPE]
    k[:, :, NOPE:] = k_rope
    v = np.zeros((pos + 1, HEADS, NOPE + ROPE), np.float32)  # attention() wants one width: pad v
    v[:, :, :V] = kv[:, :, NOPE:]
    qq = np.concatenate([q[:, :, :NOPE], q_rope], -1) * np.float32(a.scale * np.sqrt(NOPE + ROPE))
    out = attention(np.ascontiguousarray(qq), k, v, pos, None).reshape(1, HEADS, NOPE + ROPE)[:, :, :V]
    return a.o(np.ascontiguousarray(out.reshape(1, -1)))


def median_seconds(fn, min_seconds: float = 1.0, min_calls: int = 5) -> float:
    times: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        _core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    (a, kv_b), rope = layer(rng), Rope(ROPE, 10000.0)
    latent_bytes = (RANK + ROPE) * 4
    expanded_bytes = HEADS * (NOPE + ROPE + V) * 4
    print(f"KV cache per token and layer: latent {latent_bytes} B, expanded keys and values {expanded_bytes} B")
    print("context  latent ms  expanded ms  expanded / latent")
    for S in (int(s) for s in args.contexts.split(",")):
        kv = KVCache(1, 1, RANK + ROPE, values=False)
        a(rng.standard_normal((S - 1, HIDDEN)).astype(np.float32), rope, kv, 0, 0, EPS)  # the context
        x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
        want = a(x, rope, kv, 0, S - 1, EPS)
        got = expanded_step(a, kv_b, x, rope, kv.k[0][0, :S, None], S - 1)
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4), np.abs(got - want).max()
        latent = median_seconds(lambda: a(x, rope, kv, 0, S - 1, EPS))
        expanded = median_seconds(lambda: expanded_step(a, kv_b, x, rope, kv.k[0][0, :S, None], S - 1))
        print(f"{S:7d}  {latent * 1e3:9.2f}  {expanded * 1e3:11.2f}  {expanded / latent:17.1f}")


if __name__ == "__main__":
    main()
