"""Low-bit fallback on a miss (HOBBIT): the converter's low-bit copies (experts.fallback.bin),
the runtime reading them for low gate weights, its statistics, and the errors on bad files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_parity import kl_per_position, prompt_ids

import edgemoe
from edgemoe import _core
from edgemoe.cli import convert as cli
from edgemoe.converters.convert import FALLBACK_FILE, add_fallback, convert
from edgemoe.converters.hf import Checkpoint, plan_conversion
from edgemoe.errors import CorruptExpertError, EdgeMoEError, ModelDirectoryError
from edgemoe.format import quant
from edgemoe.format.manifest import blob_tables, fallback_tables
from edgemoe.format.safetensors import to_float32

ARCH = "mixtral"  # 2 MoE layers x 4 experts, top-2: the second weight of a token is <= 0.5


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """(src, 4-bit with 2-bit copies, 4-bit without, 2-bit) model directories."""
    src = tiny_checkpoint(ARCH)
    root = tmp_path_factory.mktemp("fallback")
    with_fb, without, two = root / "q4fb", root / "q4", root / "q2"
    convert(src, with_fb, bits=4, backbone_bits=16, fallback_bits=2, progress=False)
    convert(src, without, bits=4, backbone_bits=16, progress=False)
    convert(src, two, bits=2, backbone_bits=16, progress=False)
    return src, with_fb, without, two


def decode_logits(model, ids) -> np.ndarray:
    """Logits [len(ids), vocab] fed one token at a time (decode: one token per moe_forward)."""
    model.reset()
    out = [model.net.forward(np.array([t]), model.kv, pos, all_logits=True)[0] for pos, t in enumerate(ids)]
    return np.stack(out)


def ids_for(model) -> list[int]:
    return prompt_ids(model.config.vocab_size, seed=3) * 3  # 3 x PROMPT_LEN tokens


# -- the converter --------------------------------------------------------------------


def test_converter_writes_checksummed_low_bit_copies(models):
    src, with_fb, without, _ = models
    m = json.loads((with_fb / "manifest.json").read_text())
    fb = m["fallback"]
    assert fb["version"] == 1 and fb["file"] == FALLBACK_FILE and fb["bits"] == 2 and fb["alignment"] == 4096
    data = (with_fb / FALLBACK_FILE).read_bytes()
    assert len(data) == fb["file_bytes"] and data[:8] == b"EDGEMOEX"
    assert int.from_bytes(data[24:32], "little") == len(fb["blobs"]) == len(m["experts"]["blobs"])
    plan = plan_conversion(Checkpoint(src))
    for layer, e, offset, length, bits, crc in fb["blobs"]:
        assert offset % 4096 == 0 and bits == 2
        blob = np.frombuffer(data, np.uint8, length, offset)
        assert _core.crc32c(blob) == crc
        # quantized from the checkpoint's own weights, not from the 4-bit copy
        got = quant.expert_matrices(blob)
        for w, g in zip(plan.expert(layer, e), got):
            want = quant.dequantize_matrix(quant.quantize_matrix(to_float32(w, plan.expert_dtype), 2, 64, False))
            np.testing.assert_array_equal(g, want)
    # The main experts file and its table are exactly those of a conversion without copies:
    # a reader that does not know "fallback" runs the same model.
    assert (with_fb / "experts.bin").read_bytes() == (without / "experts.bin").read_bytes()
    assert m["experts"] == json.loads((without / "manifest.json").read_text())["experts"]


def test_copies_only_for_experts_above_the_fallback_bits(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(ARCH)
    bits_map = {(0, 0): 2, (0, 1): 3, (0, 2): 16, (0, 3): 4, (1, 0): 8, (1, 1): 2, (1, 2): 4, (1, 3): 3}
    convert(src, tmp_path / "m", bits="auto", bits_map=bits_map, fallback_bits=3, progress=False)
    _, _, lengths, _, bits = fallback_tables(tmp_path / "m", json.loads((tmp_path / "m/manifest.json").read_text()))
    have = {(int(layer), int(e)) for layer, e in zip(*np.nonzero(lengths))}
    assert have == {k for k, b in bits_map.items() if b > 3}
    assert set(bits[lengths > 0].tolist()) == {3}


def test_add_fallback_matches_convert(models, tmp_path):
    src, with_fb, without, _ = models
    dst = tmp_path / "m"
    shutil.copytree(without, dst)
    add_fallback(src, dst, 2, progress=False)
    assert (dst / FALLBACK_FILE).read_bytes() == (with_fb / FALLBACK_FILE).read_bytes()
    assert (
        json.loads((dst / "manifest.json").read_text())["fallback"]
        == json.loads((with_fb / "manifest.json").read_text())["fallback"]
    )


def test_cli_fallback_bits(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(ARCH)
    assert cli.main([str(src), "-o", str(tmp_path / "m"), "--bits", "8", "--fallback-bits", "3", "-q"]) == 0
    fb = json.loads((tmp_path / "m/manifest.json").read_text())["fallback"]
    assert fb["bits"] == 3 and len(fb["blobs"]) == 8
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([str(src), "-o", "x", "--fallback-bits", "8"])
    with pytest.raises(EdgeMoEError, match="fallback bits must be one of"):
        convert(src, tmp_path / "n", bits=4, fallback_bits=8, progress=False)


# -- the runtime ----------------------------------------------------------------------


def test_fallback_off_and_threshold_zero_are_identical(models):
    _, with_fb, without, _ = models
    plain = edgemoe.load(without)
    budget = plain.min_budget
    ids = ids_for(plain)
    ref = decode_logits(edgemoe.load(without, memory_budget=budget), ids)
    for kwargs in ({}, {"fallback": 0.0}):
        m = edgemoe.load(with_fb, memory_budget=budget, **kwargs)
        np.testing.assert_array_equal(decode_logits(m, ids), ref)
        assert m.cache.stats()["fallback_uses"] == 0
    np.testing.assert_array_equal(edgemoe.load(with_fb, fallback=0.3).logits(ids), plain.logits(ids))


def test_fallback_under_a_small_budget(models):
    _, with_fb, without, two = models
    full = edgemoe.load(without)
    ids = ids_for(full)
    ref = decode_logits(full, ids)
    m = edgemoe.load(with_fb, memory_budget=full.min_budget, fallback=0.3)
    got = decode_logits(m, ids)
    s = m.stats()["fallback"]
    assert s["uses"] > 0 and s["loads"] > 0 and s["bytes_saved"] > 0
    c = m.cache.stats()
    assert c["fallback_loads"] <= c["loads"] and c["fallback_bytes"] <= c["bytes_read"]
    assert s["bytes_read"] == c["fallback_bytes"] and s["threshold"] == pytest.approx(0.3)
    kl = kl_per_position(ref, got)
    kl_all_low = kl_per_position(ref, decode_logits(edgemoe.load(two), ids))  # every expert at 2 bits
    assert 0 < kl.mean() < kl_all_low.mean()  # some experts ran at 2 bits, far from all of them
    assert kl.mean() < 0.35  # test_allocate.KL_MEAN_BOUND[2]: all experts at 2 bits on these models

    # Switchable: off again, the same cache gives the 4-bit model's logits.
    m.set_fallback(0)
    m.cache.clear()
    np.testing.assert_array_equal(decode_logits(m, ids), decode_logits(edgemoe.load(without), ids))


def test_a_high_weight_loads_the_full_copy(models):
    _, with_fb, _, _ = models
    m = edgemoe.load(with_fb, fallback=0.3)
    x = np.random.default_rng(0).standard_normal((2, m.config.hidden_size)).astype(np.float32)
    ids = np.array([[0, 1], [2, 1]], np.int32)
    low = np.array([[0.8, 0.2], [0.75, 0.25]], np.float32)  # expert 1 is below 0.3 for both tokens
    y_low = _core.moe_forward(m.cache, 0, x, ids, low)
    assert m.cache.contains(0, 1, low_bit=True) and not m.cache.contains(0, 1)

    def expected(blob_of):  # each expert on the tokens routed to it, as moe_forward batches them
        out = {}
        for e in np.unique(ids):
            rows = np.nonzero((ids == e).any(axis=1))[0]
            out.update({(int(t), int(e)): y for t, y in zip(rows, _core.expert_forward(x[rows], blob_of(e)))})
        return np.stack([low[t, 0] * out[t, ids[t, 0]] + low[t, 1] * out[t, ids[t, 1]] for t in range(2)])

    want = expected(lambda e: m.fallback_store.read(0, 1) if e == 1 else m.store.read(0, int(e)))
    np.testing.assert_allclose(y_low, want, rtol=1e-6, atol=1e-6)
    assert np.abs(y_low - expected(lambda e: m.store.read(0, int(e)))).max() > 1e-3  # not the full copy's
    mixed = np.array([[0.8, 0.2], [0.6, 0.4]], np.float32)  # token 1 gives expert 1 0.4: the full copy
    _core.moe_forward(m.cache, 0, x, ids, mixed)
    assert m.cache.contains(0, 1)
    uses = m.cache.stats()["fallback_uses"]
    _core.moe_forward(m.cache, 0, x, ids, low)  # the full copy is resident: it serves low weights too
    assert m.cache.stats()["fallback_uses"] == uses


# -- errors ---------------------------------------------------------------------------


def edit_manifest(model_dir, fn):
    path = model_dir / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_bad_fallback_files_and_manifests(models, tmp_path):
    _, with_fb, without, _ = models
    with pytest.raises(ModelDirectoryError, match="no low-bit fallback copies.*--fallback-bits"):
        edgemoe.load(without, fallback=0.3)
    with pytest.raises(EdgeMoEError, match="loaded without its low-bit copies"):
        edgemoe.load(with_fb).set_fallback(0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        edgemoe.load(with_fb, fallback=1.5)

    def copy(name):
        d = tmp_path / name
        shutil.copytree(with_fb, d)
        return d

    d = copy("newer")
    edit_manifest(d, lambda m: m["fallback"].update(version=2))
    with pytest.raises(ModelDirectoryError, match="version 2.*upgrade edgemoe, or load the model without fallback"):
        edgemoe.load(d, fallback=0.3)
    assert edgemoe.load(d).logits([3, 4, 5]).shape[0] == 3  # without fallback the section is not read

    d = copy("missing")
    (d / FALLBACK_FILE).unlink()
    with pytest.raises(ModelDirectoryError, match="fallback copies\\) is missing"):
        edgemoe.load(d, fallback=0.3)

    d = copy("truncated")
    with open(d / FALLBACK_FILE, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(ModelDirectoryError, match="truncated or damaged"):
        edgemoe.load(d, fallback=0.3)

    d = copy("not_fewer_bits")
    edit_manifest(d, lambda m: m["fallback"]["blobs"][1].__setitem__(4, 4))
    with pytest.raises(ModelDirectoryError, match="expert 1 of layer 0 is at 4 bits.*fewer bits than its expert"):
        edgemoe.load(d, fallback=0.3)

    d = copy("corrupt")
    m = json.loads((d / "manifest.json").read_text())
    layer, e, offset, length, _, _ = m["fallback"]["blobs"][5]
    with open(d / FALLBACK_FILE, "r+b") as f:
        f.seek(offset + length // 2)
        b = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    model = edgemoe.load(d, fallback=0.5)
    with pytest.raises(
        CorruptExpertError, match=f"expert {e} of layer {layer} failed its checksum in .*{FALLBACK_FILE}"
    ):
        _core.moe_forward(
            model.cache,
            layer,
            np.zeros((1, model.config.hidden_size), np.float32),
            np.array([[e, (e + 1) % 4]], np.int32),
            np.array([[0.1, 0.9]], np.float32),
        )


def test_old_manifest_without_fallback_still_loads(models):
    _, _, without, _ = models
    _, lengths, _, _ = blob_tables(json.loads((without / "manifest.json").read_text()))
    assert edgemoe.load(without).stats().get("fallback") is None and lengths.all()
