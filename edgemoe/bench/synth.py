"""Bench models: the default model, and a random-weight Mixtral-shaped checkpoint made with
numpy (about 0.88B parameters, 0.5 GB at 4 bits) that no test data has to ship."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..converters.convert import convert
from ..format.safetensors import SafetensorsWriter
from ..planning.default_model import DEFAULT_BITS, default_model_path

# The Mixtral-shaped bench model: about 0.88B parameters, 0.5 GB at 4 bits.
MIXTRAL_SHAPED = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8000,
)


def synth_mixtral(dst: Path, seed: int = 0, std: float = 0.02, **shape: int) -> Path:
    """Write a random-weight Mixtral checkpoint (config.json + bf16 model.safetensors) with numpy."""
    cfg = dict(MIXTRAL_SHAPED, **shape)
    H, I, L, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    rng = np.random.default_rng(seed)

    def bf16(*shape: int, scale: float = std) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return (w.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16 bits

    def ones(n: int) -> np.ndarray:
        return np.full(n, 0x3F80, np.uint16)  # 1.0 in bf16

    dst.mkdir(parents=True, exist_ok=True)
    w = SafetensorsWriter()
    w.add("model.embed_tokens.weight", bf16(cfg["vocab_size"], H), "BF16")
    w.add("lm_head.weight", bf16(cfg["vocab_size"], H), "BF16")
    w.add("model.norm.weight", ones(H), "BF16")
    for i in range(L):
        p = f"model.layers.{i}."
        w.add(p + "input_layernorm.weight", ones(H), "BF16")
        w.add(p + "post_attention_layernorm.weight", ones(H), "BF16")
        w.add(p + "self_attn.q_proj.weight", bf16(H, H), "BF16")
        w.add(p + "self_attn.k_proj.weight", bf16(kv, H), "BF16")
        w.add(p + "self_attn.v_proj.weight", bf16(kv, H), "BF16")
        w.add(p + "self_attn.o_proj.weight", bf16(H, H), "BF16")
        w.add(p + "block_sparse_moe.gate.weight", bf16(E, H, scale=1.0), "BF16")
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            w.add(q + "w1.weight", bf16(I, H), "BF16")
            w.add(q + "w3.weight", bf16(I, H), "BF16")
            w.add(q + "w2.weight", bf16(H, I), "BF16")
    w.write(dst / "model.safetensors")
    config = dict(
        cfg,
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def prepare(name: str, cache: Path, bits: int | None) -> Path:
    """A converted model directory for a bench model name or path (bits None: the name's default,
    8 for the default model, 4 for the Mixtral-shaped one)."""
    if name == "default":
        return default_model_path(bits=bits or DEFAULT_BITS)
    if name == "mixtral-shaped":
        bits = bits or 4
        model = cache / f"mixtral-shaped-{bits}bit"
        if not (model / "manifest.json").exists():
            hf = cache / "mixtral-shaped-hf"
            if not (hf / "model.safetensors").exists():
                print(f"generating the random-weight Mixtral-shaped checkpoint in {hf} ...", file=sys.stderr)
                synth_mixtral(hf)
            convert(hf, model, bits=bits, overwrite=True)
        return model
    return Path(name)
