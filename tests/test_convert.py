"""The converter: HF checkpoint -> model directory (docs/format.md), and its errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiny import ARCHS

from edgemoe import _core
from edgemoe.cli import convert as cli
from edgemoe.converters.convert import convert
from edgemoe.errors import CheckpointError, EdgeMoEError, ModelDirectoryError, UnsupportedArchitectureError
from edgemoe.format import quant
from edgemoe.format.manifest import FORMAT_VERSION, blob_tables, load_manifest
from edgemoe.format.safetensors import SafetensorsFile, bf16_to_f32, read_safetensors, to_float32, write_safetensors
from edgemoe.models.checkpoint import float32_role

# HF expert projection names per architecture (per-expert layout)
PROJ = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")} | {
    a: ("mlp", "gate_proj", "up_proj", "down_proj")
    for a in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
}


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def hf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, via the reference safetensors library (bf16 -> float32)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def expert_weights(tensors, arch, layer, e):
    if arch == "gpt_oss":  # fused [E, H, 2I] with gate, up rows interleaved, and [E, I, H]
        pre = f"model.layers.{layer}.mlp.experts."
        gate_up, down = tensors[pre + "gate_up_proj"][e], tensors[pre + "down_proj"][e]
        return gate_up[:, 0::2].T, gate_up[:, 1::2].T, down.T
    block, g, u, d = PROJ[arch]
    pre = f"model.layers.{layer}.{block}.experts.{e}."
    return tuple(tensors[pre + p + ".weight"] for p in (g, u, d))


# ---------------------------------------------------------------- every architecture, every bitwidth


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    cache = {}

    def make(arch, bits):
        if (arch, bits) not in cache:
            dst = tmp_path_factory.mktemp(f"conv_{arch}_{bits}") / "model"
            convert(tiny_checkpoint(arch), dst, bits=bits, progress=False)
            cache[arch, bits] = dst
        return cache[arch, bits]

    return make


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_blob_table_matches_file(converted, arch, bits):
    d = converted(arch, bits)
    m = load_manifest(d)
    ex = m["experts"]
    assert m["format_version"] == FORMAT_VERSION and m["architecture"] == arch
    assert m["quantization"]["bits"] == bits and m["quantization"]["float_dtype"] == "bf16"
    raw = np.fromfile(d / "experts.bin", dtype=np.uint8)
    assert raw.size == ex["file_bytes"] == (d / "experts.bin").stat().st_size
    assert raw.size % 4096 == 0
    magic, version, hbytes, nl, ne, nblobs, fbytes = struct.unpack("<8sIIIIQQ", raw[:40].tobytes())
    assert (magic, version, hbytes, nl, ne) == (b"EDGEMOEX", FORMAT_VERSION, 4096, ex["num_layers"], ex["num_experts"])
    assert nblobs == len(ex["blobs"]) == len(ex["moe_layers"]) * ex["num_experts"]
    assert fbytes == raw.size and not raw[40:4096].any()

    offsets, lengths, crcs, bitw = blob_tables(m)
    end = 4096
    for layer, e, off, length, b, crc in ex["blobs"]:
        assert off % 4096 == 0 and off >= end  # aligned, in order, not overlapping
        end = off + length
        blob = raw[off : off + length]
        assert _core.crc32c(blob) == crc
        assert b == bits
        info = quant.parse_blob(blob)
        assert (info["layer"], info["expert"]) == (layer, e)
        assert (offsets[layer, e], lengths[layer, e], crcs[layer, e], bitw[layer, e]) == (off, length, crc, b)
    dense = [i for i in range(ex["num_layers"]) if i not in ex["moe_layers"]]
    assert (lengths[dense] == 0).all() and (lengths[ex["moe_layers"]] > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_16_bit_experts_are_the_checkpoint_weights(converted, tiny_checkpoint, arch):
    d = converted(arch, 16)
    ref = hf_tensors(tiny_checkpoint(arch))
    m = load_manifest(d)
    raw = np.fromfile(d / "experts.bin", dtype=np.uint8)
    for layer, e, off, length, _, _ in m["experts"]["blobs"]:
        got = quant.expert_matrices(raw[off : off + length])
        for g, w in zip(got, expert_weights(ref, arch, layer, e)):
            np.testing.assert_array_equal(g, w)
        glu = quant.parse_blob(raw[off : off + length])["glu"]
        if arch == "gpt_oss":  # the biases, split as gate and up are, and the clamped SwiGLU's settings
            pre = f"model.layers.{layer}.mlp.experts."
            gu, down = ref[pre + "gate_up_proj_bias"][e], ref[pre + "down_proj_bias"][e]
            np.testing.assert_array_equal(glu.bias, np.concatenate([gu[0::2], gu[1::2], down]))
            assert (glu.activation, glu.alpha, glu.limit) == (quant.ACT_CLAMPED_SWIGLU, 1.5, np.float32(0.3))
        else:
            assert glu.plain


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_are_close(converted, tiny_checkpoint, bits):
    arch = "qwen2_moe"
    ref = hf_tensors(tiny_checkpoint(arch))
    m = load_manifest(converted(arch, bits))
    raw = np.fromfile(converted(arch, bits) / "experts.bin", dtype=np.uint8)
    layer, e, off, length, _, _ = m["experts"]["blobs"][-1]
    for g, w in zip(quant.expert_matrices(raw[off : off + length]), expert_weights(ref, arch, layer, e)):
        step = np.ptp(w.reshape(w.shape[0], -1, 64), axis=-1).max() / (2**bits - 1)
        assert np.abs(g - w).max() <= step * 0.51 + 1e-3


# canonical backbone names each tiny model must produce
def expected_backbone(arch, cfg, moe_layers):
    names = {"tok_embeddings", "output_norm"}
    if not cfg.get("tie_word_embeddings"):
        names.add("output")
    for i in range(cfg["num_hidden_layers"]):
        if arch.startswith("deepseek"):  # multi-head latent attention
            q = ("attn_q_a", "attn_q_a_norm", "attn_q_b") if cfg.get("q_lora_rank") else ("attn_q",)
            mla = ("attn_norm", *q, "attn_kv_a", "attn_kv_a_norm", "attn_kv_b", "attn_o", "ffn_norm")
            names |= {f"layers.{i}.{n}" for n in mla}
            if i in moe_layers:
                names |= {f"layers.{i}.ffn_{x}" for x in ("router", "shared_gate", "shared_up", "shared_down")}
                if arch == "deepseek_v3":
                    names.add(f"layers.{i}.ffn_router_bias")
            else:
                names |= {f"layers.{i}.ffn_{x}" for x in ("gate", "up", "down")}
            continue
        names |= {f"layers.{i}.{n}" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm")}
        if arch == "gpt_oss":
            names |= {f"layers.{i}.attn_{x}_bias" for x in "qkvo"} | {f"layers.{i}.attn_sinks"}
            names |= {f"layers.{i}.ffn_router_bias"}
        if arch == "qwen2_moe":
            names |= {f"layers.{i}.attn_{x}_bias" for x in "qkv"}
        if arch in ("qwen3_moe", "olmoe"):
            names |= {f"layers.{i}.attn_q_norm", f"layers.{i}.attn_k_norm"}
        if i in moe_layers:
            names.add(f"layers.{i}.ffn_router")
            if arch == "qwen2_moe":
                names |= {f"layers.{i}.ffn_shared_{x}" for x in ("gate", "up", "down", "expert_gate")}
        else:
            names |= {f"layers.{i}.ffn_{x}" for x in ("gate", "up", "down")}
    return names


HF_NAME = {
    "tok_embeddings": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_o": "self_attn.o_proj.weight",
    "attn_q_bias": "self_attn.q_proj.bias",
    "attn_k_bias": "self_attn.k_proj.bias",
    "attn_v_bias": "self_attn.v_proj.bias",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "ffn_shared_gate": "mlp.shared_expert.gate_proj.weight",
    "ffn_shared_up": "mlp.shared_expert.up_proj.weight",
    "ffn_shared_down": "mlp.shared_expert.down_proj.weight",
    "ffn_shared_expert_gate": "mlp.shared_expert_gate.weight",
    "attn_o_bias": "self_attn.o_proj.bias",
    "attn_sinks": "self_attn.sinks",
    "ffn_router_bias": "mlp.router.bias",
}
HF_NAME_MLA = {
    **HF_NAME,
    "attn_q_a": "self_attn.q_a_proj.weight",
    "attn_q_a_norm": "self_attn.q_a_layernorm.weight",
    "attn_q_b": "self_attn.q_b_proj.weight",
    "attn_kv_a": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b": "self_attn.kv_b_proj.weight",
    "ffn_router_bias": "mlp.gate.e_score_correction_bias",
    "ffn_shared_gate": "mlp.shared_experts.gate_proj.weight",
    "ffn_shared_up": "mlp.shared_experts.up_proj.weight",
    "ffn_shared_down": "mlp.shared_experts.down_proj.weight",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_and_tokenizer(converted, tiny_checkpoint, arch):
    d = converted(arch, 4)
    src = tiny_checkpoint(arch)
    m = load_manifest(d)
    ref = hf_tensors(src)
    back = read_safetensors(d / "backbone.safetensors")
    assert set(back) == expected_backbone(arch, m["config"], m["experts"]["moe_layers"])
    assert hf_tensors_file(d / "backbone.safetensors").keys() == back.keys()  # a standard safetensors file
    stored = {}
    for f in sorted(src.glob("*.safetensors")):
        stored.update({k: dt for k, (_, dt) in read_safetensors(f).items()})
    names = HF_NAME_MLA if arch.startswith("deepseek") else HF_NAME
    quantized = set(m["backbone"]["quantized"])  # --bits 4 quantizes the backbone to 8 bits by default
    assert m["backbone"]["bits"] == 8 and m["backbone"]["group_size"] == 64 and quantized
    for name, (arr, dtype) in back.items():
        if name.startswith("layers."):
            _, i, short = name.split(".")
            router = "mlp.router.weight" if arch == "gpt_oss" else f"{PROJ[arch][0]}.gate.weight"
            hf = f"model.layers.{i}." + (router if short == "ffn_router" else names[short])
        else:
            hf = names[name]
        if name in quantized:
            assert dtype == "U8" and "router" not in name and "norm" not in name
            w = quant.dequantize_matrix(np.asarray(arr))
            step = (ref[hf].max() - ref[hf].min()) / 255
            np.testing.assert_allclose(w, ref[hf], atol=step, err_msg=name)
        elif float32_role(name):  # widened once by the converter, not at every load
            assert dtype == "F32" and stored[hf] == "BF16"
            np.testing.assert_array_equal(arr, ref[hf], err_msg=name)
        else:
            assert dtype == stored[hf]  # as the checkpoint stores it
            np.testing.assert_array_equal(to_float32(arr, dtype), ref[hf], err_msg=name)
    assert m["experts"]["intermediate_size"] == 128 and m["experts"]["hidden_size"] == 64
    layout = "fused" if arch == "gpt_oss" else "per-expert"  # transformers saves gpt-oss's experts fused
    assert m["experts"]["top_k"] == m["config"]["num_experts_per_tok"] and m["source"]["layout"] == layout
    assert m["tokenizer"]["bos_token_id"] == 0 and m["tokenizer"]["eos_token_ids"] == [1]
    assert "tokenizer.json" in m["tokenizer"]["files"]
    for f in m["tokenizer"]["files"]:
        assert (d / f).read_bytes() == (src / f).read_bytes()
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(d / "tokenizer.json")).encode("The quick brown fox").ids
    assert m["config"] == json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("dtype,kind", [("float16", "f16"), ("float32", "f32")])
def test_16_bit_keeps_the_checkpoint_float_dtype(tiny_checkpoint, tmp_path, dtype, kind):
    import torch

    src = tiny_checkpoint("olmoe", dtype=getattr(torch, dtype))
    m = convert(src, tmp_path / "m", bits=16, progress=False)
    assert m["quantization"]["float_dtype"] == kind and m["source"]["dtype"] == dtype
    assert {dt for _, dt in read_safetensors(tmp_path / "m" / "backbone.safetensors").values()} == {kind.upper()}
    ref = hf_tensors(src)
    raw = np.fromfile(tmp_path / "m" / "experts.bin", dtype=np.uint8)
    layer, e, off, length, _, _ = m["experts"]["blobs"][3]
    assert (
        quant.matrix_header(raw[off : off + length], quant.parse_blob(raw[off : off + length])["offsets"][0])[
            "kind_name"
        ]
        == kind
    )
    for g, w in zip(quant.expert_matrices(raw[off : off + length]), expert_weights(ref, "olmoe", layer, e)):
        np.testing.assert_array_equal(g, w)


def test_qwen2_dense_layer_has_no_experts(converted):
    m = load_manifest(converted("qwen2_moe", 16))
    assert m["experts"]["moe_layers"] == [0, 2]
    assert {b[0] for b in m["experts"]["blobs"]} == {0, 2}


# ---------------------------------------------------------------- layouts


def fuse(src, dst, arch, transposed=False):
    """Rewrite a per-expert checkpoint with fused 3D experts, as one model.safetensors."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    cfg = json.loads((src / "config.json").read_text())
    block, g, u, d = PROJ[arch]
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".experts." in k})
    for i in layers:
        n = sum(1 for k in tensors if k.startswith(f"model.layers.{i}.{block}.experts.") and k.endswith(f".{g}.weight"))
        get = lambda e, p: tensors[f"model.layers.{i}.{block}.experts.{e}.{p}.weight"][0]  # noqa: E731
        gate_up = np.stack([np.concatenate([get(e, g), get(e, u)]) for e in range(n)])  # [E, 2I, H]
        down = np.stack([get(e, d) for e in range(n)])  # [E, H, I]
        if transposed:
            gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
        pre = f"model.layers.{i}.mlp.experts."  # transformers 5's in-memory naming
        out[pre + "gate_up_proj"] = (np.ascontiguousarray(gate_up), "BF16")
        out[pre + "down_proj"] = (np.ascontiguousarray(down), "BF16")
    assert cfg["hidden_size"] != 2 * 128 and cfg["hidden_size"] != 128  # the orientation is unambiguous
    write_safetensors(dst / "model.safetensors", out)
    return dst


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_layout_gives_identical_experts(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    a = convert(src, tmp_path / "a", bits=4, progress=False)
    for name, transposed in (("fused", False), ("fused_t", True)):
        f = fuse(src, tmp_path / f"hf_{name}", arch, transposed)
        b = convert(f, tmp_path / name, bits=4, progress=False)
        assert b["source"]["layout"] == "fused"
        assert (tmp_path / "a" / "experts.bin").read_bytes() == (tmp_path / name / "experts.bin").read_bytes()
        assert a["experts"]["blobs"] == b["experts"]["blobs"]
        assert (tmp_path / "a" / "backbone.safetensors").read_bytes() == (
            tmp_path / name / "backbone.safetensors"
        ).read_bytes()


# ---------------------------------------------------------------- checkpoint errors


def test_not_a_checkpoint(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a directory"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(empty, tmp_path / "out", progress=False)
    shutil.copy(tiny_checkpoint("olmoe") / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors.*Download"):
        convert(empty, tmp_path / "out", progress=False)
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="PyTorch weights.*safetensors"):
        convert(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_shard(tiny_checkpoint, tmp_path):
    src = copy_ckpt(tiny_checkpoint("mixtral"), tmp_path / "ck")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"1 are missing \({shard.name}\).*Download the missing files"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_shard(tiny_checkpoint, tmp_path):
    src = copy_ckpt(tiny_checkpoint("mixtral"), tmp_path / "ck")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    size = shard.stat().st_size
    os.truncate(shard, size - 1000)
    with pytest.raises(
        CheckpointError,
        match=rf"{shard.name} is {size - 1000} bytes but its header describes "
        rf"{size}: the file is truncated.*download or copy it again",
    ):
        convert(src, tmp_path / "out", progress=False)
    os.truncate(shard, 3)
    with pytest.raises(CheckpointError, match="too short"):
        convert(src, tmp_path / "out", progress=False)


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    src = copy_ckpt(tiny_checkpoint("mixtral"), tmp_path / "ck")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'llama'") as e:
        convert(src, tmp_path / "out", progress=False)
    for arch in ARCHS:
        assert arch in str(e.value)


def test_incomplete_or_foreign_tensors(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    bad = tmp_path / "ck"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")

    def write(ts):
        write_safetensors(bad / "model.safetensors", ts)

    write({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.5.up_proj.weight"})
    with pytest.raises(CheckpointError, match="expert 5 of layer 1 has no up projection"):
        convert(bad, tmp_path / "out", progress=False)
    write({k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_norm.weight"})
    with pytest.raises(CheckpointError, match="no tensor model.layers.0.self_attn.k_norm.weight"):
        convert(bad, tmp_path / "out", progress=False)
    write({**tensors, "model.layers.0.lora_A.weight": tensors["model.norm.weight"]})
    with pytest.raises(CheckpointError, match="model.layers.0.lora_A.weight .* has no place in a olmoe model"):
        convert(bad, tmp_path / "out", progress=False)
    write(tensors)
    assert convert(bad, tmp_path / "out", bits=8, group_size=32, progress=False)["source"]["layout"] == "per-expert"


def test_group_size_must_divide(tiny_checkpoint, tmp_path):
    with pytest.raises(
        CheckpointError, match="hidden size 64 is not a multiple of the group size 128: use --group-size 64"
    ):
        convert(tiny_checkpoint("olmoe"), tmp_path / "out", bits=4, group_size=128, progress=False)


def test_destination_exists(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("olmoe")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(EdgeMoEError, match="already exists.*--force"):
        convert(src, dst, progress=False)
    assert (dst / "keep").exists()
    assert cli.main([str(src), "-o", str(dst), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([str(src), "-o", str(dst), "--bits", "8", "--force"]) == 0
    err = capsys.readouterr().err
    assert "experts (8-bit)" in err and "wrote" in err  # progress bar and summary
    assert not (dst / "keep").exists() and load_manifest(dst)["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs left
    with pytest.raises(EdgeMoEError, match="holds the checkpoint"):
        convert(src, src, overwrite=True, progress=False)


def test_failed_conversion_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    real, calls = quant.pack_expert_blob, []

    def pack_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "pack_expert_blob", pack_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny_checkpoint("olmoe"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the model nor the temporary directory


# ---------------------------------------------------------------- model directory errors


def test_load_manifest_errors(converted, tmp_path):
    d = copy_ckpt(converted("olmoe", 4), tmp_path / "m")
    with pytest.raises(ModelDirectoryError, match="not a directory"):
        load_manifest(tmp_path / "nope")
    size = (d / "experts.bin").stat().st_size
    os.truncate(d / "experts.bin", size - 4096)
    with pytest.raises(
        ModelDirectoryError,
        match=f"experts.bin is {size - 4096} bytes, the manifest expects {size}: "
        "the file is truncated or damaged, convert the model again",
    ):
        load_manifest(d)
    os.truncate(d / "experts.bin", size)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(dict(m, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(
        ModelDirectoryError,
        match=f"format version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION} at most: upgrade edgemoe",
    ):
        load_manifest(d)
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "backbone.safetensors").rename(d / "b")
    with pytest.raises(ModelDirectoryError, match="backbone.safetensors is missing"):
        load_manifest(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(ModelDirectoryError, match="damaged, convert the model again"):
        load_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelDirectoryError, match="no manifest.json"):
        load_manifest(d)


# ---------------------------------------------------------------- safetensors io


def test_safetensors_reader_matches_reference(tiny_checkpoint, tmp_path):
    shard = sorted(tiny_checkpoint("qwen2_moe").glob("*.safetensors"))[0]
    ours, ref = read_safetensors(shard), hf_tensors_file(shard)
    assert ours.keys() == ref.keys()
    st = SafetensorsFile(shard)
    for k, (a, _dtype) in ours.items():
        np.testing.assert_array_equal(bf16_to_f32(a), ref[k])
        np.testing.assert_array_equal(st.read(k), a)
        if a.ndim == 2:
            np.testing.assert_array_equal(st.read(k, 1), a[1])
    x = {
        "f32": (np.arange(6, dtype=np.float32).reshape(2, 3), "F32"),
        "bf": (np.array([0x3F80, 0x4000], np.uint16), "BF16"),
        "i8": (np.array([1, -2], np.int8), "I8"),
    }
    write_safetensors(tmp_path / "x.safetensors", x)
    back = hf_tensors_file(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["f32"], x["f32"][0])
    assert (tmp_path / "x.safetensors").read_bytes()[8:].index(b"{") == 0
    assert struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0] % 8 == 0
    np.testing.assert_array_equal(bf16_to_f32(read_safetensors(tmp_path / "x.safetensors")["bf"][0]), [1.0, 2.0])


def hf_tensors_file(path):
    """A safetensors file via the reference library (bf16 widened to float32)."""
    import torch
    from safetensors.torch import load_file

    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load_file(path).items()}


# ---------------------------------------------------------------- memory


def write_big_mixtral(path, layers=6, experts=8, hidden=512, inter=2048, vocab=512):
    """A synthetic bf16 Mixtral checkpoint written tensor by tensor (no torch, little RAM)."""
    path.mkdir()
    cfg = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(hidden * inter, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    block = block.astype(np.uint16)
    from edgemoe.format.safetensors import SafetensorsWriter

    weight_map = {}
    for i in range(layers):
        w = SafetensorsWriter({"format": "pt"})
        pre = f"model.layers.{i}."

        def add(name, shape, salt):
            n = int(np.prod(shape))

            def chunks(salt=salt, n=n):
                data = np.roll(block[:n], salt)  # distinct, cheap
                yield data.view(np.uint8)

            w.add_lazy(name, "BF16", shape, chunks)
            weight_map[name] = f"model-{i:05d}.safetensors"

        for k, shape in (
            ("input_layernorm.weight", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)),
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden // 2, hidden)),
            ("self_attn.v_proj.weight", (hidden // 2, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("block_sparse_moe.gate.weight", (experts, hidden)),
        ):
            add(pre + k, shape, i)
        for e in range(experts):
            for j, (p, shape) in enumerate((("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))):
                add(f"{pre}block_sparse_moe.experts.{e}.{p}.weight", shape, 1000 * i + 10 * e + j)
        w.write(path / f"model-{i:05d}.safetensors")
    w = SafetensorsWriter()
    for name, shape in (
        ("model.embed_tokens.weight", (vocab, hidden)),
        ("lm_head.weight", (vocab, hidden)),
        ("model.norm.weight", (hidden,)),
    ):
        w.add(name, block[: int(np.prod(shape))].reshape(shape), "BF16")
        weight_map[name] = "model-extra.safetensors"
    w.write(path / "model-extra.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_conversion_memory_stays_far_below_checkpoint_size(tmp_path):
    """A checkpoint larger than RAM must convert: peak RSS grows by a few experts, not by the model."""
    src = tmp_path / "big"
    ckpt_bytes = write_big_mixtral(src)
    assert ckpt_bytes > 300e6
    # VmHWM is the peak RSS; writing 5 to clear_refs resets it to the current RSS (Linux),
    # so the number measures conversion alone, not imports or what the parent process held.
    script = textwrap.dedent(f"""
        from edgemoe.converters.convert import convert

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        open("/proc/self/clear_refs", "w").write("5")
        base = hwm()
        convert({str(src)!r}, {str(tmp_path / "out")!r}, bits=16, progress=False)
        import sys
        assert not {{"torch", "transformers", "safetensors"}} & set(sys.modules), "converter imported torch"
        print(base, hwm())
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )  # not the repo root: import the installed package
    assert out.returncode == 0, out.stderr
    base, peak = map(int, out.stdout.split())
    grown = peak - base
    print(f"checkpoint {ckpt_bytes / 1e6:.0f} MB, RSS at start {base / 1e6:.0f} MB, grew {grown / 1e6:.1f} MB")
    expert_bytes = 3 * 512 * 2048 * 2
    # working set: one expert read + its serialized blob + a copy chunk, never the model
    assert grown < 8 * expert_bytes, (grown, ckpt_bytes)
    assert grown < ckpt_bytes / 5, (grown, ckpt_bytes)
    m = load_manifest(tmp_path / "out")
    assert len(m["experts"]["blobs"]) == 48


# ---------------------------------------------------------------- format 2: symmetric kind 4, format 1 still read


def _quantized_matrices(d):
    """Every group-quantized QMatrix of a model directory: (where, buffer) for each matrix of each
    expert blob and fallback copy, and each quantized backbone tensor."""
    m = load_manifest(d)
    out = []
    for file, blobs in (
        (m["experts"]["file"], m["experts"]["blobs"]),
        (m.get("fallback", {}).get("file"), m.get("fallback", {}).get("blobs", [])),
    ):
        raw = np.fromfile(d / file, dtype=np.uint8) if file else None
        for layer, e, off, length, _, _ in blobs:
            blob = raw[off : off + length]
            out += [
                (f"{file} {layer}.{e}.{i}", blob[o : o + s])
                for i, (o, s) in enumerate(zip(*(quant.parse_blob(blob)[k] for k in ("offsets", "sizes"))))
            ]
    back = read_safetensors(d / "backbone.safetensors")
    out += [(name, np.asarray(back[name][0])) for name in m["backbone"]["quantized"]]
    return out


def test_symmetric_conversion_drops_the_mins_and_format_1_still_loads(tiny_checkpoint, tmp_path, monkeypatch):
    import functools

    import edgemoe
    from edgemoe.converters import convert as convert_module
    from edgemoe.planning.allocate import blob_nbytes

    src = tiny_checkpoint("mixtral")
    opts = dict(bits=4, backbone_bits=4, group_size=32, symmetric=True, fallback_bits=2, progress=False)
    convert(src, tmp_path / "v2", **opts)
    with monkeypatch.context() as mp:  # what the format 1 writer made: symmetric as kind 3 with its mins
        mp.setattr(quant, "quantize_matrix", functools.partial(quant.quantize_matrix, kind=quant.KIND_Q))
        mp.setattr(quant, "FORMAT_VERSION", 1)
        mp.setattr(convert_module, "FORMAT_VERSION", 1)
        convert(src, tmp_path / "v1", **opts)
    new, old = load_manifest(tmp_path / "v2"), load_manifest(tmp_path / "v1")
    assert (new["format_version"], old["format_version"]) == (quant.FORMAT_VERSION, 1)
    for d, version in ((tmp_path / "v2", quant.FORMAT_VERSION), (tmp_path / "v1", 1)):
        for f in ("experts.bin", "experts.fallback.bin"):
            assert struct.unpack("<I", (d / f).read_bytes()[8:12])[0] == version

    # every quantized matrix (experts, fallback copies, backbone): kind 4 now, the same values
    mats_new, mats_old = _quantized_matrices(tmp_path / "v2"), _quantized_matrices(tmp_path / "v1")
    assert [w for w, _ in mats_new] == [w for w, _ in mats_old] and len(mats_new) > 3 * 8
    for (where, a), (_, b) in zip(mats_new, mats_old):
        ha, hb = quant.matrix_header(a), quant.matrix_header(b)
        assert (ha["kind"], hb["kind"]) == (quant.KIND_QS, quant.KIND_Q), where
        assert hb["total_bytes"] - ha["total_bytes"] == 2 * ha["rows"] * ha["cols"] // 32, where  # exactly the mins
        np.testing.assert_array_equal(quant.dequantize_matrix(a), quant.dequantize_matrix(b), err_msg=where)

    # blob lengths: the size allocation plans with, smaller by the three matrices' mins
    H, I = new["experts"]["hidden_size"], new["experts"]["intermediate_size"]
    mins = 3 * 2 * H * I // 32
    for (*_, ln, _, _), (*_, lo, _, _) in zip(new["experts"]["blobs"], old["experts"]["blobs"]):
        assert ln == blob_nbytes(H, I, 4, 32, symmetric=True) and lo - ln == mins
    for (*_, ln, _, _), (*_, lo, _, _) in zip(new["fallback"]["blobs"], old["fallback"]["blobs"]):
        assert ln == blob_nbytes(H, I, 2, 32, symmetric=True) and lo - ln == mins
    assert new["backbone"]["bytes"] < old["backbone"]["bytes"]

    # the format 1 directory loads and gives the same logits, with and without its fallback copies
    for fb in ({}, {"fallback": 0.6}):
        a, b = edgemoe.load(tmp_path / "v2", **fb), edgemoe.load(tmp_path / "v1", **fb)
        for ids in (list(range(3, 40)), [7]):  # prefill and one-token kernels
            np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
        assert list(a.generate([3, 4, 5], max_new_tokens=6)) == list(b.generate([3, 4, 5], max_new_tokens=6))
