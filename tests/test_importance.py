"""Expert importance profiling (edgemoe/importance.py) on a tiny checkpoint: the cached-layer
measurement equals a full forward pass with the expert swapped, and importance.json's schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import _TEXT

import edgemoe
from edgemoe.cli.profile import main
from edgemoe.converters.convert import convert
from edgemoe.errors import EdgeMoEError, ModelDirectoryError
from edgemoe.format import quant
from edgemoe.planning.evaluate import perplexity, token_ids
from edgemoe.planning.importance import (
    ERROR_BITS,
    _swap_expert,
    format_report,
    load_importance,
    profile_importance,
    requantize,
    spearman,
)

WINDOW = 48


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("imp")
    src = tiny_checkpoint("mixtral")
    dst = base / "model"
    convert(src, dst, bits=16, progress=False)
    calib = base / "calib.txt"
    calib.write_text((_TEXT + "\n\x1e\n") * 2)
    doc = profile_importance(dst, calib, low_bits=[2, 3], window=WINDOW, max_tokens=None)
    return src, dst, calib, doc


def test_cached_layers_equal_a_full_forward(profiled):
    _, dst, calib, doc = profiled
    m = edgemoe.load(dst)
    base = perplexity(m, calib, window=WINDOW)["nll"]
    assert base == pytest.approx(doc["calibration"]["nll"], abs=1e-9)
    for mi, e, bits in [(0, 1, 2), (1, 3, 3), (1, 0, 2)]:
        layer = doc["moe_layers"][mi]
        m.net.moe_override = _swap_expert(m.net.moe, layer, e, requantize(m.store.read(layer, e), bits))
        nll = perplexity(m, calib, window=WINDOW)["nll"]
        m.net.moe_override = None
        assert nll - base == pytest.approx(doc["loss_increase"][str(bits)][mi][e], abs=1e-9)


def test_swapping_in_the_stored_blob_changes_nothing(profiled):
    _, dst, _, _ = profiled
    m = edgemoe.load(dst)
    ids = np.arange(3, 40)
    want = m.logits(ids)
    m.net.moe_override = _swap_expert(m.net.moe, 1, 2, m.store.read(1, 2))
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4)


def test_requantize_is_what_the_converter_writes(profiled, tmp_path):
    src, dst, _, _ = profiled
    m16 = edgemoe.load(dst)
    convert(src, tmp_path / "q3", bits=3, progress=False)
    m3 = edgemoe.load(tmp_path / "q3")
    for layer, e in [(0, 0), (1, 3)]:
        np.testing.assert_array_equal(requantize(m16.store.read(layer, e), 3), m3.store.read(layer, e))


def test_document(profiled):
    _, dst, calib, doc = profiled
    M, E = len(doc["moe_layers"]), doc["num_experts"]
    assert doc["format"] == "edgemoe-importance" and doc["version"] == 1
    assert sorted(doc["loss_increase"]) == ["2", "3"] and doc["reference"] == {"expert_bits": [16], "backbone_bits": 16}
    assert all(np.asarray(v).min() > -1e-6 for v in doc["kl"].values()), "KL is never negative"
    assert set(doc["split_half_correlation"]) == {"loss_increase", "kl"}
    for table in [
        *doc["loss_increase"].values(),
        *doc["loss_increase_stderr"].values(),
        doc["usage"],
        *doc["kl"].values(),
        *doc["kl_stderr"].values(),
        *doc["proxies"].values(),
        *doc["output_error"].values(),
    ]:
        assert np.asarray(table).shape == (M, E)
    usage = np.asarray(doc["usage"])
    tokens = len(token_ids(edgemoe.load(dst), calib))
    assert (usage.sum(axis=1) == tokens * doc["top_k"]).all()
    gate = np.asarray(doc["proxies"]["gate_mass"])
    np.testing.assert_allclose(gate.sum(axis=1), 1.0, atol=1e-5)  # top-k weights sum to 1 per token (Mixtral)
    err = [np.asarray(doc["output_error"][str(b)]) for b in ERROR_BITS]
    assert all((a > b).all() for a, b in zip(err, err[1:])), "output error must fall as bits rise"
    assert set(doc["rank_correlation"]) >= {"gate_mass", "output_norm", "output_error_2"}
    assert load_importance(dst) == json.loads((dst / "importance.json").read_text())
    assert "rank correlation" in format_report(doc)


def test_load_importance_errors(tmp_path):
    with pytest.raises(EdgeMoEError, match="edgemoe profile"):
        load_importance(tmp_path)
    (tmp_path / "importance.json").write_text(json.dumps({"format": "edgemoe-importance", "version": 99}))
    with pytest.raises(ModelDirectoryError, match="upgrade"):
        load_importance(tmp_path)


def test_spearman():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.ones(5)) is None
    assert spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833)


def test_verb(profiled, capsys):
    _, dst, calib, _ = profiled
    assert (
        main(
            [
                str(dst),
                "--importance",
                "--calib",
                str(calib),
                "--window",
                str(WINDOW),
                "--max-tokens",
                "96",
                "--no-save",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"]["max_tokens"] == 96 and doc["calibration"]["tokens"] == 96 - 2
    with pytest.raises(EdgeMoEError, match="bitwidth"):
        profile_importance(dst, calib, low_bits=5, save=False)
    assert quant.QBITS == (2, 3, 4, 8)
