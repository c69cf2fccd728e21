"""Sizes from config.json alone (planning before a download): the closed-form QMatrix and blob
sizes against what the format writes, the size model against converted tiny checkpoints and
against the published parameter counts of real models, and `edgemoe info config.json`."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.format import quant

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
