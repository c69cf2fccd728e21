"""Export the dense backbone as ONNX graphs, the way a converter would: from weights, no torch.

One graph per decoder layer holds its attention block and its router, because the
routed experts (native core) must run between layers; one more graph holds the final
norm and the lm_head. Used by tools/bench_backbone.py to compare onnxruntime against
edgemoe's native backbone.

Layer graph contract (decode, one token):
  inputs   hidden [1, H] f32, past_key / past_value [S, kv, hd] f32, position [1] int64
  outputs  hidden_out [1, H]      hidden + o(attention)      (the attention residual)
           ffn_input [1, H]       rms_norm(hidden_out, ffn_norm), what the experts read
           router_logits [1, E]
           key / value [1, kv, hd] this token's K (RoPE applied) and V; the caller
                                   writes them into its own cache at row S
Returning only the new rows, not a concatenated present [S+1, kv, hd], lets the
caller keep one preallocated cache and pass views of it: no per-token cache copy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnx 1.23 writes IR 14 by default. onnxruntime 1.32 (checked here) loads IR 7..14, but
# 1.31 stops at 13 and device builds lag: IR 10 with opset 17 (ReduceMean's axes still an
# attribute) loads on all of them.
IR_VERSION = 10
OPSET = 17
MS_DOMAIN = "com.microsoft"
WEIGHT_FORMATS = ("f32", "f16", "int4")


@dataclasses.dataclass
class LayerWeights:
    """One decoder layer's backbone weights as float32, W[out, in] as in y = W x."""

    attn_norm: np.ndarray  # [H]
    q: np.ndarray  # [heads*hd, H]
    k: np.ndarray  # [kv*hd, H]
    v: np.ndarray  # [kv*hd, H]
    o: np.ndarray  # [H, heads*hd]
    ffn_norm: np.ndarray  # [H]
    router: np.ndarray  # [E, H]


def quantize_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit blocks along K for MatMulNBits.

    w [N, K] -> (B uint8 [N, K/bs, bs/2] two codes per byte low nibble first,
                 scales f32 [N * K/bs], zero_points uint8 [N * ceil((K/bs)/2)] packed the same way).
    Dequantized: (code - zero_point) * scale.
    """
    n, k = w.shape
    assert k % block_size == 0, f"K={k} is not a multiple of block_size={block_size}"
    nb = k // block_size
    blocks = w.reshape(n, nb, block_size).astype(np.float32)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / 15.0
    scale[scale == 0] = 1.0
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)  # [N, nb]
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [N, nb, bs/2]
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return np.ascontiguousarray(packed), scale.astype(np.float32).reshape(-1), zp_packed


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zp_packed: np.ndarray, k: int) -> np.ndarray:
    """The float32 W[N, K] MatMulNBits computes with (reference for tests)."""
    n, nb, half = packed.shape
    q = np.empty((n, nb, half * 2), np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    zpb = zp_packed.reshape(n, -1)
    zp = np.empty((n, zpb.shape[1] * 2), np.float32)
    zp[:, 0::2] = zpb & 0x0F
    zp[:, 1::2] = zpb >> 4
    w = (q - zp[:, :nb, None]) * scales.reshape(n, nb)[..., None]
    return w.reshape(n, k)


class _Builder:
    """Collects nodes and initializers; names intermediates after what they hold."""

    def __init__(self, weight_format: str, block_size: int, accuracy_level: int):
        assert weight_format in WEIGHT_FORMATS, weight_format
        self.fmt, self.block_size, self.accuracy_level = weight_format, block_size, accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_bytes = 0

    def const(self, name: str, value: np.ndarray, weight: bool = False) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if weight:
            self.weight_bytes += value.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], out: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def rms_norm(self, x: str, w: np.ndarray, eps: float, name: str) -> str:
        # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern ORT fuses into SimplifiedLayerNormalization.
        sq = self.op("Pow", [x, self.const(name + ".two", np.array(2.0, np.float32))], name + ".sq")
        var = self.op("ReduceMean", [sq], name + ".var", axes=[-1], keepdims=1)
        std = self.op(
            "Sqrt",
            [self.op("Add", [var, self.const(name + ".eps", np.array(eps, np.float32))], name + ".var_eps")],
            name + ".std",
        )
        normed = self.op("Div", [x, std], name + ".normed")
        return self.op("Mul", [normed, self.const(name + ".weight", w.astype(np.float32), weight=True)], name)

    def linear(self, x: str, w: np.ndarray, name: str, fmt: str | None = None) -> str:
        """y [1, out] = x [1, in] @ w[out, in].T in this graph's weight format."""
        fmt = fmt or self.fmt
        n, k = w.shape
        if fmt == "f32":
            return self.op("MatMul", [x, self.const(name + ".weight", w.T.astype(np.float32), weight=True)], name)
        if fmt == "f16":
            # x86 CPU EP has no f16 MatMul: ORT inserts casts and folds the weight back to f32 at
            # load, so this halves the file, not the RAM (bench_backbone.py measures it).
            x16 = self.op("Cast", [x], name + ".x16", to=TensorProto.FLOAT16)
            y16 = self.op(
                "MatMul", [x16, self.const(name + ".weight", w.T.astype(np.float16), weight=True)], name + ".y16"
            )
            return self.op("Cast", [y16], name, to=TensorProto.FLOAT)
        b, scales, zp = quantize_int4(w, self.block_size)
        ins = [
            x,
            self.const(name + ".qweight", b, weight=True),
            self.const(name + ".scales", scales, weight=True),
            self.const(name + ".zero_points", zp, weight=True),
        ]
        return self.op(
            "MatMulNBits",
            ins,
            name,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=self.block_size,
            accuracy_level=self.accuracy_level,
        )

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="edgemoe-tools")
        m.ir_version = IR_VERSION
        return m


def layer_graph(
    lw: LayerWeights,
    heads: int,
    kv_heads: int,
    head_dim: int,
    eps: float,
    rope_theta: float,
    weight_format: str = "f32",
    block_size: int = 32,
    accuracy_level: int = 0,
) -> tuple[onnx.ModelProto, int]:
    """One decoder layer's attention block + router as an ONNX model, and its weight bytes.

    The router always stays f32 (it is tiny and routing is sensitive to it).
    """
    H = lw.attn_norm.shape[0]
    E = lw.router.shape[0]
    rep = heads // kv_heads
    half = head_dim // 2
    g = _Builder(weight_format, block_size, accuracy_level)

    x = g.rms_norm("hidden", lw.attn_norm, eps, "attn_norm")
    q = g.op("Reshape", [g.linear(x, lw.q, "attn_q"), g.const("shape.q", np.array([heads, head_dim], np.int64))], "q")
    kv_shape = g.const("shape.kv", np.array([kv_heads, head_dim], np.int64))
    k = g.op("Reshape", [g.linear(x, lw.k, "attn_k"), kv_shape], "k")
    v = g.linear(x, lw.v, "attn_v")

    # RoPE, rotate-half convention: angles = position * inv_freq, [1, hd/2]
    inv_freq = (1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    pos = g.op("Cast", ["position"], "pos_f", to=TensorProto.FLOAT)
    angles = g.op(
        "Mul",
        [
            g.op("Unsqueeze", [pos, g.const("axes.1", np.array([1], np.int64))], "pos_col"),
            g.const("rope.inv_freq", inv_freq[None, :]),
        ],
        "rope.angles",
    )
    cos, sin = g.op("Cos", [angles], "rope.cos"), g.op("Sin", [angles], "rope.sin")
    halves = g.const("rope.split", np.array([half, half], np.int64))

    def rope(t: str, name: str) -> str:
        x1, x2 = name + ".x1", name + ".x2"
        g.nodes.append(helper.make_node("Split", [t, halves], [x1, x2], name=name + ".split", axis=-1))
        a = g.op("Sub", [g.op("Mul", [x1, cos], name + ".x1c"), g.op("Mul", [x2, sin], name + ".x2s")], name + ".a")
        b = g.op("Add", [g.op("Mul", [x2, cos], name + ".x2c"), g.op("Mul", [x1, sin], name + ".x1s")], name + ".b")
        return g.op("Concat", [a, b], name, axis=-1)

    q, k = rope(q, "q_rope"), rope(k, "k_rope")
    row = g.const("shape.row", np.array([1, kv_heads, head_dim], np.int64))
    key = g.op("Reshape", [k, row], "key")  # [1, kv, hd]
    value = g.op("Reshape", [v, row], "value")

    # attention of one query over S cached + 1 new key: [kv, rep, hd] x [kv, hd, S+1]
    k_all = g.op("Concat", ["past_key", key], "k_all", axis=0)  # [S+1, kv, hd]
    v_all = g.op("Concat", ["past_value", value], "v_all", axis=0)
    qg = g.op("Reshape", [q, g.const("shape.qg", np.array([kv_heads, rep, head_dim], np.int64))], "qg")
    scores = g.op("MatMul", [qg, g.op("Transpose", [k_all], "k_t", perm=[1, 2, 0])], "scores_raw")
    scores = g.op("Mul", [scores, g.const("attn.scale", np.array(head_dim**-0.5, np.float32))], "scores")
    probs = g.op("Softmax", [scores], "probs", axis=-1)  # [kv, rep, S+1]
    ctx = g.op("MatMul", [probs, g.op("Transpose", [v_all], "v_t", perm=[1, 0, 2])], "ctx")  # [kv, rep, hd]
    ctx = g.op("Reshape", [ctx, g.const("shape.ctx", np.array([1, heads * head_dim], np.int64))], "ctx_flat")
    g.op("Add", ["hidden", g.linear(ctx, lw.o, "attn_o")], "hidden_out")

    g.rms_norm("hidden_out", lw.ffn_norm, eps, "ffn_input")
    g.linear("ffn_input", lw.router, "router_logits", fmt="f32")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("hidden", f32, [1, H]),
        helper.make_tensor_value_info("past_key", f32, ["S", kv_heads, head_dim]),
        helper.make_tensor_value_info("past_value", f32, ["S", kv_heads, head_dim]),
        helper.make_tensor_value_info("position", i64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden_out", f32, [1, H]),
        helper.make_tensor_value_info("ffn_input", f32, [1, H]),
        helper.make_tensor_value_info("router_logits", f32, [1, E]),
        helper.make_tensor_value_info("key", f32, [1, kv_heads, head_dim]),
        helper.make_tensor_value_info("value", f32, [1, kv_heads, head_dim]),
    ]
    return g.model("edgemoe_layer", inputs, outputs), g.weight_bytes


def lm_head_graph(
    out_norm: np.ndarray,
    w: np.ndarray,
    eps: float,
    weight_format: str = "f32",
    block_size: int = 32,
    accuracy_level: int = 0,
) -> tuple[onnx.ModelProto, int]:
    """logits [1, vocab] = lm_head(rms_norm(hidden [1, H])), and its weight bytes."""
    g = _Builder(weight_format, block_size, accuracy_level)
    g.linear(g.rms_norm("hidden", out_norm, eps, "output_norm"), w, "logits")
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, w.shape[1]])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, w.shape[0]])]
    return g.model("edgemoe_lm_head", inputs, outputs), g.weight_bytes


def tiny_graph(n: int = 8) -> onnx.ModelProto:
    """y = x + 1 on [1, n]: a call that does almost nothing, to time onnxruntime's per-call overhead."""
    g = _Builder("f32", 32, 0)
    g.op("Add", ["x", g.const("one", np.ones((1, n), np.float32))], "y")
    vi = [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, n]) for s in ("x", "y")]
    return g.model("edgemoe_tiny", vi[:1], vi[1:])


def session(model: onnx.ModelProto | bytes | str, threads: int = 2, spinning: bool = False):
    """An onnxruntime CPU session with every graph optimization on and `threads` intra-op threads.

    spinning=False: idle pool threads sleep. Spinning (ORT's default) wins a little on an idle
    machine but, measured here, makes calls up to 10x slower when the cores are shared.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model  # bytes or a path
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
