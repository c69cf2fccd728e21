"""Switch Transformers (transformers' SwitchTransformersForConditionalGeneration): a T5-style
encoder-decoder whose feed-forward is, every encoder/decoder_sparse_step blocks, a top-1 routed
MoE of ReLU experts (down(relu(up x)), two matrices per expert blob).

One layer numbering for both stacks: encoder blocks are layers 0..Le-1, decoder blocks
Le..Le+Ld-1. Canonical names, the experts file and the expert cache use it, so encoder and
decoder experts stream from one file under one budget. Attention is T5's: no 1/sqrt(d) scaling,
a learned relative position bias per head (shared by the blocks of a stack, bidirectional in the
encoder, causal in the decoder), and, in the decoder, cross-attention to the encoder's output,
whose keys and values are computed once per prompt and kept in the cache (CrossKVCache).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import numpy as np

from .. import _core
from ..format.safetensors import to_float32
from .blocks import Attention, KVCache, Layer, MoE, ReluMLP
from .checkpoint import CheckpointLayout
from .decoder import DecoderConfig, DecoderLM, Tensors, Weights

_SELF_ATTENTION = {
    "layer.0.layer_norm.weight": "attn_norm",
    "layer.0.SelfAttention.q.weight": "attn_q",
    "layer.0.SelfAttention.k.weight": "attn_k",
    "layer.0.SelfAttention.v.weight": "attn_v",
    "layer.0.SelfAttention.o.weight": "attn_o",
}
_CROSS_ATTENTION = {
    "layer.1.layer_norm.weight": "cross_norm",
    "layer.1.EncDecAttention.q.weight": "cross_q",
    "layer.1.EncDecAttention.k.weight": "cross_k",
    "layer.1.EncDecAttention.v.weight": "cross_v",
    "layer.1.EncDecAttention.o.weight": "cross_o",
}


def _ffn(n: int) -> dict[str, str]:  # the feed-forward sublayer, layer.n of a block
    return {
        f"layer.{n}.layer_norm.weight": "ffn_norm",
        f"layer.{n}.mlp.wi.weight": "ffn_up",
        f"layer.{n}.mlp.wo.weight": "ffn_down",
        f"layer.{n}.mlp.router.classifier.weight": "ffn_router",
        f"layer.{n}.mlp.router.classifier.bias": "ffn_router_bias",
    }


# the name within a block, prefixed by its stack -> canonical name after "layers.L."
LAYER_TENSORS = {
    **{f"encoder.{k}": v for k, v in {**_SELF_ATTENTION, **_ffn(1)}.items()},
    **{f"decoder.{k}": v for k, v in {**_SELF_ATTENTION, **_CROSS_ATTENTION, **_ffn(2)}.items()},
}
_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(?:encoder\.layer\.1|decoder\.layer\.2)\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"  # in each stack's block 0 only


def stack_sizes(config: dict[str, Any]) -> tuple[int, int]:
    """(encoder blocks, decoder blocks) of a Switch config."""
    enc = int(config["num_layers"])
    return enc, int(config.get("num_decoder_layers") or enc)


def sparse_steps(config: dict[str, Any]) -> tuple[int, int]:
    """(encoder, decoder) sparse steps: the config's, or what transformers derives from the
    number of sparse layers when they are absent."""
    enc, dec = stack_sizes(config)
    out = []
    for n, step_key, count_key in (
        (enc, "encoder_sparse_step", "num_sparse_encoder_layers"),
        (dec, "decoder_sparse_step", "num_sparse_decoder_layers"),
    ):
        if config.get(step_key) is not None:
            out.append(int(config[step_key]))
        else:
            count = int(config.get(count_key, 3))
            out.append(n // count if count > 0 else n)
    return out[0], out[1]


def _sparse(i: int, step: int) -> bool:
    """Whether block i of a stack is an MoE block (transformers' rule: i % step == 1, or every block at step 1)."""
    return step > 0 and (step == 1 or i % step == 1)


class Layout(CheckpointLayout):
    """Switch checkpoints name tensors by stack and block (`encoder.block.N.layer.M.*`); edgemoe
    numbers the decoder's blocks after the encoder's."""

    def locate(self, name: str, config: dict[str, Any]) -> tuple[int, str] | None:
        m = _BLOCK.match(name)
        if not m:
            return None
        stack, block = m.group(1), int(m.group(2))
        return (block if stack == "encoder" else stack_sizes(config)[0] + block), f"{stack}.{m.group(3)}"

    def hf_layer_name(self, layer: int, rest: str, config: dict[str, Any]) -> str:
        enc = stack_sizes(config)[0]
        stack, inner = rest.split(".", 1)
        return f"{stack}.block.{layer if layer < enc else layer - enc}.{inner}"

    def match_expert(self, rest: str) -> tuple[int, str] | None:
        m = _EXPERT.match(rest)
        return (int(m.group(1)), m.group(2)) if m else None

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", True))  # transformers' default for Switch

    def required_globals(self, config: dict[str, Any]) -> list[str]:
        names = ["tok_embeddings", "enc_output_norm", "output_norm", "enc_rel_bias", "dec_rel_bias"]
        return names + ([] if self.tied(config) else ["output", "enc_tok_embeddings", "dec_tok_embeddings"])

    def num_layers(self, config: dict[str, Any]) -> int:
        return sum(stack_sizes(config))

    def top_k(self, config: dict[str, Any], name: str) -> int:
        return 1  # Switch routing is top-1

    def moe_layers(self, config: dict[str, Any], name: str) -> list[int]:
        enc, dec = stack_sizes(config)
        enc_step, dec_step = sparse_steps(config)
        return [i for i in range(enc) if _sparse(i, enc_step)] + [enc + i for i in range(dec) if _sparse(i, dec_step)]

    def layer_tensor_names(self, config: dict[str, Any], moe: bool, layer: int = 0) -> list[str]:
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_o"]
        if layer >= stack_sizes(config)[0]:
            names += ["cross_norm", "cross_q", "cross_k", "cross_v", "cross_o"]
        names.append("ffn_norm")
        if not moe:
            return names + ["ffn_up", "ffn_down"]
        return names + ["ffn_router"] + (["ffn_router_bias"] if config.get("router_bias") else [])


LAYOUT = Layout(
    layer_tensors=LAYER_TENSORS,
    expert_roles={"wi": "up", "wo": "down"},
    intermediate_key="d_ff",
    num_experts_keys=("num_experts",),
    global_tensors={
        "shared.weight": "tok_embeddings",
        # untied, transformers 5 keeps each stack's own embedding table besides the shared one
        "encoder.embed_tokens.weight": "enc_tok_embeddings",
        "decoder.embed_tokens.weight": "dec_tok_embeddings",
        "encoder.final_layer_norm.weight": "enc_output_norm",
        "decoder.final_layer_norm.weight": "output_norm",
        "lm_head.weight": "output",
        f"encoder.block.0.{_BIAS}": "enc_rel_bias",
        f"decoder.block.0.{_BIAS}": "dec_rel_bias",
    },
    glu=False,
    num_layers_key="num_layers",
    hidden_key="d_model",
)


@dataclasses.dataclass
class Config(DecoderConfig):
    """Switch's config.json keys (d_model, num_heads, d_kv, d_ff, num_layers, ...) as the shared
    fields, plus the encoder-decoder's own. num_hidden_layers counts both stacks."""

    kv_value_bytes: ClassVar[int] = 4  # its attention reads the cache in numpy: float32

    encoder_layers: int = 0
    decoder_layers: int = 0
    d_ff: int = 0
    expert_capacity: int = 0  # tokens one expert takes per call; later ones skip the layer's MoE
    relative_buckets: int = 32
    relative_max_distance: int = 128
    decoder_start_token_id: int = 0
    router_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        get = cls._get
        act = d.get("dense_act_fn", "relu")
        if act != "relu":
            raise NotImplementedError(f"Switch feed-forward activation {act!r} is not supported (edgemoe runs 'relu')")
        enc, dec = stack_sizes({"num_layers": get(d, "num_layers"), **d})
        heads = int(get(d, "num_heads"))
        start = d.get("decoder_start_token_id")
        return cls(
            vocab_size=int(get(d, "vocab_size")),
            hidden_size=int(get(d, "d_model")),
            num_hidden_layers=enc + dec,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=int(get(d, "d_kv")),
            num_experts=int(get(d, "num_experts")),
            num_experts_per_tok=1,
            rms_norm_eps=float(get(d, "layer_norm_epsilon", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            norm_topk_prob=False,
            encoder_layers=enc,
            decoder_layers=dec,
            d_ff=int(get(d, "d_ff")),
            expert_capacity=int(get(d, "expert_capacity", 64)),
            relative_buckets=int(get(d, "relative_attention_num_buckets", 32)),
            relative_max_distance=int(get(d, "relative_attention_max_distance", 128)),
            decoder_start_token_id=int(start if start is not None else get(d, "pad_token_id", 0)),
            router_bias=bool(d.get("router_bias", False)),
        )

    def kv_values_per_token(self) -> int:
        """Per token of context (prompt or generated): a decoder token's self-attention keys and
        values, or a prompt token's cross-attention keys and values, in every decoder block."""
        return 2 * self.decoder_layers * self.num_attention_heads * self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        H, inner = self.hidden_size, self.num_attention_heads * self.head_dim
        return {
            "cross_norm": (H,),
            "cross_q": (inner, H),
            "cross_k": (inner, H),
            "cross_v": (inner, H),
            "cross_o": (H, inner),
            "ffn_up": (self.d_ff, H),
            "ffn_down": (H, self.d_ff),
            "ffn_router_bias": (self.num_experts,),
            "enc_output_norm": (H,),
            "enc_tok_embeddings": (self.vocab_size, H),
            "dec_tok_embeddings": (self.vocab_size, H),
            "enc_rel_bias": (self.relative_buckets, self.num_attention_heads),
            "dec_rel_bias": (self.relative_buckets, self.num_attention_heads),
        }


def relative_buckets(relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of each relative position (key position - query position): exact for small
    distances, logarithmic up to max_distance, one bucket beyond; the encoder's split by sign.
    float32 as transformers computes it, so the buckets are the same at the boundaries."""
    buckets = np.zeros(relative.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    exact = num_buckets // 2
    ratio = np.maximum(distance, exact).astype(np.float32) / np.float32(exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(num_buckets - exact)
    large = np.minimum(exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(distance < exact, distance, large)


class CrossKVCache(KVCache):
    """The decoder's self-attention cache (one entry per decoder block) and its cross-attention
    keys and values over the encoded prompt [S, heads, head_dim], set once per prompt."""

    def __init__(self, num_layers: int, heads: int, head_dim: int):
        super().__init__(num_layers, heads, head_dim)
        self.cross_k: list[np.ndarray] = []
        self.cross_v: list[np.ndarray] = []

    def nbytes(self) -> int:
        return super().nbytes() + sum(a.nbytes for a in self.cross_k + self.cross_v)


@dataclasses.dataclass
class Block(Layer):
    """A Switch block: self-attention, cross-attention in the decoder, then a dense ReLU MLP or an MoE."""

    cross: Attention | None = None


def t5_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """q [T, heads, d], k/v [S, heads, d], bias [heads, T, S] (position bias and mask) or None
    -> [T, heads * d]: softmax(q k^T + bias) v with no 1/sqrt(d) scaling (T5 folds it into q)."""
    scores = np.matmul(q.transpose(1, 0, 2), k.transpose(1, 2, 0))  # [heads, T, S]
    if bias is not None:
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, v.transpose(1, 0, 2))  # [heads, T, d]
    return np.ascontiguousarray(out.transpose(1, 0, 2).reshape(q.shape[0], -1), dtype=np.float32)


class Model(DecoderLM):
    config_class = Config
    encoder_decoder = True
    cfg: Config

    def __init__(self, cfg: DecoderConfig, tensors: Tensors, cache: _core.ExpertCache, moe_layers: list[int]):
        assert isinstance(cfg, Config)
        self.cfg = cfg
        self.cache = cache
        self.moe_layers = set(moe_layers)
        self.observer = None
        self.moe_override = None
        self.decode_layers = None
        w = Weights(tensors)
        # each stack reads its own table where the checkpoint has one (untied), else the shared one
        self.enc_embed, self.enc_embed_dtype = tensors.get("enc_tok_embeddings", tensors["tok_embeddings"])
        self.embed, self.embed_dtype = tensors.get("dec_tok_embeddings", tensors["tok_embeddings"])
        self.enc_out_norm = w.vec("enc_output_norm")
        self.out_norm = w.vec("output_norm")
        self.enc_bias, self.dec_bias = w.vec("enc_rel_bias"), w.vec("dec_rel_bias")  # [buckets, heads]
        self.lm_head = w.linear("output") if "output" in w else w.linear("tok_embeddings")
        self.layers: list[Layer] = [self.build_layer(w, i) for i in range(cfg.num_hidden_layers)]

    def build_layer(self, w: Weights, i: int) -> Layer:
        p = f"layers.{i}."

        def attention(prefix: str) -> Attention:
            return Attention(
                norm=w.vec(p + prefix + "_norm"),
                q=w.linear(p + prefix + "_q"),
                k=w.linear(p + prefix + "_k"),
                v=w.linear(p + prefix + "_v"),
                o=w.linear(p + prefix + "_o"),
            )

        cross = attention("cross") if i >= self.cfg.encoder_layers else None
        if i in self.moe_layers:
            moe = MoE(w.linear(p + "ffn_router", p + "ffn_router_bias" if self.cfg.router_bias else None))
            return Block(i, attention("attn"), w.vec(p + "ffn_norm"), moe=moe, cross=cross)
        mlp = ReluMLP(w.linear(p + "ffn_up"), w.linear(p + "ffn_down"))
        return Block(i, attention("attn"), w.vec(p + "ffn_norm"), mlp=mlp, cross=cross)

    def route(self, router_logits: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 of the softmax, weighted by its probability. An expert takes at most
        expert_capacity tokens of one call, in order; the tokens past it get weight 0 (the layer
        adds nothing to them), as transformers' router drops them."""
        logits = router_logits.astype(np.float32)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ids = probs.argmax(axis=-1)  # ffn_moe_topk: [T]
        weights = probs[np.arange(len(ids)), ids]
        onehot = ids[:, None] == np.arange(probs.shape[1])[None, :]
        priority = np.cumsum(onehot, axis=0)[np.arange(len(ids)), ids]  # 1-based rank of each token at its expert
        weights = np.where(priority <= self.cfg.expert_capacity, weights, np.float32(0))
        return ids.astype(np.int32)[:, None], weights.astype(np.float32)[:, None]

    def new_kv_cache(self) -> CrossKVCache:
        cfg = self.cfg
        return CrossKVCache(cfg.decoder_layers, cfg.num_attention_heads, cfg.head_dim)

    # -- forward ------------------------------------------------------------------
    def position_bias(self, table: np.ndarray, start: int, T: int, S: int, causal: bool) -> np.ndarray:
        """[heads, T, S] bias of queries at positions start.. over keys 0..S-1: the relative position
        table's values, and -inf past each query in the decoder."""
        relative = np.arange(S)[None, :] - (start + np.arange(T))[:, None]
        cfg = self.cfg
        buckets = relative_buckets(relative, not causal, cfg.relative_buckets, cfg.relative_max_distance)
        bias = np.ascontiguousarray(table[buckets].transpose(2, 0, 1))  # [heads, T, S]
        if causal:
            bias[:, relative > 0] = -np.inf
        return bias

    def _self_attention(self, a: Attention, x: np.ndarray, bias: np.ndarray, kv: KVCache | None, j: int, start: int):
        T, heads, hd = x.shape[0], self.cfg.num_attention_heads, self.cfg.head_dim
        q, k, v = (y.reshape(T, heads, hd) for y in a.qkv(x))
        if kv is not None:
            k, v = kv.append(j, np.ascontiguousarray(k), np.ascontiguousarray(v), start)
        return a.o(t5_attention(q, k, v, bias))

    def _ffn_block(self, L: Layer, h: np.ndarray) -> np.ndarray:
        return h + self._ffn(L, _core.rms_norm(h, L.ffn_norm, self.cfg.rms_norm_eps), h)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """The encoder's output [T, hidden] (after its final norm) for prompt ids [T]."""
        cfg, T = self.cfg, len(ids)
        h = np.ascontiguousarray(to_float32(self.enc_embed[ids], self.enc_embed_dtype))
        bias = self.position_bias(self.enc_bias, 0, T, T, causal=False)
        for i in range(cfg.encoder_layers):
            L = self.layers[i]
            assert isinstance(L.attn, Attention)
            h = h + self._self_attention(L.attn, _core.rms_norm(h, L.attn.norm, cfg.rms_norm_eps), bias, None, i, 0)
            h = self._ffn_block(L, h)
            if self.observer is not None:
                self.observer.on_layer_out(i, h)
        return _core.rms_norm(h, self.enc_out_norm, cfg.rms_norm_eps)

    def start(self, ids: np.ndarray, kv: KVCache) -> np.ndarray:
        """Encode the prompt once, keep every decoder block's cross-attention keys and values in
        kv, and start the decoder from decoder_start_token_id."""
        assert isinstance(kv, CrossKVCache)
        enc = self.encode(ids)
        S, heads, hd = enc.shape[0], self.cfg.num_attention_heads, self.cfg.head_dim
        kv.cross_k, kv.cross_v = [], []
        for L in self.layers[self.cfg.encoder_layers :]:
            assert isinstance(L, Block) and L.cross is not None
            kv.cross_k.append(L.cross.k(enc).reshape(S, heads, hd))
            kv.cross_v.append(L.cross.v(enc).reshape(S, heads, hd))
        return np.array([self.cfg.decoder_start_token_id], dtype=np.int64)

    def run_text(self, ids: np.ndarray, kv: KVCache) -> None:
        """The encoder over the text, then the decoder over it shifted right (decoder start token
        first): each token passes every encoder and every decoder MoE layer once."""
        first = self.start(ids, kv)
        self.forward(np.concatenate([first, ids[:-1]]), kv, 0, all_logits=False)

    def forward(self, ids: np.ndarray, kv: KVCache, start: int, all_logits: bool) -> np.ndarray:
        """Decoder tokens ids [T] at positions start.. (after start() filled kv's cross-attention)
        -> logits [T, vocab], or [1, vocab] for the last token."""
        assert isinstance(kv, CrossKVCache) and len(kv.cross_k) == self.cfg.decoder_layers, "start() comes first"
        cfg, T = self.cfg, len(ids)
        eps, heads, hd = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.head_dim
        h = self.embed_tokens(ids)
        bias = self.position_bias(self.dec_bias, start, T, start + T, causal=True)
        for j in range(cfg.decoder_layers):
            i = cfg.encoder_layers + j
            L = self.layers[i]
            assert isinstance(L, Block) and L.cross is not None and isinstance(L.attn, Attention)
            h = h + self._self_attention(L.attn, _core.rms_norm(h, L.attn.norm, eps), bias, kv, j, start)
            q = L.cross.q(_core.rms_norm(h, L.cross.norm, eps)).reshape(T, heads, hd)
            h = h + L.cross.o(t5_attention(q, kv.cross_k[j], kv.cross_v[j], None))
            h = self._ffn_block(L, h)
            if self.observer is not None:
                self.observer.on_layer_out(i, h)
        kv.length = start + T
        return self.head(h if all_logits else h[-1:])

    def head(self, h: np.ndarray) -> np.ndarray:
        x = _core.rms_norm(h, self.out_norm, self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:  # the shared table as the head: T5 scales the input by d_model^-0.5
            x = x * np.float32(self.cfg.hidden_size**-0.5)
        return self.lm_head(np.ascontiguousarray(x, dtype=np.float32))
