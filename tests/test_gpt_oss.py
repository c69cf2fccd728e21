"""gpt-oss beyond the shared tests: MXFP4 experts as the released checkpoints store them
(blocks and scales, decoded as transformers decodes them, kept exact at 16 bits and quantized
again at 4 bits with the added error measured), and the model's parity from such a checkpoint."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tiny import reference_model

import edgemoe
from edgemoe import _core
from edgemoe.converters.convert import convert
from edgemoe.converters.hf import mxfp4_to_float32
from edgemoe.format import quant
from edgemoe.format.safetensors import read_safetensors, to_float32, write_safetensors


def to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [E, rows, cols] -> (blocks [E, rows, cols/32, 16], scales [E, rows, cols/32]) in transformers'
    layout, quantized by the gguf package's (llama.cpp's reference) MXFP4 quantizer: its blocks are
    the E8M0 byte, then 16 bytes with element j in the low and j+16 in the high nibble."""
    E, rows, cols = w.shape
    raw = gguf.quants.quantize(w.reshape(E * rows, cols), QT.MXFP4).reshape(E, rows, cols // 32, 17)
    scales, qs = raw[..., 0], raw[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [.., 32] in element order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # transformers: element 2j low, 2j+1 high
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(scales, np.uint8)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny gpt-oss checkpoint with its experts in MXFP4, as openai/gpt-oss-* ship them."""
    src = tiny_checkpoint("gpt_oss")
    dst = tmp_path_factory.mktemp("mxfp4") / "ck"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update({k: (np.asarray(a), dt) for k, (a, dt) in read_safetensors(f).items()})
    out = {}
    for name, (a, dt) in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = to_float32(a, dt).transpose(0, 2, 1)  # [E, in, out] -> [E, out, in]
            blocks, scales = to_mxfp4(np.ascontiguousarray(w))
            out[name + "_blocks"], out[name + "_scales"] = (blocks, "U8"), (scales, "U8")
        else:
            out[name] = (a, dt)
    write_safetensors(dst / "model.safetensors", out)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return src, dst


def decoded_reference(src, dst) -> torch.nn.Module:
    """transformers' model of the bf16 checkpoint with its experts replaced by transformers' own
    decoding of the MXFP4 blocks (integrations.mxfp4.convert_moe_packed_tensors)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = reference_model(src)
    mx = read_safetensors(dst / "model.safetensors")
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                pre = f"model.layers.{i}.mlp.experts.{proj}"
                blocks, scales = (torch.from_numpy(np.array(mx[pre + s][0])) for s in ("_blocks", "_scales"))
                getattr(layer.mlp.experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    return ref


def test_mxfp4_decodes_as_transformers_does(mxfp4_checkpoint):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, dst = mxfp4_checkpoint
    mx = read_safetensors(dst / "model.safetensors")
    pre = "model.layers.1.mlp.experts.gate_up_proj"
    blocks, scales = np.array(mx[pre + "_blocks"][0]), np.array(mx[pre + "_scales"][0])
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    for e in range(blocks.shape[0]):  # theirs is [E, in, out]; ours [out, in] per expert
        np.testing.assert_array_equal(mxfp4_to_float32(blocks[e], scales[e]), theirs[e].numpy().T)


def test_mxfp4_checkpoint_converts_exactly_and_matches_transformers(mxfp4_checkpoint, tmp_path):
    src, dst = mxfp4_checkpoint
    m = convert(dst, tmp_path / "m16", bits=16, progress=False)
    assert m["source"]["layout"] == "fused-mxfp4" and m["quantization"]["float_dtype"] == "bf16"
    ref = decoded_reference(src, dst)
    raw = np.fromfile(tmp_path / "m16" / "experts.bin", np.uint8)
    layer, e, off, length, _, _ = m["experts"]["blobs"][-1]
    gate, up, down = quant.expert_matrices(raw[off : off + length])
    gate_up = ref.model.layers[layer].mlp.experts.gate_up_proj[e].detach().numpy().T  # [2I, H] interleaved
    np.testing.assert_array_equal(gate, gate_up[0::2])  # bf16 holds every MXFP4 value: no rounding at all
    np.testing.assert_array_equal(up, gate_up[1::2])
    np.testing.assert_array_equal(down, ref.model.layers[layer].mlp.experts.down_proj[e].detach().numpy().T)
    model = edgemoe.load(tmp_path / "m16")
    ids = np.random.default_rng(5).integers(3, model.config.vocab_size, size=24).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.logits(ids) - want).max() < 2e-3


def test_mxfp4_at_4_bits_adds_a_measured_error(mxfp4_checkpoint, tmp_path):
    """edgemoe's 4-bit codes are uniform (scale * (q - 8)); MXFP4's are e2m1 (0, 0.5, 1, 1.5, 2, 3,
    4, 6 and negatives) times a power of two, so 4 bits cannot hold them exactly: measured here,
    the relative RMS error the re-quantization adds to the experts (docs/gguf.md)."""
    src, dst = mxfp4_checkpoint
    m16 = convert(dst, tmp_path / "m16", bits=16, progress=False)
    errs = {}
    for bits, sym, gs in ((4, True, 32), (4, False, 32), (8, True, 32)):
        d = tmp_path / f"m{bits}{sym}"
        m = convert(dst, d, bits=bits, group_size=gs, symmetric=sym, progress=False)
        exact = np.fromfile(tmp_path / "m16" / "experts.bin", np.uint8)
        got = np.fromfile(d / "experts.bin", np.uint8)
        num = den = 0.0
        for a, b in zip(m16["experts"]["blobs"], m["experts"]["blobs"]):
            pairs = zip(
                quant.expert_matrices(exact[a[2] : a[2] + a[3]]), quant.expert_matrices(got[b[2] : b[2] + b[3]])
            )
            for x, y in pairs:
                num, den = num + float(((x - y) ** 2).sum()), den + float((x**2).sum())
        errs[(bits, sym)] = (num / den) ** 0.5
    print("relative RMS error of MXFP4 experts re-quantized:", errs)
    # measured on this checkpoint: 4 bits 0.070 symmetric, 0.084 with mins; 8 bits 0.0044
    assert (
        errs[(8, True)] < 0.01 < min(errs[(4, True)], errs[(4, False)]) <= max(errs[(4, True)], errs[(4, False)]) < 0.2
    )


# ---------------------------------------------------------------- the native blocks against numpy


def test_expert_blob_with_biases_and_the_clamped_swiglu_against_numpy():
    """One float32 expert blob with biases and activation 1 through the native expert kernel,
    against transformers' formula written in numpy (several token counts: decode, small, prefill)."""
    rng = np.random.default_rng(0)
    H, I, alpha, limit = 64, 96, 1.702, 0.4
    gate, up, down = rng.standard_normal((I, H)), rng.standard_normal((I, H)), rng.standard_normal((H, I))
    gate, up, down = (np.float32(0.2) * m.astype(np.float32) for m in (gate, up, down))
    bias = rng.standard_normal(2 * I + H).astype(np.float32)
    glu = quant.Glu(bias, quant.ACT_CLAMPED_SWIGLU, alpha, limit)
    blob = quant.pack_expert_blob(0, 0, *(quant.float_matrix(m, "f32") for m in (gate, up, down)), glu=glu)
    parsed = quant.parse_blob(blob)["glu"]
    np.testing.assert_array_equal(parsed.bias, bias)
    assert (parsed.activation, parsed.alpha, parsed.limit) == (1, np.float32(alpha), np.float32(limit))
    for T in (1, 3, 17):
        x = rng.standard_normal((T, H)).astype(np.float32)
        g = np.minimum(x @ gate.T + bias[:I], limit)
        u = np.clip(x @ up.T + bias[I : 2 * I], -limit, limit)
        want = ((u + 1) * g / (1 + np.exp(-alpha * g))) @ down.T + bias[2 * I :]
        np.testing.assert_allclose(_core.expert_forward(x, blob), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_attention_sinks_against_numpy():
    rng = np.random.default_rng(1)
    T, S, heads, kv_heads, hd = 3, 9, 4, 2, 16
    q = rng.standard_normal((T, heads, hd)).astype(np.float32)
    k, v = (rng.standard_normal((S, kv_heads, hd)).astype(np.float32) for _ in range(2))
    sinks = np.array([0.0, 3.0, -2.0, 9.0], np.float32)  # the last takes nearly all of its head's mass
    for window in (0, 4):
        got = _core.attention(q, k, v, S - T, window, sinks).reshape(T, heads, hd)
        for t in range(T):
            pos = S - T + t
            lo = max(0, pos - window + 1) if window else 0
            for h in range(heads):
                g = h // (heads // kv_heads)
                logits = k[lo : pos + 1, g] @ q[t, h] / np.sqrt(hd)
                full = np.exp(np.append(logits, sinks[h]) - max(logits.max(), sinks[h]))
                p = full[:-1] / full.sum()  # the sink's share attends to nothing
                np.testing.assert_allclose(got[t, h], p @ v[lo : pos + 1, g], rtol=1e-5, atol=1e-6)
