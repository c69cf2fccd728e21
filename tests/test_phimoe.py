"""What Phi-MoE and Granite-MoE need beyond the shared blocks, each against transformers' own
code: the sparse mixer's routing, LongRoPE's frequencies and its context limit, the lookahead
router input through a LayerNorm, and Granite's fused experts read without a rename."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import prompt_ids
from tiny import tiny_config

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.errors import ContextLengthError, ModelDirectoryError
from edgemoe.models import phimoe
from edgemoe.models.blocks import Rope, RouteObserver
from edgemoe.runtime import trace


def _logits_with_near_ties(seed: int, T: int = 400, E: int = 8) -> np.ndarray:
    """Router logits where many experts sit near the threshold and some tie exactly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (T, E)).astype(np.float32)
    x[::7, 1] = x[::7, 0]  # exact ties: the lower id wins
    x[::5, 2] = x[::5].max(-1) * 0.97  # within a few percent of the top
    x[::11] = -np.abs(x[::11])  # all negative: the threshold's |logit| branch
    return x


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.05, 0.2])
def test_sparse_mixer_is_transformers(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    for seed in range(3):
        logits = _logits_with_near_ties(seed)
        want_w, want_ids = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
        ids, w = phimoe.sparse_mixer(logits, eps)
        assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape == (logits.shape[0], 2)
        np.testing.assert_array_equal(ids, want_ids.numpy())
        np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-6, atol=1e-7)
        if eps >= 0.05:  # the threshold lets other experts into the softmax: weights below 1
            assert (w < 0.99).mean() > 0.1


def test_longrope_frequencies_are_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config("phimoe")
    want, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg)
    params = cfg.rope_parameters
    rope = Rope(16, params["rope_theta"], {**params, "max_position_embeddings": cfg.max_position_embeddings})
    np.testing.assert_allclose(rope.inv_freq, want.numpy(), rtol=1e-6)
    # transformers' Phi-MoE scales cos and sin by short_mscale within the original context
    assert rope.attention_factor == params["short_mscale"] == 1.1 and rope.max_positions == 64


def test_longrope_factors_must_fit_the_head():
    scaling = dict(rope_type="longrope", original_max_position_embeddings=64, short_factor=[1.0] * 4)
    with pytest.raises(ModelDirectoryError, match="short_factor has 4 values for a head of 16 dims"):
        Rope(16, 1e4, scaling)


def test_phi_routes_two_experts_only():
    cfg = tiny_config("phimoe", num_experts_per_tok=3).to_dict()
    with pytest.raises(ModelDirectoryError, match="sparse-mixer routing always picks two"):
        phimoe.Config.from_dict(cfg)


@pytest.fixture(scope="module")
def phi16(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("phi") / "model"
    convert(tiny_checkpoint("phimoe"), dst, bits=16, progress=False)
    return dst


def test_past_the_original_context_is_refused_by_name(phi16):
    model = edgemoe.load(phi16)
    model.eos_ids = set()
    ids = prompt_ids(model.config.vocab_size)  # 24 tokens; the original context is 64
    # the last new token is never run through the model: 24 + 41 - 1 positions
    assert len(model.generate(ids, max_new_tokens=41)) == 41
    with pytest.raises(ContextLengthError, match="reached 65 tokens.*within 64 tokens"):
        model.generate(ids, max_new_tokens=42)
    with pytest.raises(ContextLengthError):
        model.logits(list(range(3, 70)))


def test_lookahead_reads_the_router_input_through_the_layernorm(phi16):
    """HOBBIT's look-ahead applies a layer's router to its own normed input: with a LayerNorm
    that has a bias, the routed experts of that layer are the router's top-2 there."""
    model = edgemoe.load(phi16)
    net = model.net
    seen = {}

    class Keep(RouteObserver):
        def on_route(self, layer, resid, ids, weights):
            seen[layer] = (resid.copy(), ids.copy())

    net.observer = Keep()
    model.logits(prompt_ids(model.config.vocab_size))
    net.observer = None
    assert sorted(seen) == [0, 1]
    for layer, (resid, ids) in seen.items():
        got = np.argsort(-trace.lookahead_logits(net, layer, resid), axis=-1, kind="stable")[:, :2]
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(ids, -1))
