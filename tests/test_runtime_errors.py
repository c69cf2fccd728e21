"""Bad input at load and run time: each gets a named error with the fix, never a crash
or a silent wrong answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.format.manifest import blob_tables


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("errors") / "model"
    convert(tiny_checkpoint("mixtral"), dst, bits=4, progress=False)
    return dst


@pytest.fixture
def copy(model_dir, tmp_path):
    """A private copy of the converted model the test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_missing_model_dir_names_convert(tmp_path):
    with pytest.raises(edgemoe.EdgeMoEError, match="edgemoe convert"):
        edgemoe.load(tmp_path / "nope")


def test_damaged_expert_names_layer_and_expert(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    offsets, lengths, _, _ = blob_tables(manifest)
    layer, expert = 1, 2
    pos = int(offsets[layer, expert]) + int(lengths[layer, expert]) // 2
    with open(copy / "experts.bin", "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))
    m = edgemoe.load(copy)  # sizes are intact: the damage shows when the blob is read
    with pytest.raises(edgemoe.CorruptExpertError, match=rf"expert {expert} of layer {layer}.*convert"):
        # route every token to the damaged expert through the public path
        for _ in range(64):
            m.generate(np.random.default_rng(0).integers(3, 500, 8).tolist(), max_new_tokens=4)
    assert isinstance(edgemoe.CorruptExpertError("x"), edgemoe.EdgeMoEError)


def test_truncated_experts_file_is_refused_at_load(copy):
    path = copy / "experts.bin"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5000)
    with pytest.raises(edgemoe.ModelDirectoryError, match="truncated.*convert"):
        edgemoe.load(copy)


def test_newer_format_version_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(edgemoe.ModelDirectoryError, match="99"):
        edgemoe.load(copy)


def test_budget_below_one_layer_states_the_minimum(model_dir):
    minimum = edgemoe.load(model_dir).min_budget
    with pytest.raises(edgemoe.BudgetError, match=f"at least .*{minimum} bytes"):
        edgemoe.load(model_dir, memory_budget=minimum - 1)
    edgemoe.load(model_dir, memory_budget=minimum)  # exactly the minimum is enough


def test_budget_strings(model_dir):
    from edgemoe.units import parse_bytes

    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="KB, MB, GB"):
        edgemoe.load(model_dir, memory_budget="lots")


def test_missing_tokenizer_only_matters_for_text(copy):
    (copy / "tokenizer.json").unlink()
    m = edgemoe.load(copy)
    assert len(m.generate([5, 6, 7], max_new_tokens=3)) <= 3  # ids still work
    with pytest.raises(edgemoe.TokenizerError, match="tokenizer.json"):
        m.generate("hello", max_new_tokens=3)


def test_out_of_vocabulary_ids_are_refused(model_dir):
    m = edgemoe.load(model_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.logits([1, 2, m.config.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        m.logits([])
