"""The mixture's gate, its features, mixture.json and heldout.npz, on a tiny mixture directory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny
import tiny_mixture
import torch

from edgemoe.errors import GateMismatchError, MixtureSpecError, MixtureTokenizerError
from edgemoe.mixture.features import FeatureSpec, batch_features, prompt_features
from edgemoe.mixture.gate import Gate, restrict
from edgemoe.mixture.heldout import Heldout, mixture_loss, single_loss
from edgemoe.mixture.spec import MixtureSpec, tokenizer_sha256
from edgemoe.mixture.training import export_gate, gate_logits, score_documents, train_gate


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return tiny_mixture.make_mixture(tmp_path_factory.mktemp("mix") / "mix")


@pytest.fixture
def mix_copy(mix, tmp_path):
    dst = tmp_path / "mix"
    shutil.copytree(mix, dst)
    return dst


def test_spec_reads_the_tiny_mixture(mix):
    spec = MixtureSpec.load(mix)
    assert spec.names == list(tiny_mixture.SIZES)
    params = [s.params for s in spec.specialists]
    assert params == sorted(params) and len(set(params)) == len(params)  # sizes differ
    assert spec.gate.specialists == tuple(spec.names)
    assert spec.gate.features == tiny_mixture.FEATURES
    assert all(s.path.is_dir() for s in spec.specialists)
    assert spec.tokenizer_sha256 == tokenizer_sha256(spec.specialists[0].path)


def test_gate_export_parity_with_torch(tmp_path):
    feats = FeatureSpec(buckets=48, prompt_tokens=16)
    names = ["a", "b", "c", "d"]
    net = torch.nn.Sequential(torch.nn.Linear(48, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4))
    torch.manual_seed(3)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = export_gate(net, tmp_path / "gate.onnx", names, feats)
    gate = Gate.from_file(path, names, feats)
    x = np.abs(np.random.default_rng(0).normal(size=(37, 48))).astype(np.float32)
    ours, ref = gate.logits_from_features(x), gate_logits(net, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # and through the token-id path: one prompt, features made the same way as in training
    ids = [0, 5, 9, 9, 17, 300]
    w = gate.weights(ids)
    ref_w = torch.softmax(torch.from_numpy(gate_logits(net, prompt_features(ids, feats)[None])), -1)[0].numpy()
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)


def test_restricted_weights_are_the_full_weights_renormalised(mix):
    gate = Gate.load(mix)
    h = Heldout.load(MixtureSpec.load(mix).heldout)
    full = gate.weights_from_features(h.features)
    np.testing.assert_allclose(full.sum(1), 1.0, rtol=1e-6)
    for enabled in (["small"], ["small", "large"], ["medium", "large"], [0, 2]):
        w = gate.weights_from_features(h.features, enabled)
        mask = gate.enabled_mask(enabled)
        assert (w[:, ~mask] == 0).all()
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
        expect = full * mask / (full * mask).sum(1, keepdims=True)
        np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-7)
    prompt = h.prompt(0)
    np.testing.assert_allclose(gate.weights(prompt, ["small", "large"]), gate.weights(prompt, [0, 2]))
    with pytest.raises(ValueError, match="no specialist"):
        gate.weights(prompt, ["huge"])
    with pytest.raises(ValueError, match="enable at least one"):
        gate.weights(prompt, [])


def test_restrict_handles_large_logits():
    w = restrict(np.array([[1000.0, 999.0, -1000.0]]), np.array([True, True, False]))
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0]], rtol=1e-6)


def test_features():
    spec = FeatureSpec(buckets=64, prompt_tokens=4)
    a = prompt_features([0, 7, 7, 9, 100, 200], spec)
    assert a.shape == (64,) and a.dtype == np.float32
    np.testing.assert_allclose((a**2).sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a, prompt_features([0, 7, 7, 9], spec))  # only the first 4 tokens count
    assert not np.array_equal(a, prompt_features([0, 7, 9, 9], spec))
    assert (prompt_features([], spec) == 0).all()
    np.testing.assert_array_equal(batch_features([[0, 7, 7, 9], []], spec)[0], a)
    with pytest.raises(ValueError, match="non-negative"):
        prompt_features([3, -1], spec)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(GateMismatchError, match="kind"):
        FeatureSpec.from_dict({"kind": "bigram", "buckets": 4, "prompt_tokens": 2})


def test_heldout_logprobs_are_the_models(mix):
    """heldout.npz holds log p(true next token) as transformers computes it, token by token."""
    import transformers

    spec = MixtureSpec.load(mix)
    h = Heldout.load(spec.heldout)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(spec.specialists[1].path), dtype="float32")
    i = int(np.argmax(h.n_scored))
    p, n = int(h.prompt_len[i]), int(h.n_scored[i])
    ids = torch.from_numpy(h.tokens[i, : p + n].astype(np.int64))[None]
    with torch.no_grad():
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    expect = [lsm[p + t - 1, ids[0, p + t]].item() for t in range(n)]
    np.testing.assert_allclose(h.logprobs[i, 1, :n], expect, rtol=1e-4, atol=1e-4)
    assert (h.logprobs[i, :, n:] == 0).all()
    # the batched scorer pads on the right: a document scored alone gives the same numbers
    plen, nsc, lp = score_documents(model.eval(), [h.tokens[i, : p + n]], p, n)
    np.testing.assert_allclose(lp[0, :n], expect, rtol=1e-4, atol=1e-4)


def test_mixture_loss_matches_a_direct_sum(mix):
    h = Heldout.load(MixtureSpec.load(mix).heldout)
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(len(h.specialists)), size=len(h.domain)).astype(np.float32)
    total, count = 0.0, 0
    for d in range(len(h.domain)):
        for t in range(int(h.n_scored[d])):
            total -= np.log(sum(w[d, s] * np.exp(h.logprobs[d, s, t]) for s in range(len(h.specialists))))
            count += 1
    assert mixture_loss(h, w) == pytest.approx(total / count, rel=1e-6)
    one = np.zeros_like(w)
    one[:, 2] = 1.0
    assert mixture_loss(h, one) == pytest.approx(single_loss(h, 2), rel=1e-9)
    lp = h.logprobs[:, 2][h.mask]
    assert single_loss(h, 2) == pytest.approx(-lp.mean(), rel=1e-6)


def test_gate_learns_which_specialist_knows_which_domain():
    """Two domains with distinct prompts; specialist 0 predicts domain A well, 1 domain B."""
    rng = np.random.default_rng(0)
    feats = FeatureSpec(buckets=32, prompt_tokens=8)
    d, t = 40, 16
    prompts = [rng.integers(0, 50, 8) if i % 2 == 0 else rng.integers(50, 100, 8) for i in range(d)]
    good, bad = np.log(0.5), np.log(0.01)
    lp = np.where((np.arange(d) % 2 == 0)[:, None, None], [[good], [bad], [bad]], [[bad], [good], [bad]])
    lp = np.broadcast_to(lp, (d, 3, t)).astype(np.float32) + rng.normal(0, 0.05, (d, 3, t)).astype(np.float32)
    h = Heldout(
        ["a", "b", "c"],
        np.array(["A", "B"] * (d // 2)),
        np.zeros((d, 8 + t), np.int32),
        np.full(d, 8, np.int32),
        np.full(d, t, np.int32),
        batch_features(prompts, feats),
        lp,
    )
    net = train_gate(h, hidden=16, steps=300)
    w = torch.softmax(torch.from_numpy(gate_logits(net, h.features)), -1).numpy()
    assert (w[0::2, 0] > 0.8).all() and (w[1::2, 1] > 0.8).all()
    assert mixture_loss(h, w) < min(single_loss(h, s) for s in range(3)) - 0.5
    # trained on {b, c} only, it gives "a" nothing and puts domain B on "b"
    net2 = train_gate(h, enabled=np.array([False, True, True]), hidden=16, steps=300)
    w2 = restrict(gate_logits(net2, h.features), np.array([False, True, True]))
    assert (w2[:, 0] == 0).all() and (w2[1::2, 1] > 0.8).all()


# --- bad input ------------------------------------------------------------------------------


def test_specialist_with_another_tokenizer(mix_copy):
    other = tiny.make_tokenizer(vocab_size=300)
    other.save_pretrained(mix_copy / "specialists" / "medium")
    with pytest.raises(MixtureTokenizerError, match="'medium'.*another tokenizer"):
        MixtureSpec.load(mix_copy)
    (mix_copy / "specialists" / "medium" / "tokenizer.json").unlink()
    with pytest.raises(MixtureTokenizerError, match="no tokenizer.json"):
        MixtureSpec.load(mix_copy)
    MixtureSpec.load(mix_copy, check_tokenizers=False)  # the rest of the directory is fine


def test_gate_trained_for_other_specialists(mix_copy):
    raw = json.loads((mix_copy / "mixture.json").read_text())
    # mixture.json's gate lists other names than its specialists
    bad = json.loads(json.dumps(raw))
    bad["gate"]["specialists"] = ["small", "medium", "tiny"]
    (mix_copy / "mixture.json").write_text(json.dumps(bad))
    with pytest.raises(GateMismatchError, match="trained for specialists"):
        MixtureSpec.load(mix_copy)
    # the gate file itself was exported for other specialists (same count, other names)
    (mix_copy / "mixture.json").write_text(json.dumps(raw))
    net = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    export_gate(net, mix_copy / "gate.onnx", ["x", "y", "z"], tiny_mixture.FEATURES)
    with pytest.raises(GateMismatchError, match=r"trained for specialists \['x', 'y', 'z'\]"):
        Gate.load(mix_copy)
    # same names in another order: the outputs would go to the wrong specialists
    export_gate(net, mix_copy / "gate.onnx", ["large", "medium", "small"], tiny_mixture.FEATURES)
    with pytest.raises(GateMismatchError, match="trained for specialists"):
        Gate.load(mix_copy)
    # trained on other features
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    export_gate(net, mix_copy / "gate.onnx", ["small", "medium", "large"], FeatureSpec(buckets=16, prompt_tokens=8))
    with pytest.raises(GateMismatchError, match="features"):
        Gate.load(mix_copy)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: '{"format": 1, "specialists": [', "damaged"),
        (lambda raw: json.dumps(dict(raw, format=2)), "upgrade edgemoe"),
        (lambda raw: json.dumps({k: v for k, v in raw.items() if k != "gate"}), "'gate'"),
        (lambda raw: json.dumps(dict(raw, specialists=[])), "empty"),
        (lambda raw: json.dumps(dict(raw, top_k=7)), "top_k"),
        (lambda raw: json.dumps(dict(raw, specialists=[dict(raw["specialists"][0], params="big")])), "params"),
        (lambda raw: json.dumps(dict(raw, specialists=raw["specialists"] * 2)), "repeat"),
        (lambda raw: json.dumps(dict(raw, heldout="nothere.npz")), "missing"),
        (
            lambda raw: json.dumps(dict(raw, specialists=[dict(s, path="gone") for s in raw["specialists"]])),
            "not a dir",
        ),
        (lambda raw: "[1, 2]", "not an object"),
    ],
)
def test_damaged_mixture_json(mix_copy, damage, match):
    raw = json.loads((mix_copy / "mixture.json").read_text())
    (mix_copy / "mixture.json").write_text(damage(raw))
    with pytest.raises(MixtureSpecError, match=match):
        MixtureSpec.load(mix_copy)


def test_missing_or_damaged_files(mix_copy, tmp_path):
    with pytest.raises(MixtureSpecError, match="not a mixture directory"):
        MixtureSpec.load(tmp_path / "nothing")
    (mix_copy / "gate.onnx").write_bytes(b"\x08\x07not an onnx file" * 10)
    with pytest.raises(MixtureSpecError, match="cannot be loaded"):
        Gate.load(mix_copy)
    (mix_copy / "heldout.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MixtureSpecError, match="damaged"):
        Heldout.load(mix_copy / "heldout.npz")
