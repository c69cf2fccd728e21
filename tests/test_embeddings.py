"""Under a memory budget the embedding table stays in the backbone file and a token's row is
read when it is needed (load(embeddings="file"), the default with a budget), unless the output
head shares the table; without a budget it is held in RAM."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.errors import EdgeMoEError
from edgemoe.format.safetensors import SafetensorsFile


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    out = {}
    for arch in ("mixtral", "qwen3_moe"):  # untied, tied
        convert(tiny_checkpoint(arch), root / arch, bits=8, progress=False)
        out[arch] = root / arch
    return out


def test_rows_from_the_file_give_the_same_logits_and_tokens(converted):
    d = converted["mixtral"]
    table = SafetensorsFile(d / "backbone.safetensors").nbytes("tok_embeddings")
    on_file, in_ram = edgemoe.load(d, embeddings="file"), edgemoe.load(d, embeddings="ram")
    assert on_file.info()["file_embedding_bytes"] == table > 0
    assert in_ram.info()["file_embedding_bytes"] == 0
    assert in_ram.backbone_bytes - on_file.backbone_bytes == table
    assert on_file.memory_needed(64) == in_ram.memory_needed(64) - table
    ids = [5, 17, 17, 3, 250, 0, 42]
    np.testing.assert_array_equal(on_file.logits(ids), in_ram.logits(ids))
    assert on_file.generate(ids, max_new_tokens=8) == in_ram.generate(ids, max_new_tokens=8)


def test_the_default_holds_the_table_only_without_a_budget(converted):
    d = converted["mixtral"]
    table = SafetensorsFile(d / "backbone.safetensors").nbytes("tok_embeddings")
    assert edgemoe.load(d).info()["file_embedding_bytes"] == 0
    budgeted = edgemoe.load(d, memory_budget="1MB")
    assert budgeted.info()["file_embedding_bytes"] == table
    assert edgemoe.load(d, memory_budget="1MB", embeddings="ram").info()["file_embedding_bytes"] == 0


def test_tied_embeddings_stay_in_ram(converted):
    m = edgemoe.load(converted["qwen3_moe"])
    assert m.info()["file_embedding_bytes"] == 0


def test_a_backbone_truncated_after_load_is_named(converted, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(converted["mixtral"], d)
    m = edgemoe.load(d, embeddings="file")
    begin, _ = SafetensorsFile(d / "backbone.safetensors").byte_range("tok_embeddings")
    with open(d / "backbone.safetensors", "r+b") as f:
        f.truncate(begin + 10)
    with pytest.raises(EdgeMoEError, match="truncated"):
        m.logits([1, 2, 3])


def test_unknown_embeddings_mode_is_refused(converted):
    with pytest.raises(ValueError, match="embeddings must be one of 'auto', 'file', 'ram'"):
        edgemoe.load(converted["mixtral"], embeddings="mmap")
