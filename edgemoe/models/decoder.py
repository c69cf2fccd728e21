"""The pre-norm MoE decoder that every architecture file specialises.

An architecture subclasses `DecoderLM` and says what differs: its config class, its
routing (`route`), its q/k norm (`qk_norm`), extra weights of its MoE block
(`moe_block`), and whether the fused native decode step serves it (`fused_decode`).
The backbone's matmuls and small dense ops run in the native core (float32), with
numpy holding the arrays between them; routed experts run through `moe_forward`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .. import _core
from ..errors import ModelDirectoryError, UnsupportedConfigError
from ..format.safetensors import to_float32
from .blocks import (
    Attention,
    DenseMLP,
    KVCache,
    LatentAttention,
    Layer,
    Linear,
    MoE,
    Rope,
    RouteObserver,
    attention,
    layer_norm,
)

Tensors = dict[str, tuple[Any, str]]  # canonical name -> (array as stored, safetensors dtype)
MoEFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
    # the rope parameters of a scaled RoPE (rope_type in rope_types, not "default"), with the
    # context lengths it is computed from; None for the default RoPE
    rope_scaling: dict[str, Any] | None = None

    # the RoPE types this architecture's runtime implements (blocks.Rope)
    rope_types: ClassVar[tuple[str, ...]] = ("default",)
    # bytes a KV cache value takes with load's defaults: float16 (StreamOptions.kv_cache) where
    # the attention reads the cache natively, 4 where it reads it in numpy (kept float32)
    kv_value_bytes: ClassVar[int] = 2

    @staticmethod
    def _get(d: dict[str, Any], key: str, default: Any = dataclasses.MISSING) -> Any:
        if key in d and d[key] is not None:
            return d[key]
        if default is dataclasses.MISSING:
            raise ModelDirectoryError(f"the model config has no '{key}': the checkpoint's config.json is incomplete")
        return default

    @classmethod
    def _int(cls, d: dict[str, Any], key: str, default: Any = dataclasses.MISSING, least: int = 1) -> int:
        """d[key] as a whole number >= least (default when absent), or a named error."""
        v = cls._get(d, key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ModelDirectoryError(
                f"the model config's '{key}' is {_shown(v)}: expected a whole number >= {least}; "
                f"the checkpoint's config.json is damaged"
            )
        return v

    @classmethod
    def _float(cls, d: dict[str, Any], key: str, default: Any = dataclasses.MISSING) -> float:
        """d[key] as a finite number (default when absent), or a named error."""
        v = cls._get(d, key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ModelDirectoryError(
                f"the model config's '{key}' is {_shown(v)}: expected a number; the checkpoint's config.json is damaged"
            )
        return float(v)

    @classmethod
    def fields_from_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The shared fields from an HF config; keys they do not use are ignored. A field of
        the wrong type or out of range is a ModelDirectoryError naming it."""
        if not isinstance(d, dict):
            raise ModelDirectoryError(f"the model config is {_shown(d)}, not a JSON object: convert the model again")
        heads = cls._int(d, "num_attention_heads")
        hidden = cls._int(d, "hidden_size")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelDirectoryError(
                f"the model config's rope parameters are {_shown(rope)}: expected a JSON object; "
                f"the checkpoint's config.json is damaged"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(rope_type, str) or rope_type not in cls.rope_types:
            raise UnsupportedConfigError(
                f"rope type {_shown(rope_type)} is not supported yet for this architecture "
                f"(it runs {', '.join(cls.rope_types)})"
            )
        theta = cls._float({"rope_theta": rope.get("rope_theta", d.get("rope_theta"))}, "rope_theta", 10000.0)
        scaling = None
        if rope_type != "default":
            original = cls._int(rope, "original_max_position_embeddings", d.get("max_position_embeddings"))
            if rope.get("factor") is None:  # the factor the context was extended by
                factor = cls._int(d, "max_position_embeddings") / original
            else:
                factor = cls._float(rope, "factor")
            if factor <= 0:
                raise ModelDirectoryError(f"the model config's RoPE factor is {factor}: expected a number > 0")
            scaling = {**rope, "max_position_embeddings": d.get("max_position_embeddings")}
            scaling.update(original_max_position_embeddings=original, factor=factor)
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        layers = cls._int(d, "num_hidden_layers")
        layer_types = d.get("layer_types")
        if layer_types is not None and (
            not isinstance(layer_types, list)
            or len(layer_types) < layers
            or not all(isinstance(t, str) for t in layer_types)
        ):
            raise ModelDirectoryError(
                f"the model config's layer_types is {_shown(layer_types)}: expected a name per layer "
                f"({layers}); the checkpoint's config.json is damaged"
            )
        # Released Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
        experts = cls._int(d, "num_experts", d.get("num_local_experts"))
        top_k = cls._int(d, "num_experts_per_tok")
        if top_k > experts:
            raise ModelDirectoryError(
                f"the model config routes each token to {top_k} experts of {experts} (num_experts_per_tok): "
                f"the checkpoint's config.json is inconsistent"
            )
        return dict(
            vocab_size=cls._int(d, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cls._int(d, "num_key_value_heads", heads),
            head_dim=cls._int(d, "head_dim", max(1, hidden // heads)),
            num_experts=experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=cls._float(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=cls._int({"sliding_window": window}, "sliding_window") if window else None,
            layer_types=layer_types,
            norm_topk_prob=bool(cls._get(d, "norm_topk_prob", True)),
            rope_scaling=scaling,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        return cls(**cls.fields_from_dict(d))

    def kv_values_per_token(self) -> int:
        """Values the KV cache holds per token over all layers (DecoderLM.new_kv_cache)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def attention_values_per_token(self) -> int:
        """float32 values per prefilled token that one layer's attention holds besides q, k, v
        and the cache (runtime/memory.py); 0 for grouped-query attention."""
        return 0

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of this architecture's canonical per-layer tensors where they differ from
        grouped-query attention's or are its own (edgemoe.models.sizes sizes a config by them)."""
        return {}


def _shown(v: Any) -> str:
    """A config value in a message, cut short."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class Weights:
    """The backbone tensors a model is built from, by canonical name (docs/format.md)."""

    def __init__(self, tensors: Tensors):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def vec(self, name: str) -> np.ndarray:
        a, dt = self.tensors[name]
        return np.ascontiguousarray(to_float32(a, dt))

    def opt_vec(self, name: str) -> np.ndarray | None:
        return self.vec(name) if name in self.tensors else None

    def linear(self, name: str, bias: str | None = None) -> Linear:
        a, dt = self.tensors[name]
        return Linear(a, dt, self.opt_vec(bias) if bias else None)

    def opt_linear(self, name: str) -> Linear | None:
        return self.linear(name) if name in self.tensors else None


class DecoderLM:
    """Pre-norm decoder: attention (GQA, RoPE, optional q/k norm, biases and clipping) and a
    feed-forward that is a dense MLP or an MoE whose routed experts live in the native
    expert cache."""

    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig
    qk_norm: ClassVar[str | None] = None  # "per_head" (norm each head) or "full" (the whole projection)
    # True when every layer is MoE, route() is softmax + top-k and attention has no biases, q/k
    # norms or clipping: then one native call runs a whole layer for a decode token (native/layer.h)
    fused_decode: ClassVar[bool] = False
    # LayerNorm with a bias (attn_norm_bias, ffn_norm_bias, output_norm_bias) instead of RMSNorm (Phi-MoE)
    layer_norm: ClassVar[bool] = False
    # True for an encoder-decoder: start() encodes the prompt, forward() runs the decoder
    encoder_decoder: ClassVar[bool] = False

    def __init__(self, cfg: DecoderConfig, tensors: Tensors, cache: _core.ExpertCache, moe_layers: list[int]):
        self.cfg = cfg
        self.cache = cache
        self.moe_layers = set(moe_layers)
        self.observer: RouteObserver | None = None
        # replaces the routed experts' computation when set (importance profiling swaps one expert)
        self.moe_override: MoEFn | None = None
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # what new_kv_cache keeps keys and values as (StreamOptions.kv_cache); an attention
        # that reads its cache in numpy (multi-head latent attention, Switch) keeps float32
        self.kv_dtype: type = np.float32

        w = Weights(tensors)
        self.embed, self.embed_dtype = tensors["tok_embeddings"]
        self.out_norm = w.vec("output_norm")
        self.out_norm_bias = w.opt_vec("output_norm_bias")
        tied_head = Linear(self.embed, self.embed_dtype, w.opt_vec("output_bias"))
        self.lm_head = w.linear("output", "output_bias") if "output" in w else tied_head
        self.layers = [self.build_layer(w, i) for i in range(cfg.num_hidden_layers)]
        self.decode_layers = [self._decode_layer(L) for L in self.layers] if self.fused_decode else None

    # -- building ---------------------------------------------------------------
    def build_layer(self, w: Weights, i: int) -> Layer:
        p = f"layers.{i}."
        attn = self.build_attention(w, p, i)
        norm, bias = w.vec(p + "ffn_norm"), w.opt_vec(p + "ffn_norm_bias")
        if i in self.moe_layers:
            return Layer(i, attn, norm, moe=self.moe_block(w, p), ffn_norm_bias=bias)
        mlp = DenseMLP(w.linear(p + "ffn_gate"), w.linear(p + "ffn_up"), w.linear(p + "ffn_down"))
        return Layer(i, attn, norm, mlp=mlp, ffn_norm_bias=bias)

    def build_attention(self, w: Weights, p: str, i: int) -> Attention | LatentAttention:
        """Layer i's attention weights (prefix p = "layers.i."): grouped-query attention, or
        another attention block that self_attention runs."""
        types = self.cfg.layer_types
        return Attention(
            norm=w.vec(p + "attn_norm"),
            q=w.linear(p + "attn_q", p + "attn_q_bias"),
            k=w.linear(p + "attn_k", p + "attn_k_bias"),
            v=w.linear(p + "attn_v", p + "attn_v_bias"),
            o=w.linear(p + "attn_o", p + "attn_o_bias"),
            q_norm=w.opt_vec(p + "attn_q_norm") if self.qk_norm else None,
            k_norm=w.opt_vec(p + "attn_k_norm") if self.qk_norm else None,
            qk_norm=self.qk_norm,
            clip=self.clip_qkv(),
            window=self.cfg.sliding_window if types and types[i] == "sliding_attention" else None,
            scale=self.attention_scale(),
            norm_bias=w.opt_vec(p + "attn_norm_bias"),
            sinks=w.opt_vec(p + "attn_sinks"),
        )

    def moe_block(self, w: Weights, prefix: str) -> MoE:
        """The backbone part of an MoE layer (prefix "layers.N."): its router, and in
        architectures that have one, a shared expert."""
        return MoE(w.linear(prefix + "ffn_router"))

    def clip_qkv(self) -> float | None:
        return None

    def attention_scale(self) -> float | None:
        """The softmax scale of q . k when it is not 1/sqrt(head_dim), else None."""
        return None

    def normalize(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """The pre-norm of a block: RMSNorm with weight w, or LayerNorm (w, bias) when layer_norm."""
        if self.layer_norm:
            return layer_norm(x, w, bias, self.cfg.rms_norm_eps)
        return _core.rms_norm(x, w, self.cfg.rms_norm_eps)

    def _decode_layer(self, L: Layer) -> _core.DecodeLayer:
        """Layer L as one native decode step (native/layer.h); the architecture vouches, by
        fused_decode, that it has nothing that step does not do."""
        a, cfg = L.attn, self.cfg
        assert isinstance(a, Attention) and self.rope.attention_factor == 1.0 and self.rope.long is None
        plain = a.q_norm is None and a.clip is None and a.scale is None and a.sinks is None and not self.layer_norm
        assert L.moe is not None and L.moe.shared is None and plain, (
            f"fused_decode is declared but layer {L.index} has what the native decode step does not do"
        )
        lins = [a.q, a.k, a.v, a.o, L.moe.router]
        assert all(lin.bias is None for lin in lins), f"layer {L.index} has biases the native decode step lacks"
        q, k, v, o, router = [(lin.w, lin.kind) for lin in lins]
        return _core.DecodeLayer(
            L.index,
            q,
            k,
            v,
            o,
            router,
            a.norm,
            L.ffn_norm,
            self.rope.inv_freq,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.num_experts_per_tok,
            a.window or 0,
            cfg.rms_norm_eps,
            bool(cfg.norm_topk_prob),
        )

    # -- architecture hooks -------------------------------------------------------
    def run_text(self, ids: np.ndarray, kv: KVCache) -> None:
        """Route every token of a text through every MoE layer once, with kv fresh (routing
        traces, calibration): one forward pass here; an encoder-decoder encodes the text and
        decodes it back, teacher-forced."""
        self.forward(ids, kv, 0, all_logits=False)

    def start(self, ids: np.ndarray, kv: KVCache) -> np.ndarray:
        """The tokens forward() starts from for a prompt `ids`, with kv fresh: the prompt itself
        here; an encoder-decoder runs its encoder on the prompt into kv and returns the
        decoder's start tokens."""
        return ids

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids int32 [T, k], weights float32 [T, k]) from router logits [T, E] of the
        MoE layer `moe` (whose weights some routings read, e.g. a selection bias)."""
        raise NotImplementedError

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache this model's attention appends to (cfg.kv_values_per_token per
        token, as kv_dtype)."""
        cfg = self.cfg
        return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype=self.kv_dtype)

    # -- forward ------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(to_float32(self.embed[ids], self.embed_dtype))

    def self_attention(
        self, a: Attention | LatentAttention, x: np.ndarray, layer: int, kv: KVCache, start: int
    ) -> np.ndarray:
        """Attention of layer `layer` for x [T, hidden] (after attn_norm) at positions start..,
        appending to kv -> [T, hidden]: grouped-query attention here; an architecture with
        another attention block runs it in its own self_attention."""
        assert isinstance(a, Attention), "an architecture with another attention overrides self_attention"
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = a.qkv(x)  # [T, heads * hd], [T, kv_heads * hd] x2
        if a.qk_norm == "full":
            assert a.q_norm is not None and a.k_norm is not None  # qk_norm is set with its weights
            q, k = _core.rms_norm(q, a.q_norm, cfg.rms_norm_eps), _core.rms_norm(k, a.k_norm, cfg.rms_norm_eps)
        if a.clip is not None:
            c = a.clip
            q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
        q = q.reshape(T, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        if a.qk_norm == "per_head":
            assert a.q_norm is not None and a.k_norm is not None  # qk_norm is set with its weights
            q, k = _core.rms_norm(q, a.q_norm, cfg.rms_norm_eps), _core.rms_norm(k, a.k_norm, cfg.rms_norm_eps)
        q = self.rope(np.ascontiguousarray(q, dtype=np.float32), start)
        k = self.rope(np.ascontiguousarray(k, dtype=np.float32), start)
        if a.scale is not None:  # attention() scales by 1/sqrt(head_dim)
            q *= np.float32(a.scale * np.sqrt(cfg.head_dim))
        k_all, v_all = kv.append(layer, k, v, start)
        return a.o(attention(q, k_all, v_all, start, a.window, a.sinks))  # [T, hidden]

    def _ffn(self, L: Layer, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        if L.mlp is not None:
            return L.mlp(x)
        assert L.moe is not None
        ids, weights = self.route(L.moe.router(x), L.moe)  # ffn_moe_topk: [T, k]
        if self.observer is not None:
            self.observer.on_route(L.index, resid, ids, weights)
        moe = self.moe_override or self.moe
        out = moe(L.index, x, ids, weights)  # [T, hidden]
        if L.moe.shared is not None:
            out += L.moe.shared(x)
        return out

    def moe(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum [T, hidden] for x [T, hidden], ids/weights [T, k]."""
        return _core.moe_forward(self.cache, layer, x, ids, weights)

    def block(self, i: int, h: np.ndarray, kv: KVCache, start: int) -> np.ndarray:
        """Decoder layer i: residual stream h [T, hidden] at positions start.. -> [T, hidden]."""
        L = self.layers[i]
        a = L.attn
        h = h + self.self_attention(
            a, self.normalize(h, a.norm, a.norm_bias if isinstance(a, Attention) else None), i, kv, start
        )
        return h + self._ffn(L, self.normalize(h, L.ffn_norm, L.ffn_norm_bias), h)

    def _decode_native(self, h: np.ndarray, kv: KVCache, start: int) -> np.ndarray:
        """forward() for one token with no observer: one native call per layer, the same numbers
        as block() (tests/test_decode_layer.py). With a MoE computation installed (a cluster's),
        the native call stops before the experts and that computation takes them."""
        assert self.decode_layers is not None
        x = np.array(h[0], dtype=np.float32)  # [hidden], updated in place layer by layer
        moe = self.moe_override
        for i, layer in enumerate(self.decode_layers):
            kv.reserve(i, start, start + 1)
            if moe is None:
                layer.step(self.cache, x, kv.k[i], kv.v[i], start)
            else:
                xin, ids, weights = layer.attend(x, kv.k[i], kv.v[i], start)
                x += moe(self.layers[i].index, xin, ids, weights)[0]
        return self.head(x[None])

    def forward_batch(self, ids: np.ndarray, kvs: list[KVCache], starts: list[int]) -> np.ndarray:
        """One decode step of B sequences at once: token ids[b] at position starts[b] of the
        sequence whose cache is kvs[b] -> logits [B, vocab].

        Row b is bit for bit forward(ids[b:b+1], kvs[b], starts[b]): the backbone's matrices
        and attention run one row at a time through the one-token kernels (the multi-token
        kernels round x differently), and each MoE layer fetches every routed expert once for
        all the rows that chose it (moe_forward per_token), so the batch shares expert reads.
        A row whose token takes its sequence past LongRoPE's original context runs alone (its
        cached positions are computed again)."""
        B = len(ids)
        assert len(kvs) == B and len(starts) == B, "one KV cache and one position per sequence"
        if B == 1:
            return self.forward(ids, kvs[0], starts[0], all_logits=False)
        again = [b for b in range(B) if self.rope.recomputes(starts[b], 1)]
        if again:  # a sequence computed again (LongRoPE's switch) runs alone
            rest = [b for b in range(B) if b not in again]
            out = np.empty((B, self.cfg.vocab_size), np.float32)
            for b in again:
                out[b] = self.forward(ids[b : b + 1], kvs[b], starts[b], all_logits=False)[0]
            if rest:
                out[rest] = self.forward_batch(ids[rest], [kvs[b] for b in rest], [starts[b] for b in rest])
            return out
        eps, obs = self.cfg.rms_norm_eps, self.observer
        h = self.embed_tokens(ids)  # [B, hidden]
        for i, L in enumerate(self.layers):
            x = _core.rms_norm(h, L.attn.norm, eps)
            h = h + np.concatenate([self.self_attention(L.attn, x[b : b + 1], i, kvs[b], starts[b]) for b in range(B)])
            x = _core.rms_norm(h, L.ffn_norm, eps)
            h = h + self._ffn_rows(L, x, h)
            if obs is not None:
                obs.on_layer_out(i, h)
        for b, (kv, start) in enumerate(zip(kvs, starts)):
            self._advance(kv, ids[b : b + 1], start)
        return np.concatenate([self.head(h[b : b + 1]) for b in range(B)])  # [B, vocab]

    def _ffn_rows(self, L: Layer, x: np.ndarray, resid: np.ndarray) -> np.ndarray:
        """_ffn for rows of different sequences: each row's dense matrices alone, the routed
        experts once for the batch."""
        rows = range(x.shape[0])
        if L.mlp is not None:
            return np.concatenate([L.mlp(x[b : b + 1]) for b in rows])
        assert L.moe is not None
        router_logits = np.concatenate([L.moe.router(x[b : b + 1]) for b in rows])  # [B, E]
        ids, weights = self.route(router_logits, L.moe)  # ffn_moe_topk: [B, k]
        if self.observer is not None:
            self.observer.on_route(L.index, resid, ids, weights)
        if self.moe_override is not None:
            out = np.concatenate(
                [self.moe_override(L.index, x[b : b + 1], ids[b : b + 1], weights[b : b + 1]) for b in rows]
            )
        else:
            out = _core.moe_forward(self.cache, L.index, x, ids, weights, per_token=True)  # [B, hidden]
        if L.moe.shared is not None:
            out += np.concatenate([L.moe.shared(x[b : b + 1]) for b in rows])
        return out

    def head(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] from the last layer's output h [T, hidden]."""
        return self.lm_head(self.normalize(h, self.out_norm, self.out_norm_bias))

    def forward(self, ids: np.ndarray, kv: KVCache, start: int, all_logits: bool) -> np.ndarray:
        """Run T new tokens at positions start.. through the model, appending to kv.

        Returns logits [T, vocab] when all_logits, else [1, vocab] for the last token.
        """
        if self.rope.recomputes(start, len(ids)):
            return self._recompute(ids, kv, start, all_logits)
        h = self.embed_tokens(ids)  # [T, hidden]
        obs = self.observer
        if len(ids) == 1 and obs is None and self.decode_layers is not None:
            logits = self._decode_native(h, kv, start)
            self._advance(kv, ids, start)
            return logits
        for i in range(len(self.layers)):
            h = self.block(i, h, kv, start)
            if obs is not None:
                obs.on_layer_out(i, h)
        self._advance(kv, ids, start)
        return self.head(h if all_logits else h[-1:])

    def _advance(self, kv: KVCache, ids: np.ndarray, start: int) -> None:
        """kv now holds positions up to start + len(ids), and their tokens when it may need them again."""
        kv.length = start + len(ids)
        if self.rope.switch_at is not None:
            del kv.tokens[start:]
            kv.tokens.extend(int(t) for t in ids)

    def _recompute(self, ids: np.ndarray, kv: KVCache, start: int, all_logits: bool) -> np.ndarray:
        """forward() for new tokens that take the sequence past LongRoPE's original context: every
        position switches to the long factors, so the cached ones are computed again with the new
        (transformers' Phi-MoE drops its cache at that step too)."""
        assert len(kv.tokens) >= start, "the KV cache does not hold the tokens it was built from"
        everything = np.concatenate([np.asarray(kv.tokens[:start], dtype=np.int64), np.asarray(ids, np.int64)])
        kv.tokens.clear()
        logits = self.forward(everything, kv, 0, all_logits)  # [start + T or 1, vocab]
        return logits[start:] if all_logits else logits
