"""A layer's call to a device as one bytes object (edgemoe.cluster.server.pack_call): what
goes in comes out bit for bit, and a call that does not match its header is named."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.cluster.server import pack_call, unpack_call
from edgemoe.errors import ClusterError


def test_a_call_comes_back_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    x[0, 0] = np.float32(-0.0)
    x[1, 1] = np.float32(1e-45)  # a subnormal survives
    experts, counts, rows = np.array([7, 2]), np.array([3, 4]), np.array([0, 2, 4, 1, 1, 3, 0])
    layer, x2, e2, c2, r2 = unpack_call(pack_call(11, x, experts, counts, rows))
    assert layer == 11
    assert x2.tobytes() == x.tobytes() and x2.shape == x.shape
    assert e2.tolist() == [7, 2] and c2.tolist() == [3, 4] and r2.tolist() == rows.tolist()


def test_an_empty_call_is_a_call():
    layer, x, experts, counts, rows = unpack_call(pack_call(0, np.zeros((0, 8), np.float32), *(np.zeros(0),) * 3))
    assert (layer, x.shape, experts.size, counts.size, rows.size) == (0, (0, 8), 0, 0, 0)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:10], "shorter than its header"),
        (lambda b: b[:-4], "does not match its header"),
        (lambda b: b + b"\0" * 4, "does not match its header"),
        (lambda b: b[:-4] + np.int32(9).tobytes(), "rows outside"),  # a row index past the tokens
    ],
)
def test_a_damaged_call_is_named(damage, match):
    call = pack_call(3, np.ones((2, 4), np.float32), np.array([1]), np.array([2]), np.array([0, 1]))
    with pytest.raises(ClusterError, match=match):
        unpack_call(damage(call))
