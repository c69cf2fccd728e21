"""Switch Transformers, the first encoder-decoder: T5's relative position buckets against
transformers', conversion of encoder and decoder experts into one experts file, parity of the
encoder output, the decoder logits and greedy decoding with transformers (16 bits), streaming
under a memory budget, text in and out, and `edgemoe run`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import SWITCH, make_switch_checkpoint, reference_seq2seq

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.format import quant
from edgemoe.format.manifest import blob_tables
from edgemoe.models.switch_transformers import LAYOUT, relative_buckets

NEW_TOKENS = 24
PROMPT_LEN = 20


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    """switch(name) -> (hf_path, model_dir converted at 16 bits), cached per module."""
    cache = {}

    def make(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"switch_{name}")
            src = make_switch_checkpoint(name, root / "hf")
            convert(src, root / "model", bits=16, progress=False)
            cache[name] = (src, root / "model")
        return cache[name]

    return make


def prompt_ids(vocab: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=PROMPT_LEN - 1).tolist() + [1]  # ends with </s>, as T5 inputs do


def reference_greedy(ref, ids: list[int], n: int) -> list[int]:
    """n greedy decoder tokens, one decoder call per token with transformers' cache (as its
    generate runs them, so expert capacity counts one token per call), no logits processors."""
    out = [ref.config.decoder_start_token_id]
    cache = None
    with torch.no_grad():
        enc = ref.get_encoder()(input_ids=torch.tensor([ids]))
        for _ in range(n):
            step = ref(encoder_outputs=enc, decoder_input_ids=torch.tensor([out[-1:]]), cache=cache, use_cache=True)
            cache = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
    return out[1:]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20), (16, 40)])
def test_relative_buckets_are_transformers(bidirectional, buckets, distance):
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

    rel = np.arange(-400, 401)[None, :] - np.arange(0, 3)[:, None]
    want = SwitchTransformersAttention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    ).numpy()
    np.testing.assert_array_equal(relative_buckets(rel, bidirectional, buckets, distance), want)


@pytest.mark.parametrize("name", sorted(SWITCH))
def test_encoder_and_decoder_experts_share_one_file(switch, name):
    src, dst = switch(name)
    config = json.loads((src / "config.json").read_text())
    manifest = json.loads((dst / "manifest.json").read_text())
    ex = manifest["experts"]
    enc, dec = config["num_layers"], config["num_decoder_layers"]
    assert ex["num_layers"] == enc + dec and ex["top_k"] == 1
    assert ex["moe_layers"] == LAYOUT.moe_layers(config, "switch_transformers")
    assert any(i < enc for i in ex["moe_layers"]) and any(i >= enc for i in ex["moe_layers"])
    # every expert is its two matrices (ReLU: wo(relu(wi x))), the checkpoint's values at 16 bits
    offsets, lengths, _, _ = blob_tables(manifest)
    raw = np.fromfile(dst / ex["file"], dtype=np.uint8)
    ref = reference_seq2seq(src)
    for layer in ex["moe_layers"]:
        stack, block = ("encoder", layer) if layer < enc else ("decoder", layer - enc)
        sub = 1 if stack == "encoder" else 2
        for e in (0, ex["num_experts"] - 1):
            blob = raw[offsets[layer, e] : offsets[layer, e] + lengths[layer, e]]
            assert quant.parse_blob(blob)["roles"] == ("up", "down")
            up, down = quant.expert_matrices(blob)
            expert = getattr(ref, stack).block[block].layer[sub].mlp.experts[f"expert_{e}"]
            np.testing.assert_array_equal(up, expert.wi.weight.detach().numpy())
            np.testing.assert_array_equal(down, expert.wo.weight.detach().numpy())


@pytest.mark.parametrize("name", sorted(SWITCH))
def test_parity_with_transformers(switch, name):
    src, dst = switch(name)
    ref = reference_seq2seq(src)
    model = edgemoe.load(dst)
    ids = prompt_ids(ref.config.vocab_size)
    with torch.no_grad():
        enc_want = ref.get_encoder()(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
    enc_got = model.encoder_output(ids)
    assert np.abs(enc_got - enc_want).max() < 2e-3, f"encoder max |diff| {np.abs(enc_got - enc_want).max():.2e}"

    greedy = reference_greedy(ref, ids, NEW_TOKENS)
    dec_ids = [ref.config.decoder_start_token_id] + greedy[:-1]  # teacher-forced over the continuation
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec_ids])).logits[0].numpy()
    got = model.logits(ids, decoder_ids=dec_ids)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-3, f"decoder logits max |diff| {np.abs(got - want).max():.2e}"

    model.eos_ids = set()  # the reference's argmax loop does not stop at </s> either
    assert model.generate(ids, max_new_tokens=NEW_TOKENS) == greedy


def test_expert_capacity_drops_tokens_as_transformers_does(switch):
    """The untied model's experts take 3 tokens per call: the prompt overflows some, and the
    dropped tokens (no MoE output) are part of the parity above."""
    src, _ = switch("untied")
    ref = reference_seq2seq(src)
    ids = prompt_ids(ref.config.vocab_size)
    with torch.no_grad():
        out = ref.get_encoder()(input_ids=torch.tensor([ids]), output_router_logits=True)
    choices = [
        np.bincount(r[0].argmax(-1).numpy() if r.dim() == 3 else r.argmax(-1).numpy()) for r in out.router_logits
    ]
    assert max(int(c.max()) for c in choices) > ref.config.expert_capacity


@pytest.mark.parametrize("name", sorted(SWITCH))
def test_streams_under_a_budget_with_the_same_tokens(switch, name):
    _, dst = switch(name)
    full = edgemoe.load(dst)
    ids = prompt_ids(full.config.vocab_size, seed=2)
    full.eos_ids = set()
    want = full.generate(ids, max_new_tokens=NEW_TOKENS)
    small = edgemoe.load(dst, memory_budget=full.min_budget)  # room for one expert: every other one is read again
    small.eos_ids = set()
    assert small.generate(ids, max_new_tokens=NEW_TOKENS) == want
    stats = small.stats()
    assert stats["evictions"] > 0 and stats["expert_cache_peak_bytes"] <= full.min_budget
    assert small.memory_needed(64) < full.memory_needed(64)


def test_text_in_text_out_with_the_t5_tokenizer(switch):
    src, dst = switch("tied")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    model = edgemoe.load(dst)
    text = "The quick brown fox jumps over the lazy dog."
    assert model.encode(text) == tok(text).input_ids and model.encode(text)[-1] == 1  # </s> appended
    out = model.generate(text, max_new_tokens=8)
    ids = model.generate(model.encode(text), max_new_tokens=8)
    assert isinstance(out, str) and out == model.decode(ids)


def test_edgemoe_run_and_info(switch, tmp_path):
    _, dst = switch("tied")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "run",
            str(dst),
            "-p",
            "The lazy dog",
            "-n",
            "6",
            "--memory-budget",
            "200KB",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    info = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "info", str(dst)], capture_output=True, text=True, cwd=tmp_path
    )
    assert info.returncode == 0 and "switch_transformers" in info.stdout, info.stderr


def test_routing_trace_covers_encoder_and_decoder_layers(switch):
    """A trace routes each token through the encoder and, teacher-forced, the decoder: one row per token."""
    _, dst = switch("untied")
    m = edgemoe.load(dst)
    ids = prompt_ids(m.config.vocab_size)
    trace = m.trace_routing(ids)
    layers = m.manifest["experts"]["moe_layers"]
    assert trace.experts.shape == (len(ids), len(layers), 1) and trace.moe_layers == layers
    assert (trace.experts >= 0).all() and (trace.experts < m.config.num_experts).all()


def test_lookahead_prefetch_under_a_budget_keeps_the_tokens(switch):
    _, dst = switch("untied")
    full = edgemoe.load(dst)
    ids = prompt_ids(full.config.vocab_size, seed=3)
    full.eos_ids = set()
    want = full.generate(ids, max_new_tokens=NEW_TOKENS)
    m = edgemoe.load(dst, memory_budget=2 * full.min_budget, prefetch="lookahead")
    m.eos_ids = set()
    assert m.generate(ids, max_new_tokens=NEW_TOKENS) == want


def test_perplexity_names_what_an_encoder_decoder_lacks(switch):
    from edgemoe.errors import EdgeMoEError
    from edgemoe.planning.evaluate import perplexity

    _, dst = switch("tied")
    with pytest.raises(EdgeMoEError, match="encoder-decoder.*fixed --bits"):
        perplexity(edgemoe.load(dst), "The quick brown fox jumps over the lazy dog. " * 4, window=16)


def test_quantized_experts_stream_and_fall_back(tmp_path):
    """4-bit two-matrix experts (symmetric, with 2-bit low-bit copies): the same tokens under the
    smallest budget as unbounded, and low-bit copies served for low gate weights."""
    src = make_switch_checkpoint("untied", tmp_path / "hf")
    dst = tmp_path / "q4"
    convert(src, dst, bits=4, group_size=32, symmetric=True, fallback_bits=2, progress=False)
    full = edgemoe.load(dst)
    ids = prompt_ids(full.config.vocab_size, seed=4)
    full.eos_ids = set()
    want = full.generate(ids, max_new_tokens=12)
    small = edgemoe.load(dst, memory_budget=full.min_budget)
    small.eos_ids = set()
    assert small.generate(ids, max_new_tokens=12) == want
    low = edgemoe.load(dst, memory_budget=full.min_budget, fallback=1.0)  # every miss takes its low-bit copy
    low.eos_ids = set()
    assert len(low.generate(ids, max_new_tokens=12)) == 12
    assert low.stats()["fallback"]["uses"] > 0
