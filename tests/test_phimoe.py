"""What Phi-MoE and Granite-MoE need beyond the shared blocks, each against transformers' own
code: the sparse mixer's routing, LongRoPE's frequencies and its context limit, the lookahead
router input through a LayerNorm, and Granite's fused experts read without a rename."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import prompt_ids
from tiny import reference_model, tiny_config

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.errors import ModelDirectoryError
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
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=65)  # past the original context of 64
    params = cfg.rope_parameters
    rope = Rope(16, params["rope_theta"], {**params, "max_position_embeddings": cfg.max_position_embeddings})
    np.testing.assert_allclose(rope.inv_freq, short.numpy(), rtol=1e-6)
    assert rope.long is not None and not np.allclose(short.numpy(), long.numpy())
    np.testing.assert_allclose(rope.long[0], long.numpy(), rtol=1e-6)
    # transformers' Phi-MoE scales cos and sin by short_mscale, and long_mscale past the original context
    assert (rope.attention_factor, rope.long[1], rope.switch_at) == (1.1, 1.3, 64)
    assert not rope.recomputes(0, 65) and not rope.recomputes(65, 1)  # long from the start, or already
    assert rope.recomputes(64, 1) and rope.recomputes(10, 55) and not rope.recomputes(10, 54)


def test_longrope_factors_must_fit_the_head():
    scaling = dict(rope_type="longrope", original_max_position_embeddings=64, short_factor=[1.0] * 8)
    with pytest.raises(ModelDirectoryError, match="long_factor has 4 values for a head of 16 dims"):
        Rope(16, 1e4, {**scaling, "long_factor": [1.0] * 4, "factor": 2.0})


def test_phi_routes_two_experts_only():
    cfg = tiny_config("phimoe", num_experts_per_tok=3).to_dict()
    with pytest.raises(ModelDirectoryError, match="sparse-mixer routing always picks two"):
        phimoe.Config.from_dict(cfg)


@pytest.fixture(scope="module")
def phi16(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("phi") / "model"
    convert(tiny_checkpoint("phimoe"), dst, bits=16, progress=False)
    return dst


# LongRoPE past the original context: a tiny Phi-MoE whose original context is 32 tokens, so
# prompts and generations cross it
ORIGINAL = 32
LONGROPE_32 = dict(tiny_config("phimoe").rope_parameters, original_max_position_embeddings=ORIGINAL)


def longrope_reference(path) -> torch.nn.Module:
    """transformers' Phi-MoE, with one correction: its rotary embedding's forward asks the rope-init
    function for the frequencies again without the sequence length, so it gets the short factors
    at every length (5.x; only the mscale switches) and drops the long ones that its own
    dynamic_rope_update has just put in inv_freq. Here the forward uses those, which is LongRoPE as
    Microsoft's Phi-MoE code and transformers 4 run it; the rest (the mscale switch, the cache
    dropped when generation crosses the original context) is transformers' own."""
    model = reference_model(path)
    rot = model.model.rotary_emb
    rot.rope_init_fn = lambda config, *args, **kwargs: (rot.inv_freq, 1.0)
    return model


@pytest.fixture(scope="module")
def phi_long(tiny_checkpoint, tmp_path_factory):
    hf = tiny_checkpoint("phimoe", rope_parameters=LONGROPE_32)
    dst = tmp_path_factory.mktemp("phi_long") / "model"
    convert(hf, dst, bits=16, progress=False)
    model = edgemoe.load(dst, kv_cache="float32")  # exact keys and values, to match transformers' logits
    model.eos_ids = set()
    return hf, model, longrope_reference(hf)


def _ids(vocab: int, n: int, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


@pytest.mark.parametrize("n", [24, 40])  # within the original context of 32, and past it
def test_longrope_logits_and_greedy_tokens_match_transformers(phi_long, n):
    _, model, ref = phi_long
    ids = _ids(model.config.vocab_size, n)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    diff = np.abs(model.logits(ids) - want).max()
    assert diff < 2e-3, f"{n} tokens: logits differ from transformers by {diff}"
    print(f"{n} tokens: max |logit difference| {diff:.2e}")
    # 24 + 24 tokens cross the original context during generation; 40 + 24 start past it
    want_tokens = greedy[0, n:].tolist()
    assert model.generate(ids, max_new_tokens=24) == want_tokens
    # and streamed under the smallest budget, with look-ahead prefetch
    bounded = edgemoe.load(model.path, memory_budget=model.min_budget, prefetch="lookahead")
    bounded.eos_ids = set()
    assert bounded.generate(ids, max_new_tokens=24) == want_tokens


def test_crossing_the_original_context_computes_the_cache_again(phi_long, monkeypatch):
    """Decoding token by token from a 28-token prompt: each step's logits are transformers' over
    the whole sequence so far, short factors up to 32 tokens and long ones for every position
    after, which needs the cached positions rotated again at the 33rd token."""
    _, model, ref = phi_long
    ids = _ids(model.config.vocab_size, 40, seed=6)
    net, kv = model.net, model.net.new_kv_cache()
    got = [net.forward(np.array(ids[:28]), kv, 0, all_logits=True)[-1]]
    for pos in range(28, 40):
        got.append(net.forward(np.array(ids[pos : pos + 1]), kv, pos, all_logits=False)[-1])
    assert kv.length == 40 and kv.tokens == ids
    with torch.no_grad():
        want = [ref(torch.tensor([ids[:end]])).logits[0, -1].numpy() for end in range(28, 41)]
    diffs = np.abs(np.array(got) - np.array(want)).max(axis=1)
    assert diffs.max() < 2e-3, diffs
    print("crossing: per-step max |logit difference|", np.array2string(diffs, precision=2))
    # had the cache kept its short-factor keys, the step past 32 tokens would be far off
    stale = net.new_kv_cache()
    net.forward(np.array(ids[:32]), stale, 0, all_logits=False)
    monkeypatch.setattr(net.rope, "recomputes", lambda start, count: False)
    off = net.forward(np.array(ids[32:33]), stale, 32, all_logits=False)[-1]
    assert np.abs(off - want[5]).max() > 20 * diffs.max()
    monkeypatch.undo()
    # a batch step where one sequence crosses and one does not gives each its own logits
    a, b = net.new_kv_cache(), net.new_kv_cache()
    net.forward(np.array(ids[:32]), a, 0, all_logits=False)
    net.forward(np.array(ids[:20]), b, 0, all_logits=False)
    both = net.forward_batch(np.array([ids[32], ids[20]]), [a, b], [32, 20])
    np.testing.assert_allclose(both[0], want[5], atol=2e-3)
    with torch.no_grad():
        np.testing.assert_allclose(both[1], ref(torch.tensor([ids[:21]])).logits[0, -1].numpy(), atol=2e-3)


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
