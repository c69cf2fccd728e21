"""The shipped default model (a Mixtral trained by tools/train): it is an ordinary
transformers checkpoint, our conversion of it matches transformers, it has learned
language (perplexity far below chance, readable greedy text) and learned routing
(layer l+1's experts predictable from layers l-1 and l), and its routing drives the
prefetcher without changing a single output token."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.planning.default_model import SHIPPED
from edgemoe.planning.evaluate import perplexity
from edgemoe.planning.routing import profile_model

pytestmark = pytest.mark.slow  # converts and profiles the 48 MB default model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """bits -> the shipped checkpoint converted at that bitwidth (8-bit with routing.json)."""
    root = tmp_path_factory.mktemp("default")
    out = {}
    for bits in (16, 8):
        out[bits] = root / f"b{bits}"
        convert(SHIPPED, out[bits], bits=bits, progress=False)
    profile_model(out[8], SHIPPED / "calib.txt", max_tokens=20_000, eval_max_tokens=8_000)
    return out


@pytest.fixture(scope="module")
def test_ids(converted):
    m = edgemoe.load(converted[16])
    return np.asarray(m.encode(SHIPPED.joinpath("test.txt").read_text()[:20_000]), np.int64)


def test_shipped_checkpoint_is_a_transformers_mixtral_and_we_match_it(converted, test_ids):
    torch = pytest.importorskip("torch")
    from transformers import MixtralForCausalLM

    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["num_hidden_layers"] >= 6 and cfg["num_local_experts"] >= 16 and cfg["num_experts_per_tok"] == 2
    ref = MixtralForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    params = sum(p.numel() for p in ref.parameters())
    assert 20e6 <= params <= 50e6, params
    ids = test_ids[:64]
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = edgemoe.load(converted[16]).logits(ids)
    assert np.abs(got - want).max() < 2e-3


def test_perplexity_is_far_below_chance(converted, test_ids):
    vocab = json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
    r16 = perplexity(edgemoe.load(converted[16]), test_ids[:3000], window=256)
    r8 = perplexity(edgemoe.load(converted[8]), test_ids[:3000], window=256)
    assert r16["ppl"] < vocab / 20, r16  # a model that learned nothing sits near the vocabulary size
    assert abs(r8["ppl"] / r16["ppl"] - 1) < 0.01, (r8["ppl"], r16["ppl"])


def test_sampled_text_is_made_of_real_words(converted):
    """Words of the shipped texts make up most of what the model writes, far more than of
    what the same tokenizer spells from random tokens (many pieces are words by chance)."""
    m = edgemoe.load(converted[8])
    known = set(
        re.findall(r"[a-z]+", ((SHIPPED / "calib.txt").read_text() + (SHIPPED / "test.txt").read_text()).lower())
    )

    def share(text):
        words = re.findall(r"[a-z]+", text.lower())
        return np.mean([w in known for w in words]), len(words)

    prompts = ["The quick brown fox", "Once upon a time", "The Linux kernel", "A fortune cookie says:", "Q:\tWhy"]
    text = " ".join(m.generate(p, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0) for p in prompts)
    model_share, n = share(text)
    rng = np.random.default_rng(0)
    chance, _ = share(m.decode(rng.integers(3, m.config.vocab_size, 5 * 64).tolist()))
    assert n >= 40, text
    assert model_share > chance + 0.2, (model_share, chance, text)  # measured: 0.73 against 0.44


def test_routing_is_learned_and_predictable(converted):
    doc = json.loads((converted[8] / "routing.json").read_text())
    E, k = doc["num_experts"], doc["top_k"]
    pred = doc["evaluation"]["predictors"]
    chance = k / E  # recall of k guesses when routing is independent of the previous layers
    assert pred["table"]["overall"]["recall_k"] > 2 * chance, pred["table"]["overall"]
    assert pred["table"]["overall"]["recall_k"] > pred["table_l"]["overall"]["recall_k"] - 0.02
    best = max(p["overall"]["operating_point"]["recall"] for p in pred.values())
    assert best > 0.8, {n: p["overall"]["operating_point"] for n, p in pred.items()}
    cover = [layer["path_coverage_20"] for layer in doc["layers"] if layer["path_coverage_20"] is not None]
    assert min(cover) > 0.4, cover  # uniform routing: about 0.2


@pytest.mark.parametrize("prefetch", ["table", "lookahead"])
def test_prefetch_on_learned_routing_hits_and_changes_nothing(converted, prefetch):
    path = converted[8]
    prompt = "def read_config(path):\n"
    want = edgemoe.load(path).generate(prompt, max_new_tokens=24)
    full = edgemoe.load(path).info()["expert_bytes"]
    m = edgemoe.load(path, memory_budget=full // 2, prefetch=prefetch)
    assert m.generate(prompt, max_new_tokens=24) == want
    s = m.stats()
    assert s["cache_misses"] > 0
    p = s["prefetch"]
    assert p["issued_bytes"] > 0 and p["recall"] > 0.5, p
