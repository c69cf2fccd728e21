"""Multi-head latent attention (DeepSeek-V2/V3): the absorbed computation over the cache of
latents against the expanded one, and what the cache holds and the memory accounting counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.models.sizes import size_model
from edgemoe.runtime.memory import memory_terms


@pytest.fixture(scope="module")
def mla_model(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("deepseek_v2")  # YaRN with mscale_all_dim: the softmax scale is not 1/sqrt(d)
    dst = tmp_path_factory.mktemp("mla") / "model"
    convert(src, dst, bits=16, progress=False)
    return src, edgemoe.load(dst)


def test_absorbed_attention_matches_the_expanded_one(mla_model):
    _, m = mla_model
    net, eps = m.net, m.config.rms_norm_eps
    a = net.layers[1].attn
    assert a.rope_order is not None and net.rope.attention_factor == 1.0 and a.scale != (16 + 8) ** -0.5
    x = np.random.default_rng(0).standard_normal((20, m.config.hidden_size)).astype(np.float32)
    want = reference.latent_attention(a, x, net.rope.inv_freq, net.rope.attention_factor, eps)
    kv = net.new_kv_cache()
    got = a(x, net.rope, kv, 1, 0, eps)  # prefill
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    kv = net.new_kv_cache()
    a(x[:-3], net.rope, kv, 1, 0, eps)
    for t in range(17, 20):  # decode, one token at a time from the cache
        np.testing.assert_allclose(a(x[t : t + 1], net.rope, kv, 1, t, eps), want[t : t + 1], atol=2e-5, rtol=1e-4)


def test_the_rope_scaling_factor_reaches_the_keys(tiny_checkpoint, tmp_path):
    """V3's tiny config has mscale != mscale_all_dim: cos and sin are scaled, so q . k_rope by its square."""
    convert(tiny_checkpoint("deepseek_v3"), tmp_path / "m", bits=16, progress=False)
    m = edgemoe.load(tmp_path / "m")
    net, eps = m.net, m.config.rms_norm_eps
    assert net.rope.attention_factor != 1.0
    a = net.layers[0].attn
    x = np.random.default_rng(1).standard_normal((12, m.config.hidden_size)).astype(np.float32)
    want = reference.latent_attention(a, x, net.rope.inv_freq, net.rope.attention_factor, eps)
    np.testing.assert_allclose(a(x, net.rope, net.new_kv_cache(), 0, 0, eps), want, atol=2e-5, rtol=1e-4)


def test_the_cache_holds_one_latent_per_token_and_the_accounting_counts_it(mla_model):
    src, m = mla_model
    cfg = json.loads((src / "config.json").read_text())
    m.logits(list(range(3, 40)))
    width = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]  # 32 + 8, not 2 x 4 heads x (16 + 8 | 12)
    assert all(k.shape == (1, 256, width) for k in m.kv.k) and m.kv.v is m.kv.k
    assert m.config.kv_values_per_token() == cfg["num_hidden_layers"] * width
    held = m.kv.nbytes()
    assert held == 256 * cfg["num_hidden_layers"] * width * 4
    terms = memory_terms(
        experts=0,
        backbone=0,
        expert_slots=0,
        kv_values_per_token=size_model(cfg).kv_values_per_token,
        heads=1,
        hidden=1,
        top_k=1,
        context_tokens=37,
    )
    assert terms["kv_cache"] == held


def test_multi_token_prediction_layers_are_left_out(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints carry num_nextn_predict_layers layers after the last one."""
    import shutil

    from edgemoe.errors import CheckpointError
    from edgemoe.format.safetensors import read_safetensors, write_safetensors

    src = tiny_checkpoint("deepseek_v3")
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    assert cfg["num_nextn_predict_layers"] == 1
    for extra, ok in ((n, True), (n + 1, False)):
        ck = tmp_path / f"ck{extra}"
        shutil.copytree(src, ck)
        write_safetensors(
            ck / "mtp.safetensors", {f"model.layers.{extra}.eh_proj.weight": (np.zeros((4, 8), np.float32), "F32")}
        )
        (ck / "model.safetensors.index.json").unlink()  # found by globbing the *.safetensors
        if ok:
            convert(ck, tmp_path / f"out{extra}", progress=False)
            back = read_safetensors(tmp_path / f"out{extra}" / "backbone.safetensors")
            assert not any(k.startswith(f"layers.{n}.") for k in back)
        else:
            with pytest.raises(CheckpointError, match=f"layer {extra}, but config.json says the model has {n} layers"):
                convert(ck, tmp_path / f"out{extra}", progress=False)


def test_released_configs_read_as_published():
    """DeepSeek-V2-Lite's YaRN (factor 40, mscale_all_dim 0.707) scales the softmax as well."""
    from published_configs import PUBLISHED

    from edgemoe.models import deepseek

    lite = deepseek.Config.from_dict(PUBLISHED["DeepSeek-V2-Lite"][0])
    assert lite.q_lora_rank is None and lite.topk_method == "greedy" and lite.scoring == "softmax"
    assert lite.rope_scaling is not None and lite.rope_scaling["original_max_position_embeddings"] == 4096
    assert lite.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)
    assert lite.kv_values_per_token() == 27 * (512 + 64)
    v3 = deepseek.Config.from_dict(PUBLISHED["DeepSeek-V3"][0])
    assert (v3.topk_method, v3.scoring, v3.n_group, v3.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert v3.norm_topk_prob and v3.routed_scaling_factor == 2.5 and v3.rope_interleave


def test_inconsistent_groups_are_refused_by_name():
    from published_configs import PUBLISHED

    from edgemoe.errors import ModelDirectoryError
    from edgemoe.models import deepseek

    with pytest.raises(ModelDirectoryError, match="n_routed_experts, n_group, topk_group"):
        deepseek.Config.from_dict({**PUBLISHED["DeepSeek-V3"][0], "n_group": 7})


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=40.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),  # DeepSeek-V2-Lite
        dict(factor=8.0, mscale=1.0, mscale_all_dim=0.8),
        dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False),  # gpt-oss
        dict(factor=4.0, attention_factor=1.3),
    ],
)
def test_yarn_frequencies_are_transformers(params):
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgemoe.models.blocks import yarn_frequencies

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 4096, **params}
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v3", qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=rope
    )
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
    got, factor = yarn_frequencies(64, 10000.0, {**rope, "max_position_embeddings": 163840})
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-7)
    assert factor == pytest.approx(want_factor)
