"""gpt-oss beyond the shared tests: MXFP4 experts as the released checkpoints store them
(blocks and scales, decoded as transformers decodes them, kept exact at 16 bits, carried over
exactly at 4 bits as MXFP4 matrices, quantized again at 8 bits with the added error measured),
and the model's parity from such a checkpoint."""

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


def test_mxfp4_requantized_adds_a_measured_error(mxfp4_checkpoint, tmp_path):
    """edgemoe's group codes are uniform (scale * (q - 2^(bits-1))); MXFP4's are e2m1 (0, 0.5, 1, 1.5,
    2, 3, 4, 6 and negatives) times a power of two, so group codes cannot hold them exactly: measured
    here, the relative RMS error re-quantizing adds to the experts (docs/gguf.md): a conversion at 8
    bits, and uniform 4-bit groups made from the decoded values (what converting a bf16 copy at 4
    bits stores; a conversion of the MXFP4 checkpoint at 4 bits keeps MXFP4, exactly)."""
    src, dst = mxfp4_checkpoint
    m16 = convert(dst, tmp_path / "m16", bits=16, progress=False)
    m8 = convert(dst, tmp_path / "m8", bits=8, group_size=32, symmetric=True, progress=False)
    exact = np.fromfile(tmp_path / "m16" / "experts.bin", np.uint8)
    got8 = np.fromfile(tmp_path / "m8" / "experts.bin", np.uint8)
    num: dict = {}
    den = 0.0
    for a, b in zip(m16["experts"]["blobs"], m8["experts"]["blobs"]):
        for x, y in zip(
            quant.expert_matrices(exact[a[2] : a[2] + a[3]]), quant.expert_matrices(got8[b[2] : b[2] + b[3]])
        ):
            den += float((x**2).sum())
            num[8] = num.get(8, 0.0) + float(((x - y) ** 2).sum())
            for sym in (True, False):
                y4 = quant.dequantize_matrix(quant.quantize_matrix(x, 4, 32, sym))
                num[(4, sym)] = num.get((4, sym), 0.0) + float(((x - y4) ** 2).sum())
    errs = {k: (v / den) ** 0.5 for k, v in num.items()}
    print("relative RMS error of MXFP4 experts re-quantized:", errs)
    # measured on this checkpoint: 4 bits 0.070 symmetric, 0.084 with mins; 8 bits 0.0044
    assert errs[8] < 0.01 < min(errs[(4, True)], errs[(4, False)]) <= max(errs[(4, True)], errs[(4, False)]) < 0.2


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _blob_matrices(model_dir, blob) -> list[tuple[dict, np.ndarray]]:
    """(header, values) of each matrix of one expert blob of a converted model."""
    _, _, off, length, _, _ = blob
    raw = np.fromfile(model_dir / "experts.bin", np.uint8, length, offset=off)
    return [(quant.matrix_header(raw, o), quant.dequantize_matrix(raw, o)) for o in quant.parse_blob(raw)["offsets"]]


@pytest.fixture(scope="module")
def mxfp4_models(mxfp4_checkpoint, tmp_path_factory):
    """The MXFP4 checkpoint converted at 4 bits (MXFP4 kept) and at 16 (decoded to bf16), backbones at 16."""
    _, dst = mxfp4_checkpoint
    d = tmp_path_factory.mktemp("mxfp4-models")
    m4 = convert(dst, d / "m4", bits=4, backbone_bits=16, progress=False)
    m16 = convert(dst, d / "m16", bits=16, backbone_bits=16, progress=False)
    return (d / "m4", m4), (d / "m16", m16)


def test_mxfp4_at_4_bits_is_carried_over_exactly(mxfp4_checkpoint, mxfp4_models):
    """At 4 bits every expert matrix is an MXFP4 matrix (kind 5) holding exactly the 16-bit
    conversion's values (the checkpoint's own), at 4.25 bits per weight; on float x an expert gives
    the bf16 expert's output up to float rounding, and the model transformers' greedy tokens."""
    src, dst = mxfp4_checkpoint
    (d4, m4), (d16, m16) = mxfp4_models
    assert m4["format_version"] == quant.FORMAT_VERSION >= 4
    assert m4["quantization"]["bits"] == 4 and m4["quantization"]["mxfp4"] is True
    assert "mxfp4" not in m16["quantization"]
    for b4, b16 in zip(m4["experts"]["blobs"], m16["experts"]["blobs"]):
        assert b4[:2] == b16[:2] and b4[4] == 4
        for (h, w), (_, w16) in zip(_blob_matrices(d4, b4), _blob_matrices(d16, b16)):
            assert (h["kind"], h["kind_name"], h["bits"], h["group_size"]) == (quant.KIND_MXFP4, "mxfp4", 4, 32)
            assert h["total_bytes"] == quant.mxfp4_matrix_nbytes(h["rows"], h["cols"])
            np.testing.assert_array_equal(w, w16)  # the same numbers, bit for bit
    # the experts file: 16 bits per weight against 4.25 (and the headers, 4 KiB pages)
    assert m4["experts"]["file_bytes"] < 0.4 * m16["experts"]["file_bytes"]

    # an expert on 2..11 tokens computes with float x: the same products as the bf16 expert's,
    # summed in another order (from 12 on, x is rounded to int8 per 32 values where the CPU has the
    # int8 prefill, AVX2 and AVX-512, as for 4-bit codes)
    rng = np.random.default_rng(3)
    raw4, raw16 = (np.fromfile(d / "experts.bin", np.uint8) for d in (d4, d16))
    for b4, b16 in zip(m4["experts"]["blobs"][::5], m16["experts"]["blobs"][::5]):
        blob4, blob16 = raw4[b4[2] : b4[2] + b4[3]], raw16[b16[2] : b16[2] + b16[3]]
        for T in (2, 5, 11):
            x = rng.standard_normal((T, m4["experts"]["hidden_size"])).astype(np.float32)
            y4, y16 = _core.expert_forward(x, blob4), _core.expert_forward(x, blob16)
            np.testing.assert_allclose(y4, y16, rtol=0, atol=1e-5 * np.abs(y16).max())

    # the model: x is rounded per 32 values to int8 where an expert decodes one token and (AVX2,
    # AVX-512) where it prefills 12 or more, as for any 4-bit matrix, so the logits are not the bf16
    # model's bit for bit: measured 1.4e-3 at most with float prefill, 1.1e-2 with the int8 one, a
    # KL of 2e-6 per position (8-bit experts: ~4e-5); the greedy tokens are transformers'
    model4, model16 = edgemoe.load(d4), edgemoe.load(d16)
    ids = np.random.default_rng(5).integers(3, model4.config.vocab_size, size=24).tolist()
    ref = decoded_reference(src, dst)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 24:]
    got, exact = model4.logits(ids), model16.logits(ids)
    kl = kl_per_position(exact, got)
    print(f"MXFP4 vs bf16 experts: logits {np.abs(got - exact).max():.2e} at most, KL median {np.median(kl):.1e}")
    assert np.abs(got - exact).max() < 3e-2 and np.median(kl) < 2e-5
    model4.eos_ids = set()
    assert model4.generate(ids, max_new_tokens=24) == want.tolist()


def test_mxfp4_streams_under_a_budget(mxfp4_models):
    (d4, _), _ = mxfp4_models
    free = edgemoe.load(d4)
    ids = np.random.default_rng(7).integers(3, free.config.vocab_size, size=24).tolist()
    want = free.generate(ids, max_new_tokens=16)
    tight = edgemoe.load(d4, memory_budget=free.min_budget)  # room for one layer's top-k only
    assert tight.generate(ids, max_new_tokens=16) == want
    s = tight.stats()
    assert s["cache_misses"] > 0 and s["evictions"] > 0 and s["expert_cache_peak_bytes"] <= free.min_budget


def test_a_damaged_mxfp4_blob_is_named(mxfp4_models, tmp_path):
    """A NaN scale (E8M0 255) in an MXFP4 matrix, with a checksum that agrees (written so), is refused
    when the expert is read, naming the expert and the damage; flipped bits fail the checksum."""
    (d4, m4), _ = mxfp4_models
    for what in ("nan scale", "flipped bits"):
        d = tmp_path / what.replace(" ", "-")
        shutil.copytree(d4, d)
        m = json.loads((d / "manifest.json").read_text())
        i = len(m["experts"]["blobs"]) - 1
        layer, e, off, length, _, _ = m["experts"]["blobs"][i]
        raw = np.fromfile(d / "experts.bin", np.uint8)
        blob = raw[off : off + length]
        h = quant.matrix_header(blob, quant.parse_blob(blob)["offsets"][0])
        at = off + quant.parse_blob(blob)["offsets"][0] + h["scales_offset"] + 3
        raw[at] = 0xFF if what == "nan scale" else raw[at] ^ 0x10
        raw.tofile(d / "experts.bin")
        if what == "nan scale":
            m["experts"]["blobs"][i][5] = int(_core.crc32c(raw[off : off + length]))
            (d / "manifest.json").write_text(json.dumps(m))
        model = edgemoe.load(d, preload="none")
        ids = list(range(3, 27))
        want = r"NaN scale \(E8M0 255\) for block 3.*convert the model again" if what == "nan scale" else "checksum"
        with pytest.raises(edgemoe.CorruptExpertError, match=f"expert {e} of layer {layer}.*{want}"):
            for _ in range(4):  # until the router picks the damaged expert
                model.logits(ids)
                ids = [(t * 7 + 11) % model.config.vocab_size for t in ids]
        print(what, "->", "refused")


def test_mxfp4_gguf_tensors_carry_over():
    """llama.cpp's MXFP4 blocks (E8M0 byte, then 16 bytes of codes) become an MXFP4 matrix at 4 bits,
    value for value as the gguf package dequantizes them, and are quantized again at other bitwidths."""
    from edgemoe.converters.gguf import GGUFWeight, Report

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 160)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, QT.MXFP4)
    values = gguf.quants.dequantize(raw, QT.MXFP4)
    report = Report()
    weight = GGUFWeight("experts.up", "MXFP4", raw, (48, 160), report)
    for gs in (32, 64):  # MXFP4's blocks are 32 wide whatever group size the rest is quantized with
        buf = weight.encode(4, gs, symmetric=False)
        h = quant.matrix_header(buf)
        assert (h["kind"], h["bits"], h["group_size"]) == (quant.KIND_MXFP4, 4, 32)
        assert np.array_equal(quant.dequantize_matrix(buf), values)
    x = rng.standard_normal((3, 160)).astype(np.float32)
    np.testing.assert_allclose(
        _core.qmatrix_matmul(x, buf), x @ values.T, rtol=1e-5, atol=1e-5 * np.abs(x @ values.T).max()
    )
    weight.encode(8, 32, symmetric=True)
    s = report.summary()["experts.up"]
    assert s["stored_as"] == {"MXFP4 (carried over)": 2, "8-bit g32 symmetric": 1} and s["exact"] == 2


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


@pytest.mark.parametrize("T,S", [(3, 9), (1, 1200)])  # the prompt's path; one token over a long cache
def test_attention_sinks_against_numpy(T, S):
    rng = np.random.default_rng(1)
    heads, kv_heads, hd = 4, 2, 16
    q = rng.standard_normal((T, heads, hd)).astype(np.float32)
    k, v = (rng.standard_normal((S, kv_heads, hd)).astype(np.float32) for _ in range(2))
    sinks = np.array([0.0, 3.0, -2.0, 9.0], np.float32)  # the last takes nearly all of its head's mass
    for window in (0, 4, 1100):
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
