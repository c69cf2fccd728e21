"""Typed building blocks every architecture is made of.

Numeric pieces (Linear over float or quantized weights, RoPE, the KV cache, attention,
softmax top-k routing) run in the native core; the weight groups (Attention, DenseMLP,
SharedExpert, MoE, Layer) say what one decoder layer holds. Architecture files combine
them; edgemoe/models/decoder.py runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .. import _core
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


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def route_softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts, keep the top k (lower id first on a tie), optionally
    renormalize them to sum 1 (native). logits [T, E] -> (ids int32 [T, k], weights float32 [T, k])."""
    return _core.softmax_topk(logits, k, normalize)


class Rope:
    """Rotary embedding, half-split ("rotate_half") convention as in transformers."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = np.ascontiguousarray(
            1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)), dtype=np.float32
        )

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        """x [T, heads, head_dim] float32 at positions start..start+T-1, rotated in place."""
        _core.rope(x, start, self.inv_freq)
        return x


class KVCache:
    """Keys and values per layer, grown in chunks so decode appends in place."""

    CHUNK = 256

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int):
        self.k: list[np.ndarray] = [np.empty((0, kv_heads, head_dim), np.float32)] * num_layers
        self.v: list[np.ndarray] = [np.empty((0, kv_heads, head_dim), np.float32)] * num_layers
        self.length = 0
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def reserve(self, layer: int, start: int, end: int) -> None:
        """Room for positions up to `end` in layer's arrays, keeping positions before `start`."""
        if end > self.k[layer].shape[0]:
            cap = ((end + self.CHUNK - 1) // self.CHUNK) * self.CHUNK
            for store in (self.k, self.v):
                grown = np.empty((cap, self.kv_heads, self.head_dim), np.float32)
                grown[:start] = store[layer][:start]
                store[layer] = grown

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        end = start + k.shape[0]
        self.reserve(layer, start, end)
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v
        return self.k[layer][:end], self.v[layer][:end]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """Causal grouped-query attention of T new queries against all cached keys (native).

    q [T, heads, hd] at positions start..start+T-1; k, v [S, kv_heads, hd] with S = start+T.
    Returns [T, heads*hd].
    """
    return _core.attention(q, k, v, start, window or 0)


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
    window: a sliding window in tokens, or None."""

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

    def __post_init__(self) -> None:
        self.qkv = LinearGroup(self.q, self.k, self.v)


@dataclasses.dataclass
class DenseMLP:
    """SwiGLU: down(silu(gate x) * up x)."""

    gate: Linear
    up: Linear
    down: Linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.down(np.ascontiguousarray(silu(self.gate(x)) * self.up(x)))


@dataclasses.dataclass
class SharedExpert:
    """An expert every token runs (Qwen2-MoE), optionally scaled per token by
    sigmoid(sigmoid_gate x)."""

    mlp: DenseMLP
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


@dataclasses.dataclass
class Layer:
    """Decoder layer `index`: pre-norm attention, then ffn_norm and either a dense MLP or an MoE."""

    index: int
    attn: Attention
    ffn_norm: np.ndarray  # [hidden]
    mlp: DenseMLP | None = None
    moe: MoE | None = None
