"""Per-token decode cost of the dense backbone: edgemoe's native path vs onnxruntime.

The backbone is everything but the routed experts: embedding lookup, per layer
attn_norm, q/k/v/o, RoPE, the KV cache, attention, ffn_norm and the router (with
routing), then output_norm and lm_head. The experts are left out on purpose: they
run in the native core whichever path the backbone takes.

  native         edgemoe.models.base as the runtime runs it: numpy f32 around
                 _core.linear on bf16 weights (raw uint16 bits)
  native-int4    the same with q/k/v/o/lm_head as 4-bit QMatrix (_core.qmatrix_matmul)
  numpy-f32-ref  the same Python with numpy BLAS as the matmul: a reference that
                 separates the glue's cost from the kernel's, not a candidate
  ort-*          tools/onnx_backbone.py graphs, one call per layer per token (the
                 native MoE has to run between layers) plus one lm_head call;
                 weights f32, f16 or 4-bit MatMulNBits

Random seeded weights; every timed token sees exactly `context` cached tokens (the
new K/V row is written at slot `context` each time, so the context does not grow).
Variants are timed round-robin in blocks so machine noise lands on all of them.

    python tools/bench_backbone.py            # ~2 minutes
    python tools/bench_backbone.py --tokens 50 --shapes small   # quick look
    OPENBLAS_NUM_THREADS=1 python tools/bench_backbone.py --threads 1 \
        --variants native,numpy-f32-ref,ort-f32                # glue vs kernel, one core
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnx_backbone as ob  # noqa: E402

from edgemoe import _core  # noqa: E402
from edgemoe.format.quant import quantize_matrix  # noqa: E402
from edgemoe.format.safetensors import to_float32 as to_f32  # noqa: E402
from edgemoe.models.blocks import KVCache, LinearGroup, route_softmax_topk  # noqa: E402
from edgemoe.models.decoder import DecoderConfig  # noqa: E402
from edgemoe.models.mixtral import Model as MixtralModel  # noqa: E402

DEFAULT_THREADS = 2
PARITY_TOKENS = 4  # tokens every variant runs through the native path's checks before timing
EPS = 1e-5
ROPE_THETA = 1e6


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int = 2


SHAPES = {
    "mixtral": Shape(hidden=1024, layers=12, heads=16, kv_heads=4, head_dim=64, vocab=8000, experts=8),
    "small": Shape(hidden=256, layers=6, heads=4, kv_heads=4, head_dim=64, vocab=8192, experts=16),
}
ORT_VARIANTS = {"ort-f32": ("f32", 0), "ort-f16": ("f16", 0), "ort-int4": ("int4", 4)}


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even, as a checkpoint stores them."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def random_backbone(s: Shape, seed: int) -> dict[str, tuple[np.ndarray, str]]:
    """Canonical backbone tensors (docs/format.md names) in bf16, seeded."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> tuple[np.ndarray, str]:
        return bf16_bits(rng.standard_normal((rows, cols), np.float32) * 0.02), "BF16"

    def norm(n: int) -> tuple[np.ndarray, str]:
        return bf16_bits(1.0 + 0.1 * rng.standard_normal(n, np.float32)), "BF16"

    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    t = {
        "tok_embeddings": (bf16_bits(rng.standard_normal((s.vocab, s.hidden), np.float32)), "BF16"),
        "output_norm": norm(s.hidden),
        "output": mat(s.vocab, s.hidden),
    }
    for i in range(s.layers):
        p = f"layers.{i}."
        t.update(
            {
                p + "attn_norm": norm(s.hidden),
                p + "attn_q": mat(qd, s.hidden),
                p + "attn_k": mat(kvd, s.hidden),
                p + "attn_v": mat(kvd, s.hidden),
                p + "attn_o": mat(s.hidden, qd),
                p + "ffn_norm": norm(s.hidden),
                p + "ffn_router": mat(s.experts, s.hidden),
            }
        )
    return t


def decoder_config(s: Shape) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        rms_norm_eps=EPS,
        rope_theta=ROPE_THETA,
    )


# -- the two paths ------------------------------------------------------------


class NumpyLinear:
    """x @ W.T with W pre-converted to f32 and handed to numpy's BLAS: a stand-in kernel."""

    kind, bias = "numpy", None

    def __init__(self, lin):
        self.w = np.ascontiguousarray(to_f32(lin.w, "BF16").T)  # [in, out]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w


class Q4Linear:
    """x @ W.T with W as a docs/format.md QMatrix, 4-bit asymmetric groups of 32, run by _core.qmatrix_matmul."""

    kind, bias = "qmatrix", None

    def __init__(self, lin):
        self.w = quantize_matrix(to_f32(lin.w, "BF16"), bits=4, group_size=32, symmetric=False)  # uint8 buffer

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _core.qmatrix_matmul(x, self.w)


class NativeBackbone:
    """DecoderLM.forward for one token with the routed experts left out.

    kernel "bf16": the runtime as it is (_core.linear on the bf16 weights).
    kernel "q4": q/k/v/o and lm_head as 4-bit QMatrix through _core.qmatrix_matmul (the
      experts' kernel), router kept bf16: the native counterpart of ort-int4.
    kernel "numpy": every linear as numpy f32 matmul (f32 weights): same Python glue
      with a BLAS kernel, to separate glue cost from kernel cost.
    """

    NAMES = {"bf16": "native", "q4": "native-int4", "numpy": "numpy-f32-ref"}

    def __init__(
        self, s: Shape, tensors: dict, past_k: list[np.ndarray], past_v: list[np.ndarray], kernel: str = "bf16"
    ):
        self.name = self.NAMES[kernel]
        self.m = MixtralModel(decoder_config(s), tensors, cache=None, moe_layers=list(range(s.layers)))
        if kernel != "bf16":
            wrap = NumpyLinear if kernel == "numpy" else Q4Linear
            for L in self.m.layers:
                a = L.attn
                a.q, a.k, a.v, a.o = wrap(a.q), wrap(a.k), wrap(a.v), wrap(a.o)
                a.qkv = LinearGroup(a.q, a.k, a.v)  # what attention calls: one native call when all are 4-bit
                if kernel == "numpy":
                    L.moe.router = wrap(L.moe.router)
            self.m.lm_head = wrap(self.m.lm_head)
        self.kv = KVCache(s.layers, s.kv_heads, s.head_dim)
        for i in range(s.layers):
            self.kv.append(i, past_k[i], past_v[i], 0)
        self.context = past_k[0].shape[0]

    def weight_bytes(self) -> int:
        m = self.m
        n = m.embed.nbytes + m.lm_head.w.nbytes + m.out_norm.nbytes
        for L in m.layers:
            n += sum(lin.w.nbytes for lin in (L.attn.q, L.attn.k, L.attn.v, L.attn.o, L.moe.router))
            n += L.attn.norm.nbytes + L.ffn_norm.nbytes
        return n

    def token(self, tok: int, trace: list | None = None) -> np.ndarray:
        """DecoderLM.forward's own block() and head() for one token, with the routed experts answering zeros."""
        m, start = self.m, self.context
        routed: list = []
        m.moe_override = lambda layer, x, ids, weights: routed.append((x, ids, weights)) or np.zeros_like(x)
        h = m.embed_tokens(np.array([tok]))  # [1, H]
        for i in range(len(m.layers)):
            h = m.block(i, h, self.kv, start)
            if trace is not None:
                x, ids, weights = routed[-1]
                trace.append((h, x, ids, weights, self.kv.k[i][None, :, start], self.kv.v[i][None, :, start]))
        return m.head(h)


class OrtBackbone:
    """The same token through per-layer onnxruntime sessions; the KV cache stays ours."""

    OUTPUTS = ["hidden_out", "ffn_input", "router_logits", "key", "value"]
    TRACE = ["hidden_out", "ffn_input", "expert_ids", "expert_weights", "key", "value"]  # per layer, both paths

    def __init__(
        self,
        name: str,
        s: Shape,
        tensors: dict,
        past_k: list[np.ndarray],
        past_v: list[np.ndarray],
        weight_format: str,
        accuracy_level: int,
        threads: int,
        spinning: bool,
    ):
        self.name, self.s = name, s
        self.embed = tensors["tok_embeddings"][0]  # stays bf16 in numpy, as in the native path
        self.exported_bytes = self.embed.nbytes
        f32 = {k: to_f32(a, dt) for k, (a, dt) in tensors.items() if k != "tok_embeddings"}
        models = []
        for i in range(s.layers):
            p = f"layers.{i}."
            lw = ob.LayerWeights(
                f32[p + "attn_norm"],
                f32[p + "attn_q"],
                f32[p + "attn_k"],
                f32[p + "attn_v"],
                f32[p + "attn_o"],
                f32[p + "ffn_norm"],
                f32[p + "ffn_router"],
            )
            m, nbytes = ob.layer_graph(
                lw, s.heads, s.kv_heads, s.head_dim, EPS, ROPE_THETA, weight_format, accuracy_level=accuracy_level
            )
            models.append(m.SerializeToString())
            self.exported_bytes += nbytes
        m, nbytes = ob.lm_head_graph(
            f32["output_norm"], f32["output"], EPS, weight_format, accuracy_level=accuracy_level
        )
        models.append(m.SerializeToString())
        self.exported_bytes += nbytes
        del f32, m
        rss0 = _rss()
        sessions = [ob.session(b, threads, spinning) for b in models]
        del models
        self.rss_growth = _rss() - rss0  # what onnxruntime keeps after load (weights, prepacked copies, arenas)
        self.layers, self.head = sessions[:-1], sessions[-1]
        self.context = S = past_k[0].shape[0]
        self.k = [np.concatenate([k, np.zeros_like(k[:1])]) for k in past_k]  # [S+1, kv, hd], row S is this token's
        self.v = [np.concatenate([v, np.zeros_like(v[:1])]) for v in past_v]
        self.position = np.array([S], np.int64)

    def weight_bytes(self) -> int:
        return self.exported_bytes

    def token(self, tok: int, trace: list | None = None) -> np.ndarray:
        S = self.context
        h = to_f32(self.embed[[tok]], "BF16")
        for i, sess in enumerate(self.layers):
            h, x, router_logits, k, v = sess.run(
                self.OUTPUTS,
                {"hidden": h, "past_key": self.k[i][:S], "past_value": self.v[i][:S], "position": self.position},
            )
            self.k[i][S] = k[0]
            self.v[i][S] = v[0]
            ids, weights = route_softmax_topk(router_logits, self.s.top_k, normalize=True)
            h = h + np.zeros_like(x)  # where the native experts' output (moe on x) would be added
            if trace is not None:
                trace.append((h, x, ids, weights, k, v))
        return self.head.run(["logits"], {"hidden": h})[0]


def _git_version() -> str:
    """The checkout the native core was built from, as far as git can tell (kernels change fast)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so RSS shows what is held
    except OSError:
        pass
    return psutil.Process().memory_info().rss


# -- measuring ----------------------------------------------------------------


def check_parity(native: NativeBackbone, other, tok: int, strict: bool) -> tuple[float, float, float]:
    """For one token: (max |diff| over every float output of every layer and the logits,
    ||logits diff|| / ||logits||, share of layers whose top-k expert choice is the same set).

    strict: stop unless every output is within 1e-3 (abs and rel) of the native path's.
    """
    tn, to = [], []
    ln, lo = native.token(tok, tn), other.token(tok, to)
    worst, same_experts = float(np.abs(ln - lo).max()), 0
    for i, (a_layer, b_layer) in enumerate(zip(tn, to)):
        for what, a, b in zip(OrtBackbone.TRACE, a_layer, b_layer):
            a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
            if what == "expert_ids":
                same = set(a.tolist()) == set(b.tolist())
                same_experts += same
                if strict and not same:
                    raise SystemExit(f"{other.name} routes layer {i} to experts {b} where native picks {a}")
                continue
            d = float(np.abs(a - b).max())
            worst = max(worst, d)
            if strict and not np.allclose(a, b, atol=1e-3, rtol=1e-3):
                raise SystemExit(
                    f"{other.name} differs from native at layer {i} '{what}' by {d:.2e}: "
                    "the exported graph does not compute what the runtime does"
                )
    if strict and not np.allclose(ln, lo, atol=1e-3, rtol=1e-3):
        raise SystemExit(f"{other.name} logits differ from native by {float(np.abs(ln - lo).max()):.2e}")
    return worst, float(np.linalg.norm(ln - lo) / np.linalg.norm(ln)), same_experts / len(tn)


def time_round_robin(runners: list, tokens: np.ndarray, warmup: int, block: int) -> dict[str, np.ndarray]:
    """Seconds per token for each runner, timed in interleaved blocks of `block` tokens."""
    for r in runners:
        for t in tokens[:warmup]:
            r.token(int(t))
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    timed = tokens[warmup:]
    clock = time.perf_counter
    for b in range(0, len(timed), block):
        for r in runners:
            for t in timed[b : b + block]:
                t0 = clock()
                r.token(int(t))
                times[r.name].append(clock() - t0)
    return {k: np.array(v) for k, v in times.items()}


def _median_us(fn: Callable[[], object], calls: int) -> tuple[float, float, float]:
    for _ in range(max(10, calls // 10)):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    out *= 1e6
    return float(np.median(out)), float(out.min()), float(out.max())


def call_overhead(calls: int, threads: int, spinning: bool) -> tuple[float, float, float]:
    """Microseconds per InferenceSession.run on a one-Add graph: the fixed price of a call."""
    sess = ob.session(ob.tiny_graph(), threads, spinning)
    x = np.zeros((1, 8), np.float32)
    return _median_us(lambda: sess.run(["y"], {"x": x}), calls)


def kernel_rows(calls: int, threads: int, spinning: bool, with_numpy: bool) -> list[tuple[str, str, float]]:
    """One-token matvec y = W x on the biggest backbone matrices, each way the paths do it."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    rows = []
    for out_f, in_f in ((1024, 1024), (8000, 1024), (8192, 256)):
        w = bf16_bits(rng.standard_normal((out_f, in_f), np.float32) * 0.02)
        wf = to_f32(w, "BF16")
        x = rng.standard_normal((1, in_f), np.float32)
        label = f"[{out_f}, {in_f}]"
        rows.append((label, "_core.linear bf16", _median_us(lambda: _core.linear(x, w, "bf16"), calls)[0]))
        q4 = quantize_matrix(wf, bits=4, group_size=32, symmetric=False)
        rows.append((label, "_core.qmatrix_matmul 4-bit", _median_us(lambda: _core.qmatrix_matmul(x, q4), calls)[0]))
        if with_numpy:
            wt = np.ascontiguousarray(wf.T)
            rows.append((label, "numpy f32 (BLAS)", _median_us(lambda: x @ wt, calls)[0]))
        for fmt, acc in (("f32", 0), ("int4", 4)):
            g = ob._Builder(fmt, 32, acc)
            g.linear("x", wf, "y")
            m = g.model(
                "matvec",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_f])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_f])],
            )
            sess = ob.session(m, threads, spinning)
            rows.append((label, f"onnxruntime {fmt} graph", _median_us(lambda: sess.run(["y"], {"x": x}), calls)[0]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="mixtral,small", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--contexts", default="64,512", help="tokens already in the KV cache")
    ap.add_argument("--tokens", type=int, default=200, help="timed tokens per variant, shape and context")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--block", type=int, default=10, help="tokens per round-robin block")
    ap.add_argument(
        "--variants",
        default="native,native-int4," + ",".join(ORT_VARIANTS),
        help="also: numpy-f32-ref (run it with OPENBLAS_NUM_THREADS=1: BLAS threads stall on busy cores)",
    )
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="threads for _core and onnxruntime")
    ap.add_argument(
        "--spin",
        action="store_true",
        help="let onnxruntime's threads spin between calls (its default; off here because on a shared "
        "machine, or with the native MoE running between calls, spinning threads starve the rest)",
    )
    ap.add_argument("--no-kernels", action="store_true", help="skip the single-matvec table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not hasattr(_core, "linear"):
        raise SystemExit(
            "edgemoe._core has no 'linear' yet: the native core is older than edgemoe/models/base.py; "
            "rebuild it (pip install . in the repository) and run again"
        )
    _core.set_num_threads(args.threads)
    variants = args.variants.split(",")
    spinning = args.spin
    contexts = [int(c) for c in args.contexts.split(",")]
    import onnxruntime as ort

    t_start = time.perf_counter()
    load = os.getloadavg()
    rows, mem_rows = [], []
    for shape_name in args.shapes.split(","):
        s = SHAPES[shape_name]
        tensors = random_backbone(s, args.seed)
        for ctx in contexts:
            rng = np.random.default_rng(args.seed + ctx)
            past_k = [rng.standard_normal((ctx, s.kv_heads, s.head_dim), np.float32) for _ in range(s.layers)]
            past_v = [rng.standard_normal((ctx, s.kv_heads, s.head_dim), np.float32) for _ in range(s.layers)]
            native = NativeBackbone(s, tensors, past_k, past_v)
            runners: list = [native]
            for kernel in ("q4", "numpy"):
                if NativeBackbone.NAMES[kernel] in variants:
                    runners.append(NativeBackbone(s, tensors, past_k, past_v, kernel=kernel))
            for name, (fmt, acc) in ORT_VARIANTS.items():
                if name in variants:
                    runners.append(OrtBackbone(name, s, tensors, past_k, past_v, fmt, acc, args.threads, spinning))
            tokens = np.random.default_rng(args.seed + 1).integers(0, s.vocab, args.warmup + args.tokens)
            # parity before timing: the f32 paths must agree to 1e-3; f16/int4 report their error
            parity = {}
            for r in runners[1:]:
                checks = [
                    check_parity(native, r, int(t), strict=r.name in ("ort-f32", "numpy-f32-ref"))
                    for t in tokens[:PARITY_TOKENS]
                ]
                parity[r.name] = (
                    max(c[0] for c in checks),
                    max(c[1] for c in checks),
                    float(np.mean([c[2] for c in checks])),
                )
            times = time_round_robin([r for r in runners if r.name in variants], tokens, args.warmup, args.block)
            base = float(np.median(times["native"])) if "native" in times else None
            for r in runners:
                if r.name not in times:
                    continue
                t = times[r.name] * 1e3
                med = float(np.median(t))
                rows.append(
                    (
                        shape_name,
                        ctx,
                        r.name,
                        med,
                        float(t.min()),
                        float(t.max()),
                        f"{med / (base * 1e3):.2f}x" if base else "-",
                    )
                )
                if ctx == contexts[0]:
                    rss = getattr(r, "rss_growth", None)
                    p = parity.get(r.name)
                    mem_rows.append(
                        (
                            shape_name,
                            r.name,
                            r.weight_bytes() / 2**20,
                            f"{rss / 2**20:.1f}" if rss is not None else "-",
                            f"{p[0]:.1e} / {p[1]:.1e} / {p[2]:.0%}" if p else "(reference)",
                        )
                    )
            del runners, native
            gc.collect()

    overhead = call_overhead(3000, args.threads, spinning)
    kernels = [] if args.no_kernels else kernel_rows(200, args.threads, spinning, "numpy-f32-ref" in variants)

    print(
        f"\n### Dense backbone, per-token decode (no experts), {args.threads} thread(s), "
        f"onnxruntime {ort.__version__}, core simd {_core.simd()}, tree {_git_version()}\n"
    )
    print(
        f"{args.tokens} timed tokens per row after {args.warmup} warm-up, variants interleaved in blocks of "
        f"{args.block}; load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"onnxruntime spinning {'on' if spinning else 'off'}\n"
    )
    print("| shape | context | path | median ms/token | min | max | vs native |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for shape_name, ctx, name, med, lo, hi, rel in rows:
        print(f"| {shape_name} | {ctx} | {name} | {med:.3f} | {lo:.3f} | {hi:.3f} | {rel} |")
    print(
        "\n| shape | path | backbone weights held (MiB) | onnxruntime RSS growth at load (MiB) "
        f"| vs native over {PARITY_TOKENS} tokens: max abs diff / logits rel. error / same top-k experts |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for shape_name, name, mib, rss, diff in mem_rows:
        print(f"| {shape_name} | {name} | {mib:.1f} | {rss} | {diff} |")
    if kernels:
        print("\n| one-token matvec | how | median us |")
        print("| --- | --- | ---: |")
        for label, how, us in kernels:
            print(f"| {label} | {how} | {us:.1f} |")
    print(
        f"\nonnxruntime per-call overhead (one Add on [1, 8]): median {overhead[0]:.1f} us, "
        f"min {overhead[1]:.1f}, max {overhead[2]:.1f}; a token makes layers + 1 calls "
        f"({', '.join(f'{k}: {v.layers + 1}' for k, v in SHAPES.items())})."
    )
    print(
        "Weights held count the bf16 embedding table on every path. numpy-f32-ref is the native path's Python "
        "with numpy BLAS in place of _core.linear (a reference, not a candidate; BLAS threads follow "
        "OPENBLAS_NUM_THREADS). int4 rows keep routers unquantized and use groups of 32: native-int4 as docs/format.md "
        "QMatrix (f16 scale+min), ort-int4 as MatMulNBits accuracy_level 4 (int8 activations). "
        f"Whole run: {time.perf_counter() - t_start:.0f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
