"""Sizes from config.json alone (planning before a download): the closed-form QMatrix and blob
sizes against what the format writes, the size model against converted tiny checkpoints and
against the published parameter counts of real models, and `edgemoe info config.json`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from published_configs import PUBLISHED

from edgemoe.format import quant
from edgemoe.models import SUPPORTED as ARCHS
from edgemoe.models.sizes import size_model

GRID = [(r, c) for r in (1, 32, 96) for c in (64, 128, 384)]


@pytest.mark.parametrize("bits", quant.QBITS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_qmatrix_size_is_what_quantize_matrix_writes(bits, group_size, symmetric):
    for rows, cols in GRID:
        if cols % group_size:
            continue
        w = np.zeros((rows, cols), np.float32)
        written = quant.quantize_matrix(w, bits, group_size, symmetric).nbytes
        assert quant.qmatrix_nbytes(rows, cols, bits, group_size, symmetric) == written, (rows, cols)


@pytest.mark.parametrize("kind", sorted(quant.FLOAT_KINDS))
def test_float_matrix_size_is_what_float_matrix_writes(kind):
    for rows, cols in GRID:
        assert quant.float_matrix_nbytes(rows, cols, kind) == quant.float_matrix(np.zeros((rows, cols)), kind).nbytes


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_blob_size_is_what_pack_expert_blob_makes(bits):
    for hidden, inter in ((64, 96), (128, 320), (96, 64)):
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        if bits == 16:
            mats = [quant.float_matrix(np.zeros(s, np.float32), "bf16") for s in shapes]
        else:
            mats = [quant.quantize_matrix(np.zeros(s, np.float32), bits, 32, False) for s in shapes]
        blob = quant.pack_expert_blob(0, 0, *mats)
        assert quant.expert_blob_nbytes(*(m.nbytes for m in mats)) == blob.nbytes


# ---------------------------------------------------------------- the size model against checkpoints


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_are_the_checkpoints(tiny_checkpoint, arch):
    from edgemoe.converters.hf import Checkpoint

    ckpt = Checkpoint(tiny_checkpoint(arch))
    stored = sum(math.prod(f.shape(name)) for name, f in ckpt.tensors.items() if "rotary_emb" not in name)
    assert size_model(ckpt.config).params()["total"] == stored


# ---------------------------------------------------------------- released models


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    config, total, active, with_embedding = PUBLISHED[name]
    p = size_model(config).params()
    counted = p["active"] if with_embedding else p["active"] - p["embedding"]
    assert abs(p["total"] / total - 1) < 0.01, (name, p["total"], total)
    # published active counts are rounded to 0.1B: DeepSeek-V2-Lite's 2.45B is published as 2.4B
    assert abs(counted / active - 1) < 0.025, (name, counted, active)


def test_qwen3_non_embedding_count_matches_its_card():
    config, *_ = PUBLISHED["Qwen3-30B-A3B"]
    p = size_model(config).params()
    assert abs((p["total"] - 2 * p["embedding"]) / 29.9e9 - 1) < 0.01  # "Non-Embedding: 29.9B", untied head
