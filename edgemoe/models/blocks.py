"""Typed building blocks every architecture is made of.

Numeric pieces (Linear over float or quantized weights, RoPE, the KV cache, attention,
softmax top-k routing) run in the native core; the weight groups (Attention, DenseMLP,
SharedExpert, MoE, Layer) say what one decoder layer holds. Architecture files combine
them; edgemoe/models/decoder.py runs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _core
from ..errors import ModelDirectoryError
from ..format.safetensors import FLOAT_KIND


class Linear:
    """y = x @ W.T (+ b), W read by the native core as stored: a float matrix (bf16/f16/f32)
    or, for a U8 tensor, a group-quantized QMatrix written by the converter (docs/format.md)."""

    def __init__(self, w: np.ndarray, dtype: str, bias: np.ndarray | None = None):
        self.w = np.ascontiguousarray(w)
        self.kind = "qmatrix" if dtype == "U8" else FLOAT_KIND[dtype]
        self.bias = bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "qmatrix":
            y = _core.qmatrix_matmul(x, self.w)  # [T, rows]
        else:
            y = _core.linear(x, self.w, self.kind)  # [T, out]
        if self.bias is not None:
            y += self.bias
        return y


class LinearGroup:
    """Linears that read the same x (a layer's q, k, v): one native call when all are
    quantized, so a decode token rounds x once and wakes the threads once."""

    def __init__(self, *linears: Linear):
        self.linears = linears
        self.bufs = [lin.w for lin in linears] if all(lin.kind == "qmatrix" for lin in linears) else None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if self.bufs is None:
            return [lin(x) for lin in self.linears]
        ys = _core.qmatrix_matmul_many(x, self.bufs)
        for y, lin in zip(ys, self.linears):
            if lin.bias is not None:
                y += lin.bias
        return ys


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float) -> np.ndarray:
    """LayerNorm over x's last axis (mean removed, biased variance), float32: Phi-MoE's norms."""
    x = np.asarray(x, dtype=np.float32)
    centred = x - x.mean(-1, keepdims=True)
    out = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + np.float32(eps)) * w
    return np.ascontiguousarray(out if b is None else out + b, dtype=np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def route_softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts, keep the top k (lower id first on a tie), optionally
    renormalize them to sum 1 (native). logits [T, E] -> (ids int32 [T, k], weights float32 [T, k])."""
    return _core.softmax_topk(logits, k, normalize)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(dim: int, theta: float, scaling: dict[str, Any]) -> tuple[np.ndarray, float]:
    """YaRN RoPE (rope_type "yarn"): inverse frequencies [dim/2] that blend interpolated
    (divided by `factor`) and original frequencies along a ramp between the dimensions that
    turn beta_fast and beta_slow times over the original context, and the factor cos and sin
    are scaled by (transformers' _compute_yarn_parameters, float32 as there)."""
    factor = scaling.get("factor")
    original = float(scaling["original_max_position_embeddings"])
    if factor is None:
        factor = float(scaling["max_position_embeddings"]) / original
    factor = float(factor)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def turns_to_dim(turns: float) -> float:  # the dimension that turns `turns` times over the original context
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_to_dim(beta_fast), turns_to_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # share of the original frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return np.ascontiguousarray(inv_freq, dtype=np.float32), float(attention_factor)


def longrope_frequencies(
    dim: int, theta: float, scaling: dict[str, Any]
) -> tuple[tuple[np.ndarray, float], tuple[np.ndarray, float], int]:
    """LongRoPE (rope_type "longrope", Phi-3 / Phi-3.5-MoE): ((short inv_freq [dim/2], short
    factor), (long inv_freq, long factor), the original context length). Each frequency is divided
    by its short_factor (long_factor), cos and sin are scaled by short_mscale (long_mscale) or,
    without one, by attention_factor or sqrt(1 + ln(factor) / ln(original)). A sequence runs the
    short set while it fits the original context and the long set, for all its positions, once
    it is longer."""
    original = int(scaling["original_max_position_embeddings"])
    base = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    default = scaling.get("attention_factor")
    if default is None:
        factor = scaling.get("factor") or float(scaling["max_position_embeddings"]) / original
        default = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))

    def one(kind: str) -> tuple[np.ndarray, float]:
        ext = np.asarray(scaling[f"{kind}_factor"], dtype=np.float32)
        if ext.shape != (dim // 2,):
            raise ModelDirectoryError(
                f"the model config's LongRoPE {kind}_factor has {ext.size} values for a head of {dim} "
                f"dims (it needs {dim // 2}): the checkpoint's config.json is inconsistent"
            )
        mscale = scaling.get(f"{kind}_mscale")
        return np.ascontiguousarray(1.0 / (ext * base), dtype=np.float32), float(default if mscale is None else mscale)

    return one("short"), one("long"), original


class Rope:
    """Rotary embedding, half-split ("rotate_half") convention as in transformers. scaling: the
    config's rope parameters when they are not the default RoPE ("yarn", "longrope"), with the
    context length they extend (original_max_position_embeddings, max_position_embeddings).

    LongRoPE has two sets of frequencies: a call whose sequence (start + T tokens) is longer than
    `switch_at` rotates with the long set, a shorter one with the short set (inv_freq)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        self.attention_factor = 1.0  # what cos and sin are scaled by
        self.switch_at: int | None = None  # LongRoPE: sequences longer than this run `long`
        self.long: tuple[np.ndarray, float] | None = None
        if scaling is None:
            self.inv_freq = np.ascontiguousarray(
                1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)), dtype=np.float32
            )
        elif scaling.get("rope_type", scaling.get("type")) == "longrope":
            (self.inv_freq, self.attention_factor), self.long, self.switch_at = longrope_frequencies(
                head_dim, theta, scaling
            )
        else:
            self.inv_freq, self.attention_factor = yarn_frequencies(head_dim, theta, scaling)

    def recomputes(self, start: int, count: int) -> bool:
        """Whether `count` tokens appended at `start` take a sequence past switch_at: its cached
        positions were rotated with the short set and must be computed again with the long one."""
        return self.switch_at is not None and 0 < start <= self.switch_at < start + count

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        """x [T, heads, head_dim] float32 at positions start..start+T-1, rotated in place."""
        inv_freq, factor = self.inv_freq, self.attention_factor
        if self.long is not None and self.switch_at is not None and start + x.shape[0] > self.switch_at:
            inv_freq, factor = self.long
        _core.rope(x, start, inv_freq)
        if factor != 1.0:
            x *= np.float32(factor)
        return x


class KVCache:
    """Keys and values per layer, grown in chunks so decode appends in place. values=False:
    one array per layer serves as both (multi-head latent attention caches one latent per
    token that its keys and values are read from).

    Each layer's array is kv head major, [kv_heads, capacity, head_dim]: one kv head's keys
    are one contiguous stream, which one token's attention reads twice as fast as rows that
    interleave the heads (tools/bench_attention.py --layout). append() returns views
    [positions, kv_heads, head_dim] of it, which _core.attention reads in place. dtype
    float16 halves the cache and what a decode token reads of it (keys and values rounded
    to nearest as they are stored, as llama.cpp keeps them); float32 keeps them exactly."""

    CHUNK = 256

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, values: bool = True, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        assert self.dtype in (np.float16, np.float32), "a KV cache holds float16 or float32"
        empty = np.empty((kv_heads, 0, head_dim), self.dtype)
        self.k: list[np.ndarray] = [empty] * num_layers
        self.v: list[np.ndarray] = [empty] * num_layers if values else self.k
        self.length = 0
        self.kv_heads, self.head_dim = kv_heads, head_dim
        # the token ids at positions 0..length-1, kept only by a model that may have to compute
        # them again (DecoderLM.keeps_tokens: LongRoPE's switch to its long factors)
        self.tokens: list[int] = []

    def stores(self) -> tuple[list[np.ndarray], ...]:
        return (self.k, self.v) if self.v is not self.k else (self.k,)

    def reserve(self, layer: int, start: int, end: int) -> None:
        """Room for positions up to `end` in layer's arrays, keeping positions before `start`."""
        if end > self.k[layer].shape[1]:
            cap = ((end + self.CHUNK - 1) // self.CHUNK) * self.CHUNK
            for store in self.stores():
                grown = np.empty((self.kv_heads, cap, self.head_dim), self.dtype)
                grown[:, :start] = store[layer][:, :start]
                store[layer] = grown

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """k, v [T, kv_heads, head_dim] at positions start.. -> all keys and values so far,
        views [start + T, kv_heads, head_dim]."""
        end = start + k.shape[0]
        self.reserve(layer, start, end)
        self.k[layer][:, start:end] = k.transpose(1, 0, 2)
        if self.v is not self.k:
            self.v[layer][:, start:end] = v.transpose(1, 0, 2)
        return self.k[layer][:, :end].transpose(1, 0, 2), self.v[layer][:, :end].transpose(1, 0, 2)

    def nbytes(self) -> int:
        return sum(a.nbytes for store in self.stores() for a in store)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None, sinks: np.ndarray | None = None
) -> np.ndarray:
    """Causal grouped-query attention of T new queries against all cached keys (native).

    q [T, heads, hd] at positions start..start+T-1; k, v [S, kv_heads, hd] with S = start+T;
    sinks [heads] or None (attention sinks). Returns [T, heads*hd].
    """
    return _core.attention(q, k, v, start, window or 0, sinks)


Router = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class RouteObserver:
    """Optional hooks on the forward pass (routing traces, predictive prefetch: see
    edgemoe/runtime/trace.py, edgemoe/runtime/prefetch.py). With none set the cost is one check per layer."""

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        """MoE layer `layer` has routed, its experts have not run yet. resid [T, hidden]:
        the residual stream at the MoE input (before ffn_norm); ids, weights [T, k]."""

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        """Layer `layer` is done: h [T, hidden] is its output (the next layer's input)."""


# -- one decoder layer's weights ------------------------------------------------------
@dataclasses.dataclass
class Attention:
    """Grouped-query attention with RoPE. q_norm/k_norm: RMSNorm weights applied per head
    (qk_norm "per_head", Qwen3) or over the whole projection before the head split
    (qk_norm "full", OLMoE); clip: clamp q, k and v to [-clip, clip] (OLMoE's clip_qkv);
    window: a sliding window in tokens, or None; sinks: a learned logit per head that joins each
    softmax's denominator and attends to nothing (gpt-oss), or None."""

    norm: np.ndarray  # attn_norm [hidden]
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    qk_norm: str | None = None  # None, "per_head" or "full"
    clip: float | None = None
    window: int | None = None
    scale: float | None = None  # the softmax scale of q . k when it is not 1/sqrt(head_dim) (Granite)
    norm_bias: np.ndarray | None = None  # attn_norm's bias (LayerNorm architectures)
    sinks: np.ndarray | None = None  # float32 [heads]

    def __post_init__(self) -> None:
        self.qkv = LinearGroup(self.q, self.k, self.v)


@dataclasses.dataclass
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3). Keys and values come from one latent per
    token: kv_a x = [c (rank values, normed by kv_a_norm), k_rope (rope_dim values, one RoPE key
    shared by all heads)], and head h's key is [k_b[h] c, k_rope] and its value v_b[h] c. The
    cache holds [c, k_rope] (rank + rope_dim values per token and layer), and attention runs on
    it directly: q_nope is folded through k_b into the latent space, and the attended latent is
    expanded through v_b once per query (the weight absorption of the DeepSeek-V2 paper).
    q comes from q x, or through the low-rank q_b(q_a_norm(q_a x)) when q_lora_rank is set.
    rope_order: the rotary dims' order that makes the checkpoint's interleaved pairs
    (x0, x1), (x2, x3), ... rotate-half pairs, or None when they already are."""

    norm: np.ndarray  # attn_norm [hidden]
    q: Linear | None  # [heads * (nope + rope_dim), hidden], or None with q_a / q_b
    q_a: Linear | None  # [q_lora_rank, hidden]
    q_a_norm: np.ndarray | None  # [q_lora_rank]
    q_b: Linear | None  # [heads * (nope + rope_dim), q_lora_rank]
    kv_a: Linear  # [rank + rope_dim, hidden]
    kv_a_norm: np.ndarray  # [rank]
    k_b: np.ndarray  # float32 [heads, nope, rank] (a view of kv_b [heads, nope + v_dim, rank])
    v_b: np.ndarray  # float32 [heads, v_dim, rank]
    o: Linear  # [hidden, heads * v_dim]
    heads: int
    nope: int
    rope_dim: int
    scale: float  # the softmax scale of q . k
    rope_order: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.kv_a_norm.shape[0])

    def __call__(self, x: np.ndarray, rope: Rope, kv: KVCache, layer: int, start: int, eps: float) -> np.ndarray:
        """x [T, hidden] (after attn_norm) at positions start.. -> [T, hidden]; appends the
        tokens' latents to kv (a values=False cache of [S, 1, rank + rope_dim])."""
        T, H, n, r, rank = x.shape[0], self.heads, self.nope, self.rope_dim, self.rank
        if self.q is not None:
            q = self.q(x)
        else:
            assert self.q_a is not None and self.q_b is not None and self.q_a_norm is not None
            q = self.q_b(_core.rms_norm(self.q_a(x), self.q_a_norm, eps))
        q = q.reshape(T, H, n + r)
        latent = self.kv_a(x)  # [T, rank + r]
        q_rope, k_rope = q[:, :, n:], latent[:, None, rank:]
        if self.rope_order is not None:
            q_rope, k_rope = q_rope[..., self.rope_order], k_rope[..., self.rope_order]
        q_rope = rope(np.ascontiguousarray(q_rope, dtype=np.float32), start)  # [T, H, r]
        k_rope = rope(np.ascontiguousarray(k_rope, dtype=np.float32), start)  # [T, 1, r]
        entry = np.empty((T, 1, rank + r), np.float32)  # what the cache keeps per token
        entry[:, 0, :rank] = _core.rms_norm(np.ascontiguousarray(latent[:, :rank]), self.kv_a_norm, eps)
        entry[:, :, rank:] = k_rope
        cache, _ = kv.append(layer, entry, entry, start)  # [S, 1, rank + r]
        # q . k over the latent: (k_b[h]^T q_nope[h]) . c + q_rope[h] . k_rope
        q_lat = np.empty((T, H, rank + r), np.float32)
        q_lat[:, :, :rank] = np.matmul(q[:, :, :n].transpose(1, 0, 2), self.k_b).transpose(1, 0, 2)
        q_lat[:, :, rank:] = q_rope
        q_lat *= np.float32(self.scale * math.sqrt(rank + r))  # attention() scales by 1/sqrt(rank + r)
        # one key head for all query heads; the values are the latents' first `rank` values
        out = attention(q_lat, cache, cache, start, None).reshape(T, H, rank + r)[:, :, :rank]
        heads_out = np.matmul(out.transpose(1, 0, 2), self.v_b.transpose(0, 2, 1))  # [H, T, v_dim]
        return self.o(np.ascontiguousarray(heads_out.transpose(1, 0, 2).reshape(T, -1)))  # [T, hidden]


@dataclasses.dataclass
class DenseMLP:
    """SwiGLU: down(silu(gate x) * up x)."""

    gate: Linear
    up: Linear
    down: Linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.down(np.ascontiguousarray(silu(self.gate(x)) * self.up(x)))


@dataclasses.dataclass
class GateUpMLP:
    """SwiGLU whose gate and up projections are one matrix, gate rows first:
    down(silu(g) * u) with [g, u] = gate_up x (Granite's shared expert)."""

    gate_up: Linear  # [2I, hidden]
    down: Linear  # [hidden, I]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.gate_up(x)  # [T, 2I]
        i = y.shape[-1] // 2
        return self.down(np.ascontiguousarray(silu(y[:, :i]) * y[:, i:]))


@dataclasses.dataclass
class ReluMLP:
    """down(relu(up x)): the feed-forward of T5-style models (Switch Transformers' dense layers
    and, in the experts file, its experts)."""

    up: Linear
    down: Linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.down(np.ascontiguousarray(np.maximum(self.up(x), np.float32(0))))


@dataclasses.dataclass
class SharedExpert:
    """An expert every token runs (Qwen2-MoE), optionally scaled per token by
    sigmoid(sigmoid_gate x)."""

    mlp: DenseMLP | GateUpMLP
    sigmoid_gate: Linear | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.mlp(x)
        if self.sigmoid_gate is not None:
            out = out * (1.0 / (1.0 + np.exp(-self.sigmoid_gate(x))))
        return out


@dataclasses.dataclass
class MoE:
    """A routed feed-forward: the router's logits pick experts that live in the native
    expert cache (moe_forward); a shared expert, where there is one, is a backbone weight."""

    router: Linear
    shared: SharedExpert | None = None
    score_bias: np.ndarray | None = None  # [E] added to the scores that rank experts, not to their weights


@dataclasses.dataclass
class Layer:
    """Decoder layer `index`: pre-norm attention, then ffn_norm and either a dense MLP or an MoE."""

    index: int
    attn: Attention | LatentAttention
    ffn_norm: np.ndarray  # [hidden]
    mlp: DenseMLP | ReluMLP | None = None
    moe: MoE | None = None
    ffn_norm_bias: np.ndarray | None = None  # LayerNorm architectures
