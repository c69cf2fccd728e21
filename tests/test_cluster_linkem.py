"""The link emulator's switching loop (`_core.LinkSwitch`, run by `python -m
edgemoe.cluster.linkem` over TUN devices) over packet socket pairs: each packet is held for
its links' delays, paced at their rates, kept in order, counted per flow, and sent to the
endpoint its IPv4 destination names. Behaviour only: lower bounds on time, no speed."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import pytest

from edgemoe import _core

HEAD, SLOW, FAR = "10.0.0.1", "10.0.0.2", "10.0.0.3"
SLOW_DELAY, SLOW_RATE, FAR_DELAY = 0.002, 8e6, 0.001  # 8 Mbit/s: 1 ms per 1000 bytes


def packet(src: str, dst: str, n: int, size: int, sport: int = 5000, dport: int = 6000) -> bytes:
    """An IPv4/UDP packet of `size` bytes whose payload starts with n."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    body = struct.pack("!HHHH", sport, dport, size - 20, 0) + struct.pack("<I", n)
    return (head + body).ljust(size, b"\0")


def receive(sock: socket.socket, count: int, timeout: float = 5.0) -> list[tuple[float, int]]:
    """(arrival time, number) of `count` packets, or fewer if none comes within timeout."""
    out = []
    while len(out) < count and select.select([sock], [], [], timeout)[0]:
        data = sock.recv(70000)
        out.append((time.monotonic(), struct.unpack_from("<I", data, 28)[0]))
    return out


@pytest.fixture
def switch():
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    for ours, _ in pairs:
        ours.setblocking(False)
    ports = [
        (pairs[0][0].fileno(), HEAD, 0.0, 0.0),
        (pairs[1][0].fileno(), SLOW, SLOW_DELAY, SLOW_RATE),
        (pairs[2][0].fileno(), FAR, FAR_DELAY, 0.0),
    ]
    sw = _core.LinkSwitch(ports)
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(sw.run()))
    t.start()
    try:
        yield sw, [end for _, end in pairs], t
    finally:
        sw.stop()
        t.join(10)
        for a, b in pairs:
            a.close()
            b.close()
    assert result == ["stopped"]


def test_delay_rate_and_order_are_the_links(switch):
    sw, (head, slow, far), _ = switch
    t0 = time.monotonic()
    for k in range(10):
        head.send(packet(HEAD, SLOW, k, 1000))
    head.send(packet(HEAD, SLOW, 10, 40))  # a small one after big ones waits its turn
    head.send(packet(HEAD, FAR, 99, 100, dport=7000))  # another link: not behind the slow one's queue
    (far_at, far_n), *_ = receive(far, 1)
    got = receive(slow, 11)
    assert far_n == 99 and far_at - t0 >= FAR_DELAY and far_at < got[-1][0]
    assert [n for _, n in got] == list(range(11))
    for k, (at, _) in enumerate(got):  # k + 1 packets' time on the 8 Mbit/s link, then its delay
        assert at - t0 >= SLOW_DELAY + 1e-3 * min(k + 1, 10) - 1e-6
    t1 = time.monotonic()
    slow.send(packet(SLOW, HEAD, 7, 500, 6000, 5000))  # the way back pays the slow link on leaving
    ((at, n),) = receive(head, 1)
    assert n == 7 and at - t1 >= SLOW_DELAY + 0.5e-3 - 1e-6


def test_counters_per_flow_and_drops(switch):
    sw, (head, slow, far), thread = switch
    for k in range(3):
        head.send(packet(HEAD, SLOW, k, 200))
    head.send(packet(HEAD, "10.0.0.9", 0, 64))  # nobody's address
    head.send(b"\x60" + bytes(39))  # not IPv4
    assert len(receive(slow, 3)) == 3
    sw.stop()  # stats are read between runs
    thread.join(10)
    s = sw.stats()
    assert (s["packets"], s["bytes"], s["dropped"]) == (3, 600, 2)
    (flow,) = s["flows"]
    assert (flow["src"], flow["dst"], flow["protocol"], flow["sport"], flow["dport"]) == (0, 1, 17, 5000, 6000)
    assert flow["packets"] == 3 and flow["bytes"] == 600 and flow["queued_s"] > 0  # 2nd and 3rd waited
    assert s["late_max_s"] >= 0 and s["seconds"] > 0


def test_a_readable_descriptor_ends_a_run_and_packets_held_stay_held():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    c.setblocking(False)
    sw = _core.LinkSwitch([(a.fileno(), HEAD, 0.0, 0.0), (c.fileno(), SLOW, 0.05, 0.0)])
    r, w = os.pipe()
    b.send(packet(HEAD, SLOW, 1, 100))
    os.write(w, b"x")
    assert sw.run(watch_fd=r) == "readable"  # at once; the packet read meanwhile is held
    os.read(r, 1)
    t = threading.Thread(target=sw.run)
    t.start()
    assert [n for _, n in receive(d, 1)] == [1]
    sw.stop()
    t.join(10)
    for x in (a, b, c, d):
        x.close()
    os.close(r)
    os.close(w)


def test_bad_ports_are_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(ValueError, match="not an IPv4 address"):
        _core.LinkSwitch([(a.fileno(), "10.0.0", 0.0, 0.0)])
    with pytest.raises(ValueError, match="one address"):
        _core.LinkSwitch([(a.fileno(), HEAD, 0.0, 0.0), (b.fileno(), HEAD, 0.0, 0.0)])
    with pytest.raises(ValueError, match="delay"):
        _core.LinkSwitch([(a.fileno(), HEAD, -1.0, 0.0)])
    a.close()
    b.close()
