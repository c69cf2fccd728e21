"""A layer's call to a device as one bytes object (edgemoe.cluster.server.pack_call): what
goes in comes out bit for bit (or, rounded to int8, gives a 4-bit expert the same output bit
for bit), and a call that does not match its header is named."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe import _core
from edgemoe.cluster import server
from edgemoe.cluster.server import (
    FORM_FLOAT32,
    FORM_ROUNDED,
    call_form,
    pack_call,
    round_rows,
    unpack_call,
    unround_rows,
)
from edgemoe.errors import ClusterError
from edgemoe.format import quant as q

rounding_kernels = pytest.mark.skipif(
    not server.ROUNDING_KERNELS, reason=f"this build's kernels ({_core.simd()}) multiply float32 x in decode"
)


def blob(bits, gs=32, sym=True, hidden=128, inter=64, gated=True, seed=0):
    rng = np.random.default_rng(seed)

    def mat(r, c):
        return q.quantize_matrix((rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32), bits, gs, sym)

    mats = [mat(inter, hidden)] * gated + [mat(inter, hidden), mat(hidden, inter)]
    return q.pack_expert_blob(0, 0, *mats)


def hard_rows(rng, hidden=128):
    """Rows whose blocks test the rounding: values at every scale, exact ties (x * 127 / amax
    half-way between integers), several values at the block maximum, zero blocks, -0.0."""
    x = rng.standard_normal((8, hidden)).astype(np.float32)
    x[1] *= np.float32(1e-20)
    x[2] *= np.float32(1e20)
    x[3, :32] = np.arange(32, dtype=np.float32) - np.float32(15.5)  # amax 15.5 -> steps of 15.5/127
    x[4, :32] = np.float32(127) * (np.arange(32, dtype=np.float32) % 5 - 2) / 2  # amax 127: x * 1 at .5 ties
    x[5, :32] = np.float32(-3.0)  # every value at the block maximum
    x[5, 32:64] = 0.0
    x[6, 32:64] = np.float32(-0.0)
    x[7, 64:] = np.float32(1e-29)
    # block maxima m for which 127 * (m / 127) is not m in float32 (about 1 in 140 are so)
    for b, m in enumerate((7.9790745, -0.9956187, 3.9715085)):
        x[0, 32 * b : 32 * b + 32] *= np.float32(abs(m)) / np.abs(x[0, 32 * b : 32 * b + 32]).max() / 2
        x[0, 32 * b + 5] = np.float32(m)
    return x


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


@pytest.mark.parametrize("T, K, devices", [(1, 1, 1), (1, 2, 3), (1, 8, 3), (3, 2, 2), (8, 8, 4), (40, 4, 3)])
def test_a_layers_calls_group_alike_in_python_and_in_numpy(T, K, devices, monkeypatch):
    """The decode path groups its few slots in plain Python: every device's call must be the
    one numpy's grouping (the prefill path) makes, so the devices compute the same batches."""
    from edgemoe.cluster import moe

    rng = np.random.default_rng(T * 100 + K * 10 + devices)
    for _ in range(20):
        ids = np.stack([rng.choice(16, K, replace=False) for _ in range(T)])  # a token's experts differ
        where = rng.integers(-1, devices, (T, K))
        small = moe.group_slots(ids, where)
        monkeypatch.setattr(moe, "SMALL_CALL_SLOTS", 0)
        big = moe.group_slots(ids, where)
        monkeypatch.undo()
        assert [g[0] for g in small] == [g[0] for g in big] == sorted(set(where[where >= 0].tolist()))
        for a, b in zip(small, big):
            for u, v in zip(a[1:], b[1:]):
                assert np.array_equal(u, v), (a, b)
            index, slots, experts, counts, tokens, rows = a
            assert (where.reshape(-1)[slots] == index).all() and (tokens[rows] == slots // K).all()
            assert pack_call(0, np.zeros((T, 4), np.float32)[tokens], experts, counts, rows) == pack_call(
                0, np.zeros((T, 4), np.float32)[b[4]], b[2], b[3], b[5]
            )


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


# -- the socket path: a device's own TCP channel (edgemoe.cluster.channel) ----------------------
def _listener(handler):
    from edgemoe.cluster.channel import Listener

    return Listener("127.0.0.1", handler)


def _soon(seconds: float = 5.0) -> float:
    import time

    return time.monotonic() + seconds


def test_a_layer_call_over_a_channel_is_the_servers_answer_bit_for_bit():
    from edgemoe.cluster.channel import PING, Channel, receive

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4096)).astype(np.float32)  # a prefill-sized call: more than one segment
    call = pack_call(2, x, np.array([1, 4]), np.array([2, 3]), np.array([0, 2, 0, 1, 2]))

    def forward(body: bytes) -> bytes:
        _, x, _, _, rows = unpack_call(body)
        return (x[rows] * 2).tobytes()

    listener = _listener(forward)
    try:
        chs = [Channel(*listener.address, 5.0) for _ in range(2)]
        for ch in chs:
            ch.send(call, _soon())
        answers = receive(chs, _soon())
        want = (x[[0, 2, 0, 1, 2]] * 2).tobytes()
        assert answers == [want, want]
        assert chs[0].call(b"", _soon(), PING) == b"" and chs[0].call(call, _soon()) == want  # the connection stays
    finally:
        listener.close()


def test_a_servers_error_over_a_channel_is_named_and_fails_the_call():
    from edgemoe.cluster.channel import Channel

    def forward(body: bytes) -> bytes:
        raise ClusterError("device d does not hold expert 3 of layer 1")

    listener = _listener(forward)
    try:
        ch = Channel(*listener.address, 5.0)
        with pytest.raises(ClusterError, match="does not hold expert 3 of layer 1"):
            ch.call(b"call", _soon())
        assert ch.broken  # a failed call's connection is not used again
        with pytest.raises(ConnectionError):
            ch.send(b"call", _soon())
    finally:
        listener.close()


def test_a_channel_that_stalls_past_its_deadline_gives_no_answer_and_is_dropped():
    import threading
    import time

    from edgemoe.cluster.channel import Channel, receive

    release = threading.Event()

    def forward(body: bytes) -> bytes:
        release.wait(10)  # a device that stalls (swapping, a stopped process)
        return body

    listener = _listener(forward)
    try:
        ch = Channel(*listener.address, 5.0)
        t0 = time.monotonic()
        ch.send(b"late", t0 + 0.2)
        assert receive([ch], t0 + 0.2) == [None]
        assert 0.2 <= time.monotonic() - t0 < 0.4  # waited for its deadline, not for the answer
        release.set()
        assert ch.broken == "no answer by its deadline"  # the late answer is never read as another call's
    finally:
        listener.close()


def test_a_device_that_goes_away_mid_answer_fails_the_call_at_once():
    import socket
    import threading
    import time

    from edgemoe.cluster.channel import REPLY, REQUEST, Channel, receive

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def half_an_answer() -> None:  # a server killed while it answers
        conn, _ = server.accept()
        seq, _, n = REQUEST.unpack(conn.recv(REQUEST.size))
        conn.recv(n)
        conn.sendall(REPLY.pack(seq, 0, 1000) + b"\0" * 10)
        conn.close()

    threading.Thread(target=half_an_answer, daemon=True).start()
    try:
        ch = Channel(*server.getsockname()[:2], 5.0)
        t0 = time.monotonic()
        ch.send(b"call", t0 + 5)
        (answer,) = receive([ch], t0 + 5)
        assert isinstance(answer, ConnectionError) and "closed" in str(answer)
        assert time.monotonic() - t0 < 1  # not a wait for the deadline
    finally:
        server.close()


@pytest.mark.parametrize("header_bytes", [1 << 31, 1000])
def test_a_frame_naming_too_much_or_cut_short_is_a_connection_error(header_bytes):
    """recv_frame, which a device's listener and the mixture's link read with: a header
    naming more than MAX_FRAME_BYTES is not a peer of ours, a connection closed inside a frame
    is named; a connection closed between frames is the end (None)."""
    import socket

    from edgemoe.cluster.channel import MAX_FRAME_BYTES, REPLY, recv_frame

    a, b = socket.socketpair()
    try:
        b.sendall(REPLY.pack(7, 0, 3) + b"abc")
        assert recv_frame(a, REPLY) == (7, 0, bytearray(b"abc"))
        b.sendall(REPLY.pack(8, 0, header_bytes) + b"\0" * 10)
        b.close()
        with pytest.raises(ConnectionError, match="not a peer" if header_bytes > MAX_FRAME_BYTES else "closed"):
            recv_frame(a, REPLY)
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    b.close()
    assert recv_frame(a, REPLY) is None
    a.close()


def test_a_listener_with_a_priority_serves_its_calls_under_sched_fifo():
    """A device's channel threads at the priority its environment gives (the test bed sets
    one so that emulated devices do not wait behind one another for a core)."""
    import os

    from edgemoe.cluster.channel import Channel, Listener

    if not hasattr(os, "SCHED_FIFO"):
        pytest.skip("no SCHED_FIFO on this platform")

    def policy(_: bytes) -> bytes:
        return np.array([os.sched_getscheduler(0), os.sched_getparam(0).sched_priority], np.int32).tobytes()

    for priority, want in [(0, os.SCHED_OTHER), (3, os.SCHED_FIFO)]:
        listener = Listener("127.0.0.1", policy, priority)
        try:
            answer = Channel(*listener.address, 5.0).call(b"", _soon())
            got = np.frombuffer(answer, np.int32).tolist()
            if priority and listener.priority_error:  # a machine without CAP_SYS_NICE serves anyway
                assert got[0] == os.SCHED_OTHER and "SCHED_FIFO priority 3" in listener.priority_error
            else:
                assert got == [want, priority] and listener.priority_error is None
        finally:
            listener.close()


@pytest.mark.parametrize("value", ["fast", "-1", "100"])
def test_a_bad_serve_priority_is_named(value, monkeypatch):
    from edgemoe.cluster.server import SERVE_PRIORITY_ENV, serve_priority

    monkeypatch.setenv(SERVE_PRIORITY_ENV, value)
    with pytest.raises(ClusterError, match=f"{SERVE_PRIORITY_ENV}='{value}'.*from 1 to 99"):
        serve_priority()
    monkeypatch.setenv(SERVE_PRIORITY_ENV, "")
    assert serve_priority() == 0


@rounding_kernels
@pytest.mark.parametrize("sym, gs, gated", [(True, 32, True), (False, 32, True), (False, 64, True), (True, 32, False)])
def test_a_rounded_input_gives_a_4bit_expert_its_output_bit_for_bit(sym, gs, gated):
    """round_rows then unround_rows: x' differs from x, yet the decode kernels round it to the
    same int8 values and steps, so every output row is the one of x, bit for bit."""
    rng = np.random.default_rng(3)
    b = blob(4, gs, sym, gated=gated, seed=int(sym) + gs)
    assert q.input_rounds_to_int8(b)
    for x in [hard_rows(rng), *(rng.standard_normal((1, 128)).astype(np.float32) * s for s in (1e-3, 1.0, 50.0))]:
        r = round_rows(x)
        assert r is not None
        x2 = unround_rows(*r)
        assert x2.dtype == np.float32 and x2.shape == x.shape
        for i in range(len(x)):
            want = _core.expert_forward(x[i : i + 1], b)
            assert _core.expert_forward(x2[i : i + 1], b).tobytes() == want.tobytes(), f"row {i}"


def test_only_4bit_inputs_are_said_to_round_to_int8():
    for bits, sym, want in [(4, True, True), (4, False, True), (8, True, False), (3, False, False), (2, True, False)]:
        b = blob(bits, sym=sym)
        assert q.input_rounds_to_int8(b) is want, (bits, sym)
    assert not q.input_rounds_to_int8(np.zeros(256, np.uint8))  # not a blob
    mx = q.pack_expert_blob(
        0,
        0,
        *[
            q.mxfp4_matrix(np.zeros((r, c // 2), np.uint8), np.full((r, c // 32), 127, np.uint8), r, c)
            for r, c in ((64, 128), (64, 128), (128, 64))
        ],
    )
    assert not q.input_rounds_to_int8(mx)  # MXFP4: float32


def test_round_rows_declines_what_it_cannot_round_exactly():
    assert round_rows(np.zeros((1, 48), np.float32)) is None  # not whole blocks of 32
    for bad in (np.inf, np.nan):
        x = np.ones((2, 64), np.float32)
        x[1, 3] = bad
        assert round_rows(x) is None
    x = np.ones((1, 64), np.float32)
    x[0, 32:] = np.float32(1e-35)  # 127 / amax would not be a normal float
    assert round_rows(x) is None
    q8, amax = round_rows(np.zeros((1, 64), np.float32))
    assert not q8.any() and not amax.any() and not unround_rows(q8, amax).any()


def test_a_rounded_call_carries_a_quarter_of_the_bytes_and_falls_back_to_float32():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    experts, counts, rows = np.array([3, 5]), np.array([1, 1]), np.array([0, 1])
    plain, rounded = pack_call(1, x, experts, counts, rows), pack_call(1, x, experts, counts, rows, rounded=True)
    assert call_form(plain) == FORM_FLOAT32 and call_form(rounded) == FORM_ROUNDED
    assert len(plain) - len(rounded) == 2 * 1024 * 4 - 2 * (1024 + 4 * 32)
    layer, x2, e2, c2, r2 = unpack_call(rounded)
    assert layer == 1 and e2.tolist() == [3, 5] and c2.tolist() == [1, 1] and r2.tolist() == [0, 1]
    assert x2.tobytes() == unround_rows(*round_rows(x)).tobytes()
    x[1, 7] = np.nan  # round_rows declines: the call goes as float32, x as it is
    fallback = pack_call(1, x, experts, counts, rows, rounded=True)
    assert call_form(fallback) == FORM_FLOAT32 and unpack_call(fallback)[1].tobytes() == x.tobytes()
    bad = bytearray(rounded)
    bad[20:24] = np.array([7], "<i4").tobytes()
    with pytest.raises(ClusterError, match="unknown form"):
        unpack_call(bytes(bad))
    with pytest.raises(ClusterError, match="does not match its header"):
        unpack_call(rounded[:-4])


@rounding_kernels
def test_a_server_answers_a_rounded_call_bit_for_bit_and_refuses_what_would_differ():
    """One row (decode) or GEMM_MIN_TOKENS rows or more (the integer prefill, where this build
    has it) of a 4-bit expert: the answer is the float32 call's bit for bit. A rounded input
    for an expert that takes int16 (8-bit codes), or for 2 to GEMM_MIN_TOKENS - 1 rows (which
    multiply float32 x), would give other numbers: the device names it and the coordinator
    computes the call itself."""
    spin = _core.get_thread_spin()
    try:
        s = server.ExpertServer("fp", "dev")
        s.blobs = {(0, 1): blob(4), (0, 2): blob(8), (0, 3): blob(4, sym=False, seed=1)}
        many = _core.GEMM_MIN_TOKENS + 3
        x = hard_rows(np.random.default_rng(5))
        x = np.concatenate([x, np.random.default_rng(6).standard_normal((many - len(x), 128)).astype(np.float32)])
        counts = [1, many] if server.PREFILL_ROUNDING else [1]
        for n in counts:
            rows = np.arange(n)
            call = pack_call(0, x[:n], np.array([1, 3]), np.array([n, n]), np.concatenate([rows, rows]), rounded=True)
            assert call_form(call) == FORM_ROUNDED
            plain = pack_call(0, x[:n], np.array([1, 3]), np.array([n, n]), np.concatenate([rows, rows]))
            assert s.forward(call)[server.DEVICE_SECONDS.size :] == s.forward(plain)[server.DEVICE_SECONDS.size :]
        with pytest.raises(ClusterError, match="expert 2 of layer 0 an input rounded to int8"):
            s.forward(pack_call(0, x[:1], np.array([2]), np.array([1]), np.array([0]), rounded=True))
        with pytest.raises(ClusterError, match="expert 1 of layer 0 an input rounded to int8.* for 2 rows"):
            s.forward(pack_call(0, x[:2], np.array([1]), np.array([2]), np.array([0, 1]), rounded=True))
        held = s.hold([(0, 1, 0, 0), (0, 2, 0, 0)])
        assert held["missing"] == [] and held["int8_input"] == [(0, 1)]
    finally:
        _core.set_thread_spin(spin)
