"""The decoder every supported architecture shares.

The backbone's matmuls and its small dense ops (RMSNorm, RoPE, attention over the
KV cache, softmax top-k routing) run in the native core (float32), with numpy
holding the arrays between them; routed experts run in the native core through
`moe_forward`. An architecture file supplies its config and
its routing; everything else is here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from .. import _core
from ..converters.safetensors_io import FLOAT_KIND
from ..converters.safetensors_io import to_float32 as to_f32


@dataclasses.dataclass
class DecoderConfig:
    """What the shared decoder needs, read from a Hugging Face config dict."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    norm_topk_prob: bool = True
    clip_qkv: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        """Build from an HF config; keys it does not use are ignored."""
        from ..errors import ModelDirectoryError

        def get(key: str, default: Any = dataclasses.MISSING) -> Any:
            if key in d and d[key] is not None:
                return d[key]
            if default is dataclasses.MISSING:
                raise ModelDirectoryError(f"the model config has no '{key}': the checkpoint's config.json is incomplete")
            return default

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope type '{rope_type}' is not supported yet (only the default RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        use_sw = d.get("use_sliding_window", True)
        window = d.get("sliding_window") if use_sw else None
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            # Released Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
            num_experts=int(get("num_experts", d.get("num_local_experts"))),
            num_experts_per_tok=int(get("num_experts_per_tok")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            layer_types=d.get("layer_types"),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            clip_qkv=d.get("clip_qkv"),
        )


class Linear:
    """y = x @ W.T (+ b), W read by the native core as stored: a float matrix (bf16/f16/f32)
    or, for a U8 tensor, a group-quantized QMatrix written by the converter (FORMAT.md)."""

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


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest per row, largest first: (ids int32 [T, k], values [T, k])."""
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(probs, ids, axis=-1)


def route_softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts, keep the top k (lower id first on a tie), optionally
    renormalize them to sum 1. Native; route_softmax_topk_reference is the same in numpy."""
    return _core.softmax_topk(logits, k, normalize)


def route_softmax_topk_reference(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    ids, w = top_k(softmax(logits), k)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, np.ascontiguousarray(w, dtype=np.float32)


class Rope:
    """Rotary embedding, half-split ("rotate_half") convention as in transformers."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = np.ascontiguousarray(
            1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)), dtype=np.float32)

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


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """attention() in numpy (tests)."""
    T, heads, hd = q.shape
    S, kv_heads, _ = k.shape
    rep = heads // kv_heads
    qg = q.reshape(T, kv_heads, rep, hd).transpose(1, 2, 0, 3)  # [kv, rep, T, hd]
    scores = np.matmul(qg, k.transpose(1, 2, 0)[:, None]) * (hd ** -0.5)  # [kv, rep, T, S]
    qpos = np.arange(start, start + T)[:, None]
    kpos = np.arange(S)[None, :]
    masked = kpos > qpos
    if window is not None:
        masked |= kpos <= qpos - window
    if masked.any():
        scores = np.where(masked, np.float32(-np.inf), scores)
    probs = softmax(scores)
    out = np.matmul(probs, v.transpose(1, 0, 2)[:, None])  # [kv, rep, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, heads * hd)


Router = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class RouteObserver:
    """Optional hooks on the forward pass (routing traces, predictive prefetch: see
    edgemoe/routing.py, edgemoe/predict.py). With none set the cost is one check per layer."""

    def on_route(self, layer: int, resid: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        """MoE layer `layer` has routed, its experts have not run yet. resid [T, hidden]:
        the residual stream at the MoE input (before ffn_norm); ids, weights [T, k]."""

    def on_layer_out(self, layer: int, h: np.ndarray) -> None:
        """Layer `layer` is done: h [T, hidden] is its output (the next layer's input)."""


class DecoderLM:
    """Pre-norm decoder: attention (GQA, RoPE, optional q/k norm and bias) and an
    MoE feed-forward whose routed experts live in the native expert cache.

    Architecture files subclass it and implement `route` (and, where the
    architecture has one, `shared_expert`).
    """

    def __init__(self, cfg: DecoderConfig, tensors: dict[str, tuple[np.ndarray, str]], cache: "_core.ExpertCache",
                 moe_layers: list[int]):
        self.cfg = cfg
        self.cache = cache
        self.moe_layers = set(moe_layers)
        self.observer: RouteObserver | None = None
        self.rope = Rope(cfg.head_dim, cfg.rope_theta)
        self._t = tensors

        emb, emb_dtype = tensors["tok_embeddings"]
        self.embed_dtype = emb_dtype
        self.embed = emb
        self.out_norm = self.vec("output_norm")
        self.lm_head = self.linear("output") if "output" in tensors else Linear(emb, emb_dtype)
        self.layers = [self._layer(i) for i in range(cfg.num_hidden_layers)]
        del self._t
        # one native call per layer for a decode token where every layer allows it (_decode_layer)
        fused = [self._decode_layer(i) for i in range(cfg.num_hidden_layers)]
        self.decode_layers: list[Any] | None = fused if all(f is not None for f in fused) else None

    # -- weights --------------------------------------------------------------
    def vec(self, name: str) -> np.ndarray:
        a, dt = self._t[name]
        return np.ascontiguousarray(to_f32(a, dt))

    def opt_vec(self, name: str) -> np.ndarray | None:
        return self.vec(name) if name in self._t else None

    def linear(self, name: str, bias: str | None = None) -> Linear:
        a, dt = self._t[name]
        return Linear(a, dt, self.opt_vec(bias) if bias else None)

    def _layer(self, i: int) -> dict[str, Any]:
        p = f"layers.{i}."
        L: dict[str, Any] = {
            "attn_norm": self.vec(p + "attn_norm"),
            "q": self.linear(p + "attn_q", p + "attn_q_bias"),
            "k": self.linear(p + "attn_k", p + "attn_k_bias"),
            "v": self.linear(p + "attn_v", p + "attn_v_bias"),
            "o": self.linear(p + "attn_o", p + "attn_o_bias"),
            "q_norm": self.opt_vec(p + "attn_q_norm"),
            "k_norm": self.opt_vec(p + "attn_k_norm"),
            "ffn_norm": self.vec(p + "ffn_norm"),
        }
        L["qkv"] = LinearGroup(L["q"], L["k"], L["v"])
        types = self.cfg.layer_types
        L["window"] = self.cfg.sliding_window if types and types[i] == "sliding_attention" else None
        if i in self.moe_layers:
            L["router"] = self.linear(p + "ffn_router")
            if p + "ffn_shared_gate" in self._t:
                L["shared"] = (self.linear(p + "ffn_shared_gate"), self.linear(p + "ffn_shared_up"),
                               self.linear(p + "ffn_shared_down"))
                L["shared_router"] = self.linear(p + "ffn_shared_router") if p + "ffn_shared_router" in self._t else None
        else:
            L["mlp"] = (self.linear(p + "ffn_gate"), self.linear(p + "ffn_up"), self.linear(p + "ffn_down"))
        return L

    def _decode_layer(self, i: int) -> "_core.DecodeLayer | None":
        """Layer i as one native decode step (native/layer.h), or None where it has what that
        step does not do: a dense MLP, biases, q/k norms, qkv clipping, a shared expert, or a
        routing other than softmax + top-k."""
        L, cfg = self.layers[i], self.cfg
        if i not in self.moe_layers or "shared" in L or cfg.clip_qkv is not None:
            return None
        if L["q_norm"] is not None or L["k_norm"] is not None:
            return None
        if type(self).route_is_softmax_topk is not True:
            return None
        lins = [L[n] for n in ("q", "k", "v", "o", "router")]
        if any(lin.bias is not None for lin in lins):
            return None
        return _core.DecodeLayer(i, *[(lin.w, lin.kind) for lin in lins], L["attn_norm"], L["ffn_norm"],
                                 self.rope.inv_freq, cfg.num_attention_heads, cfg.num_key_value_heads,
                                 cfg.head_dim, cfg.num_experts_per_tok, L["window"] or 0, cfg.rms_norm_eps,
                                 bool(cfg.norm_topk_prob))

    # -- architecture hooks ---------------------------------------------------
    # True when route() is route_softmax_topk(logits, num_experts_per_tok, cfg.norm_topk_prob),
    # which the native decode step does itself.
    route_is_softmax_topk = False

    def route(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids int32 [T, k], weights float32 [T, k]) from router logits [T, E]."""
        raise NotImplementedError

    # -- forward --------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(to_f32(self.embed[ids], self.embed_dtype))

    def _attention(self, L: dict[str, Any], x: np.ndarray, layer: int, kv: KVCache, start: int) -> np.ndarray:
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = L["qkv"](x)
        qn, kn = L["q_norm"], L["k_norm"]
        if qn is not None and qn.shape[0] != cfg.head_dim:  # OLMoE: norm over the whole projection
            q, k = _core.rms_norm(q, qn, cfg.rms_norm_eps), _core.rms_norm(k, kn, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
        q = q.reshape(T, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        if qn is not None and qn.shape[0] == cfg.head_dim:  # Qwen3: norm per head
            q, k = _core.rms_norm(q, qn, cfg.rms_norm_eps), _core.rms_norm(k, kn, cfg.rms_norm_eps)
        q = self.rope(np.ascontiguousarray(q, dtype=np.float32), start)
        k = self.rope(np.ascontiguousarray(k, dtype=np.float32), start)
        k_all, v_all = kv.append(layer, k, v, start)
        out = attention(q, k_all, v_all, start, L["window"])  # [T, heads * hd]
        return L["o"](out)

    @staticmethod
    def _mlp(mats: tuple[Linear, Linear, Linear], x: np.ndarray) -> np.ndarray:
        gate, up, down = mats
        return down(np.ascontiguousarray(silu(gate(x)) * up(x)))

    def _ffn(self, L: dict[str, Any], x: np.ndarray, layer: int, resid: np.ndarray | None = None) -> np.ndarray:
        if "mlp" in L:
            return self._mlp(L["mlp"], x)
        ids, weights = self.route(L["router"](x))  # ffn_moe_topk: [T, k]
        if self.observer is not None:
            self.observer.on_route(layer, resid, ids, weights)
        out = self.moe(layer, x, ids, weights)  # [T, hidden]
        if "shared" in L:
            shared = self._mlp(L["shared"], x)
            if L["shared_router"] is not None:
                shared = shared * (1.0 / (1.0 + np.exp(-L["shared_router"](x))))
            out += shared
        return out

    def moe(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum [T, hidden] for x [T, hidden], ids/weights [T, k].
        One method so a caller can swap it per instance (importance profiling does)."""
        return _core.moe_forward(self.cache, layer, x, ids, weights)

    def block(self, i: int, h: np.ndarray, kv: KVCache, start: int) -> np.ndarray:
        """Decoder layer i: residual stream h [T, hidden] at positions start.. -> [T, hidden]."""
        L, eps = self.layers[i], self.cfg.rms_norm_eps
        h = h + self._attention(L, _core.rms_norm(h, L["attn_norm"], eps), i, kv, start)
        return h + self._ffn(L, _core.rms_norm(h, L["ffn_norm"], eps), i, h)

    def _decode_native(self, h: np.ndarray, kv: KVCache, start: int) -> np.ndarray:
        """forward() for one token with no observer: one native call per layer, the same numbers
        as block() (tests/test_decode_layer.py)."""
        x = np.array(h[0], dtype=np.float32)  # [hidden], updated in place layer by layer
        for i, layer in enumerate(self.decode_layers):
            kv.reserve(i, start, start + 1)
            layer.step(self.cache, x, kv.k[i], kv.v[i], start)
        kv.length = start + 1
        return self.head(x[None])

    def head(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] from the last layer's output h [T, hidden]."""
        return self.lm_head(_core.rms_norm(h, self.out_norm, self.cfg.rms_norm_eps))

    def forward(self, ids: np.ndarray, kv: KVCache, start: int, all_logits: bool) -> np.ndarray:
        """Run T new tokens at positions start.. through the model, appending to kv.

        Returns logits [T, vocab] when all_logits, else [1, vocab] for the last token.
        """
        h = self.embed_tokens(ids)  # [T, hidden]
        obs = self.observer
        if len(ids) == 1 and obs is None and self.decode_layers is not None and "moe" not in vars(self):
            return self._decode_native(h, kv, start)
        for i in range(len(self.layers)):
            h = self.block(i, h, kv, start)
            if obs is not None:
                obs.on_layer_out(i, h)
        kv.length = start + len(ids)
        return self.head(h if all_logits else h[-1:])
