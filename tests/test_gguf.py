"""GGUF import: llama.cpp's files (made here by llama.cpp's own convert_hf_to_gguf.py from tiny
checkpoints) converted by edgemoe. Q4_0/Q8_0 blocks carried over value for value, the other
types quantized again with the error reported, the tokenizer rebuilt from the metadata, the
logits against transformers, and (with llama-cpp-python installed) against llama.cpp on the
very same file."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tiny import ARCHS, reference_model

import edgemoe
from edgemoe import _core, models
from edgemoe.bench import llama_cpp as peers
from edgemoe.converters.convert import convert
from edgemoe.converters.gguf import GGUFWeight, Report, interleaved_to_halves, plan_gguf
from edgemoe.errors import CheckpointError, UnsupportedArchitectureError
from edgemoe.format import quant
from edgemoe.runtime.paths import cache_root

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts; 123 + 4567 = 4690!",
    "def add(a, b):\n    return a + b\n\n  indented   spaces\tand tabs",
    "Ünïcödé, emoji \U0001f600 and 日本語 text, don't won't it's",
]


# the tiny architectures whose GGUF layout edgemoe knows (models.GGUF_ALIASES)
GGUF_ARCHS = [a for a in ARCHS if models.ALIASES.get(a) in models.GGUF_ALIASES.values()]
# llama.cpp's qwen2moe has an MoE block in every layer (its converter refuses dense ones). Its converter
# writes deepseek2's sigmoid scoring only when config.json says scoring_func (released V3 configs do;
# transformers 5 does not), and one YaRN temperature: mscale == mscale_all_dim, as in released configs.
# llama.cpp's gpt-oss graph fixes the SwiGLU's alpha and limit to the released 1.702 and 7, and rounds
# YaRN's correction range out to whole dimensions (transformers' truncate, its default; released
# gpt-oss configs say false, which a GGUF does not carry: test_gpt_oss_yarn_runs_as_llama_cpp_does)
YARN_V3 = dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=32)
YARN_OSS = dict(rope_type="yarn", rope_theta=1.5e5, factor=8.0, original_max_position_embeddings=32, beta_fast=32.0)
OVERRIDES = {
    "qwen2_moe": {"mlp_only_layers": []},
    "deepseek_v3": {"scoring_func": "sigmoid", "rope_parameters": dict(YARN_V3, mscale=0.8, mscale_all_dim=0.8)},
    "gpt_oss": {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rope_parameters": YARN_OSS},
}


def ids_for(vocab: int, n: int = 20, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


# ---------------------------------------------------------------- the exact carry-over


@pytest.mark.parametrize("qtype,bits", [(QT.Q4_0, 4), (QT.Q8_0, 8)])
def test_q4_0_and_q8_0_carry_over_exactly(qtype, bits):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 160)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block: scale 0
    raw = gguf.quants.quantize(w, qtype)  # [48, 5 blocks * block bytes], llama.cpp's reference quantizer
    values = gguf.quants.dequantize(raw, qtype)
    weight = GGUFWeight("t", qtype.name, raw, (48, 160), Report())
    buf = weight.exact_matrix(bits, 32)
    assert buf is not None
    h = quant.matrix_header(buf)
    assert (h["kind"], h["bits"], h["group_size"]) == (quant.KIND_QS, bits, 32)
    # the same values, bit for bit, as the gguf package's dequantization of the blocks
    assert np.array_equal(quant.dequantize_matrix(buf), values)
    # and the codes are the blocks' own bytes (Q4_0 packs nibbles as edgemoe does; Q8_0 is offset by 128)
    blocks = raw.reshape(48, 5, -1)
    codes = buf[h["codes_offset"] : h["codes_offset"] + 48 * 5 * quant.CHUNK_BYTES[bits]].reshape(48, 5, -1)
    assert np.array_equal(codes, blocks[..., 2:] ^ np.uint8(0x80) if bits == 8 else blocks[..., 2:])
    # the native kernels read it: the matmul agrees with the exact values
    x = rng.standard_normal((3, 160)).astype(np.float32)
    np.testing.assert_allclose(
        _core.qmatrix_matmul(x, buf), x @ values.T, rtol=2e-2, atol=2e-2 * np.abs(x @ values.T).max()
    )
    # no carry-over at another bitwidth or group size: those are quantized again
    assert weight.exact_matrix(8 if bits == 4 else 4, 32) is None and weight.exact_matrix(bits, 64) is None


def test_other_types_are_requantized_and_the_error_reported():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    report = Report()
    raw = gguf.quants.quantize(w, QT.Q5_0)
    weight = GGUFWeight("experts.gate", "Q5_0", raw, (32, 128), report)
    buf = weight.encode(4, 32, symmetric=False)
    src = gguf.quants.dequantize(raw, QT.Q5_0)
    ours = quant.dequantize_matrix(buf)
    want = np.sqrt(np.sum((ours.astype(np.float64) - src) ** 2) / np.sum(src.astype(np.float64) ** 2))
    s = report.summary()["experts.gate"]
    assert s["gguf_types"] == {"Q5_0": 1} and s["exact"] == 0
    assert s["relative_rms_error"] == pytest.approx(want, rel=1e-9) and 0.01 < want < 0.2
    # kept as 16 bits it is dequantized to f16, with the rounding reported too
    weight.encode(16, 32, symmetric=False)
    assert report.summary()["experts.gate"]["stored_as"]["F16"] == 1


def test_llama_q_k_rows_put_back():
    # convert_hf_to_gguf.py reorders each head's rows (halves -> interleaved pairs) for llama's RoPE
    heads, hd, cols = 4, 8, 5
    w = np.arange(heads * hd * cols, dtype=np.float32).reshape(heads * hd, cols)
    permuted = w.reshape(heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(permuted[interleaved_to_halves(heads * hd, heads)], w)


# ---------------------------------------------------------------- files made by llama.cpp's converter

try:
    import llama_cpp  # noqa: F401

    has_llama_cpp = True
except ImportError:
    has_llama_cpp = False


@pytest.fixture(scope="session")
def gguf_file(tiny_checkpoint, tmp_path_factory):
    """gguf_file(arch, outtype, **overrides) -> a GGUF written by llama.cpp's convert_hf_to_gguf.py
    (fetched once per machine from llama-cpp-python's source package) from a tiny checkpoint."""
    made: dict = {}
    shared = cache_root() / "peers"
    shared.mkdir(parents=True, exist_ok=True)

    # every type a test asks for, converted together on the first request for a checkpoint
    outtypes = ("f32", "q8_0", "f16") if has_llama_cpp else ("f32", "q8_0")

    def make(arch: str, outtype: str = "f32", **overrides):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            hf = tiny_checkpoint(arch, **overrides)
            d = tmp_path_factory.mktemp(f"gguf_{arch}")
            made[key] = (hf, peers.hf_to_ggufs(hf, {t: d / f"{arch}-{t}.gguf" for t in outtypes}, shared))
        hf, files = made[key]
        return hf, files[outtype]

    return make


def reference_logits(hf, ids):
    with torch.no_grad():
        return reference_model(hf)(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_f32_gguf_matches_transformers(arch, gguf_file, tmp_path):
    """Metadata -> config, tensor names, llama's q/k rows: an F32 file gives transformers' logits."""
    hf, path = gguf_file(arch, "f32", **OVERRIDES.get(arch, {}))
    m = convert(path, tmp_path / "m", progress=False)
    assert m["source"]["format"] == "gguf" and m["quantization"]["bits"] == 16
    assert m["quantization"]["float_dtype"] == "f32" and m["backbone"]["bits"] == 16
    assert all(s["exact"] == s["tensors"] for s in m["source"]["tensors"].values())
    model = edgemoe.load(tmp_path / "m")
    ids = ids_for(model.config.vocab_size)
    diff = np.abs(model.logits(ids) - reference_logits(hf, ids)).max()
    assert diff < 2e-3, f"{arch}: logits differ from transformers by {diff}"


def test_gpt_oss_yarn_runs_as_llama_cpp_does(gguf_file, tmp_path, capsys):
    """A GGUF keeps YaRN's factor, original context and betas but not transformers' `truncate`
    (false in released gpt-oss configs), and llama.cpp's gpt-oss graph scales cos and sin by
    0.1 ln(factor) + 1 whatever the file's yarn_attn_factor says: the import runs what llama.cpp
    runs (its correction range rounded out to whole dimensions, the default factor) and says so."""
    released = dict(YARN_OSS, truncate=False, attention_factor=1.5)
    hf, path = gguf_file("gpt_oss", "f32", **dict(OVERRIDES["gpt_oss"], rope_parameters=released))
    convert(path, tmp_path / "m", progress=False)
    assert "rope.scaling.yarn_attn_factor = 1.5; llama.cpp's gpt-oss graph runs 1.20794" in capsys.readouterr().err
    model = edgemoe.load(tmp_path / "m")
    ids = ids_for(model.config.vocab_size)
    ours = model.logits(ids)
    with torch.no_grad():  # the same weights with llama.cpp's YaRN: rounded range, default factor
        as_llama_cpp = reference_model(hf, rope_parameters=YARN_OSS)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - as_llama_cpp).max() < 2e-3
    assert np.abs(ours - reference_logits(hf, ids)).max() > 0.1  # transformers runs the config's own


def test_q8_0_carried_over(gguf_file, tmp_path):
    """qwen2_moe (shared expert, q/k/v biases) at Q8_0: every expert and matrix keeps the file's values."""
    hf, path = gguf_file("qwen2_moe", "q8_0", **OVERRIDES["qwen2_moe"])
    plan = plan_gguf(path)
    assert plan.moe_layers == [0, 1, 2] and plan.config["mlp_only_layers"] == []
    assert plan.config["shared_expert_intermediate_size"] == 128 and plan.config["qkv_bias"]
    m = convert(path, tmp_path / "m", progress=False)
    assert m["quantization"]["bits"] == 8 and m["quantization"]["group_size"] == 32 and m["quantization"]["symmetric"]
    tensors = m["source"]["tensors"]
    for cls in ("experts.gate", "experts.up", "experts.down", "attn_q", "ffn_shared_down", "output"):
        assert tensors[cls]["gguf_types"] == {"Q8_0": tensors[cls]["tensors"]}, cls
        assert tensors[cls]["exact"] == tensors[cls]["tensors"], cls
    reader = gguf.GGUFReader(path)
    stacked = {t.name: t for t in reader.tensors}
    blobs = {(b[0], b[1]): b for b in m["experts"]["blobs"]}
    data = (tmp_path / "m" / "experts.bin").read_bytes()
    for layer, e in ((0, 0), (2, 7)):
        _, _, off, length, bits, _ = blobs[(layer, e)]
        blob = np.frombuffer(data[off : off + length], np.uint8)
        for mat, role in zip(quant.expert_matrices(blob), ("gate", "up", "down")):
            t = stacked[f"blk.{layer}.ffn_{role}_exps.weight"]
            assert np.array_equal(mat, gguf.quants.dequantize(t.data[e], QT.Q8_0)), (layer, e, role)
    # and the model runs close to transformers (8-bit weights)
    model = edgemoe.load(tmp_path / "m")
    ids = ids_for(model.config.vocab_size)
    ref = reference_logits(hf, ids)
    assert np.abs(model.logits(ids) - ref).max() < 0.1 * np.abs(ref).max()


def test_tokenizer_from_metadata_matches_the_checkpoints(gguf_file, tmp_path):
    from tokenizers import Tokenizer

    hf, path = gguf_file("mixtral", "q8_0")
    m = convert(path, tmp_path / "m", progress=False)
    assert m["tokenizer"]["bos_token_id"] == 0 and m["tokenizer"]["eos_token_ids"] == [1]
    ours = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(hf / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == theirs.decode(ids)
    model = edgemoe.load(tmp_path / "m")
    assert model.decode(model.encode(TEXTS[0])) == TEXTS[0]
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>"


@pytest.fixture(scope="session")
def spm_gguf(tmp_path_factory):
    """A tiny Mixtral whose tokenizer is a SentencePiece BPE model (tokenizer.model, byte fallback,
    as Mixtral's own): llama.cpp's converter writes it as a `llama` vocabulary with scores."""
    import io
    import shutil

    import sentencepiece
    import tiny

    hf = tmp_path_factory.mktemp("hf_spm") / "mixtral"
    tiny.make_checkpoint("mixtral", hf)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / f).unlink(missing_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny._TEXT.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (hf / "tokenizer.model").write_bytes(model.getvalue())
    out = peers.hf_to_gguf(hf, hf.parent / "mixtral-spm.gguf", cache_root() / "peers", "q8_0")
    shutil.rmtree(hf)
    return out, model.getvalue()


def test_sentencepiece_vocabulary_matches_sentencepiece(spm_gguf, tmp_path):
    import sentencepiece
    from tokenizers import Tokenizer

    path, proto = spm_gguf
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "llama"
    convert(path, tmp_path / "m", progress=False)
    ours = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    for text in TEXTS + [" leading space", ""]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert ours.decode(ids) == text
    bos = int(gguf.GGUFReader(path).fields["tokenizer.ggml.bos_token_id"].contents())
    assert ours.encode("a b").ids == [bos] + sp.encode("a b")  # llama.cpp adds BOS for a `llama` vocabulary


def test_cli_reports_what_it_did(gguf_file, tmp_path, capsys):
    from edgemoe.cli import main

    _, path = gguf_file("mixtral", "q8_0")
    argv = [
        "convert",
        str(path),
        "-o",
        str(tmp_path / "m4"),
        "--bits",
        "4",
        "--backbone-bits",
        "8",
        "--fallback-bits",
        "2",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "experts.gate" in err and "Q8_0 x8" in err and "4-bit g32 asymmetric" in err and "relative RMS error" in err
    m = json.loads((tmp_path / "m4" / "manifest.json").read_text())
    s = m["source"]["tensors"]
    assert s["experts.down"]["exact"] == 0 and 0 < s["experts.down"]["relative_rms_error"] < 0.2
    assert s["attn_q"]["exact"] == s["attn_q"]["tensors"]  # Q8_0 at 8 bits: carried over
    assert s["tok_embeddings"]["stored_as"] == {"F16": 1}
    assert m["fallback"]["bits"] == 2 and len(m["fallback"]["blobs"]) == len(m["experts"]["blobs"])


# ---------------------------------------------------------------- bad files


def _rewrite(src, dst, arch=None, drop=(), retype=None):
    """A copy of GGUF `src` with another general.architecture, tensors dropped, or one tensor
    stored as another raw type (name, numpy array, GGMLQuantizationType)."""
    r = gguf.GGUFReader(src)
    old_arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch or old_arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(old_arch + ".", (arch or old_arch) + ".", 1), f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        if retype and t.name == retype[0]:
            w.add_tensor(t.name, retype[1], raw_dtype=retype[2])
            continue
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_files_get_named_errors(gguf_file, tmp_path):
    _, path = gguf_file("mixtral", "q8_0")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or damaged|is truncated"):
        convert(cut, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    cut.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="download it again"):
        convert(cut, tmp_path / "a", progress=False)

    other = _rewrite(path, tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(
        UnsupportedArchitectureError,
        match="'bert'.*edgemoe imports GGUF files of deepseek2, gpt-oss, granitemoe, llama, olmoe",
    ):
        convert(other, tmp_path / "b", progress=False)

    i32 = np.zeros((32, 64), np.int32)
    odd = _rewrite(path, tmp_path / "i32.gguf", retype=("blk.0.attn_q.weight", i32, QT.I32))
    with pytest.raises(
        CheckpointError, match="blk.0.attn_q.weight .* stored as I32.*requantize the file with llama-quantize"
    ):
        convert(odd, tmp_path / "c", progress=False)

    missing = _rewrite(path, tmp_path / "missing.gguf", drop=("blk.1.ffn_down_exps.weight",))
    with pytest.raises(CheckpointError, match="no blk.1.ffn_down_exps.weight"):
        convert(missing, tmp_path / "d", progress=False)

    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint|not a directory"):
        convert(notgguf, tmp_path / "e", progress=False)


def test_deepseek2_kv_b_is_joined_from_its_halves_and_a_missing_half_is_named(gguf_file, tmp_path):
    hf, path = gguf_file("deepseek_v2", "f32")
    plan = plan_gguf(path)
    cfg = plan.config
    heads, nope, v, rank = 4, cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    assert (nope, v, rank, cfg["qk_rope_head_dim"]) == (16, 12, 32, 8)
    from safetensors import safe_open

    want = None
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            if "model.layers.1.self_attn.kv_b_proj.weight" in st.keys():
                want = st.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").float().numpy()
    assert want is not None and want.shape == (heads * (nope + v), rank)
    np.testing.assert_array_equal(plan.weights["layers.1.attn_kv_b"].float32(), want)
    half = _rewrite(path, tmp_path / "half.gguf", drop=("blk.1.attn_v_b.weight",))
    with pytest.raises(CheckpointError, match="no tensor blk.1.attn_v_b.weight .*layers.1.attn_kv_b"):
        convert(half, tmp_path / "a", progress=False)


# ---------------------------------------------------------------- against llama.cpp itself


def llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32), llm


# llama.cpp's logits differ from ours by its f16 KV cache and, with quantized weights, by how each
# engine rounds the activations before a quantized matmul (llama.cpp: 8-bit blocks of 32). Per
# position, the largest difference relative to the largest logit: with float weights every position
# stays under FLOAT_BOUND; with the same quantized weights the median stays under QUANT_MEDIAN and at
# most one position in ten above QUANT_BOUND, where that rounding flipped a near-tied expert.
FLOAT_BOUND, QUANT_MEDIAN, QUANT_BOUND = 5e-3, 2e-2, 5e-2
# The tiny DeepSeek models run more quantized matmuls in a chain (q_a -> q_b, kv_a, the shared expert)
# and are touchier: from the F32 file to its Q8_0 both engines move by 5% median (5.3e-2 edgemoe,
# 5.2e-2 llama.cpp, V3), while they stay 2.0e-2 apart on the Q8_0 file (2.1-2.6e-2 at Q8_0 and Q4_0);
# near-tied experts flip at up to 3 positions in 20 (V2 at Q4_0)
QUANT_LIMITS = {a: (3e-2, 0.2) for a in ("deepseek_v2", "deepseek_v3")}  # median bound, share above QUANT_BOUND
# llama.cpp's olmoe normalizes k over all heads' width, so it needs as many kv heads as heads (as OLMoE has)
LLAMA_OVERRIDES = {**OVERRIDES, "olmoe": {"num_key_value_heads": 4}}
# llama.cpp's deepseek2 reads q_lora_rank unless the model has V2-Lite's 26 or 27 layers, and ranks
# expert groups by their two best scores (V3's rule) for V2 too, where DeepSeek-V2 takes the best one:
# edgemoe keeps DeepSeek's rule, so the comparison runs a V2 with a low-rank q and no groups
LLAMA_OVERRIDES["deepseek_v2"] = {"q_lora_rank": 48, "n_group": 1, "topk_group": 1, "topk_method": "greedy"}


def relative_differences(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Per position, max |ours - theirs| over the vocabulary divided by the largest |logit|."""
    return np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max()


@pytest.mark.peers
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_logits_match_llama_cpp_on_the_same_file(arch, outtype, gguf_file, tmp_path):
    pytest.importorskip("llama_cpp")
    overrides = LLAMA_OVERRIDES.get(arch, {})
    if outtype == "q4_0":
        _, f16 = gguf_file(arch, "f32", **overrides)
        path = peers.quantize_gguf(f16, tmp_path / f"{arch}-Q4_0.gguf", "Q4_0")
    else:
        _, path = gguf_file(arch, outtype, **overrides)
    m = convert(path, tmp_path / "m", progress=False)
    if outtype in ("q8_0", "q4_0"):
        experts = m["source"]["tensors"]["experts.gate"]
        assert experts["exact"] == experts["tensors"], experts
    model = edgemoe.load(tmp_path / "m")
    ids = ids_for(model.config.vocab_size)
    theirs, llm = llama_logits(path, ids)
    rel = relative_differences(model.logits(ids), theirs)
    where = f"{arch} {outtype}: logits differ from llama.cpp's by {np.round(rel, 4).tolist()} (relative)"
    if outtype in ("f32", "f16"):
        assert rel.max() < FLOAT_BOUND, where
    else:
        median, share = QUANT_LIMITS.get(arch, (QUANT_MEDIAN, 0.1))
        assert np.median(rel) < median and np.mean(rel > QUANT_BOUND) <= share, where
    # the tokenizer too: llama.cpp's and the rebuilt tokenizer.json split text the same way
    assert_same_tokens(llm, tmp_path / "m")


def assert_same_tokens(llm, model_dir):
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in TEXTS:
        for add_bos in (False, True):
            want = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
            assert ours.encode(text, add_special_tokens=add_bos).ids == want, (text, add_bos)


@pytest.mark.peers
def test_sentencepiece_vocabulary_matches_llama_cpp(spm_gguf, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _ = spm_gguf
    convert(path, tmp_path / "m", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert_same_tokens(llm, tmp_path / "m")


def test_counts_past_the_end_of_the_file_are_refused_quickly(tmp_path):
    """A damaged count in the header (here: an array of 2^40 strings in a file of a few bytes)
    is refused before the gguf package's reader trusts it (it looped for minutes, its memory
    growing, on such a file the fuzzer made)."""
    import struct
    import time

    from edgemoe.converters.gguf import GGUFFile

    key = b"tokenizer.ggml.tokens"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    cases = {
        "array": head + struct.pack("<IIQ", 9, 8, 1 << 40) + struct.pack("<Q", 1) + b"a",
        "string": head + struct.pack("<IQ", 8, 1 << 50) + b"abc",
        "tensors": b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0) + b"\0" * 32,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match="runs past the end|damaged"):
            GGUFFile(path)
        assert time.monotonic() - t0 < 5, name
