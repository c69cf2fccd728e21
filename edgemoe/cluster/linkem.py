"""A link emulator for `edgemoe cluster local` on kernels without `tc netem`: one process in
a network namespace of its own is the switch between the cluster's namespaces. Each
endpoint (the head, each node) gets a TUN device made here and moved into its namespace;
every IP packet an endpoint sends is read here, held for its links' one-way delay and
paced at their rate, and written to the endpoint its destination address names.

    delivery = max(now, src uplink free) + bits / src rate + src delay      (leaves the sender's link)
               then max(that, dst downlink free) + bits / dst rate + dst delay

so a round trip between the head (no delay) and a node costs the node's RTT (RTT / 2 each
way) and a transfer is paced at the node's bandwidth. The addresses are the ones local.py
gives, inside namespaces it created; this process touches no other interface.

    python -m edgemoe.cluster.linkem SPEC_JSON     (run by local.py inside its switch namespace)
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU = 65000  # large segments: fewer packets through this process; delay and rate are what is emulated
EPOLL_RESOLUTION_S = 0.001  # epoll waits whole milliseconds: shorter waits sleep instead


@dataclass
class Port:
    """One endpoint's link: its TUN device's descriptor and the link's figures."""

    fd: int
    address: str
    delay_s: float  # one way
    bits_per_s: float  # 0: no limit
    up_free: float = 0.0
    down_free: float = 0.0


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def serve(spec: dict) -> None:
    """spec: {"prefix": 24, "ports": [{"name", "netns", "address", "delay_s", "bits_per_s"}]}.
    Makes the devices, hands each to its namespace, prints "ready", then switches until killed."""
    ports: dict[bytes, Port] = {}
    by_fd: dict[int, Port] = {}
    for i, p in enumerate(spec["ports"]):
        dev = f"lem{i}"
        fd = open_tun(dev)
        ip("link", "set", dev, "netns", p["netns"])
        ip("-n", p["netns"], "link", "set", dev, "name", "eth0")
        ip("-n", p["netns"], "addr", "add", f"{p['address']}/{spec['prefix']}", "dev", "eth0")
        ip("-n", p["netns"], "link", "set", "eth0", "mtu", str(MTU), "up")
        ip("-n", p["netns"], "link", "set", "lo", "up")
        port = Port(fd, p["address"], float(p["delay_s"]), float(p["bits_per_s"]))
        ports[bytes(map(int, p["address"].split(".")))] = port
        by_fd[fd] = port
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    queue: list[tuple[float, int, int, bytes]] = []  # (deliver at, sequence, fd, packet)
    seq = 0
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, packet = heapq.heappop(queue)
            try:
                os.write(fd, packet)
            except OSError:  # an endpoint whose namespace is going away: its packets are lost
                pass
        if not queue:
            events = ep.poll(1.0)
        else:
            wait = queue[0][0] - now
            if wait > 2 * EPOLL_RESOLUTION_S:
                events = ep.poll(wait - EPOLL_RESOLUTION_S)
            else:
                time.sleep(wait)  # sub-millisecond: nanosleep, not epoll's whole milliseconds
                events = ep.poll(0)
        for fd, _ in events:
            src = by_fd[fd]
            while True:
                try:
                    packet = os.read(fd, MTU + 64)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue  # IPv4 only: the cluster's addresses
                dst = ports.get(packet[16:20])
                if dst is None:
                    continue
                t = time.monotonic()
                bits = 8 * len(packet)
                src.up_free = max(t, src.up_free) + (bits / src.bits_per_s if src.bits_per_s else 0.0)
                arrive = src.up_free + src.delay_s
                dst.down_free = max(arrive, dst.down_free) + (bits / dst.bits_per_s if dst.bits_per_s else 0.0)
                seq += 1
                heapq.heappush(queue, (dst.down_free + dst.delay_s, seq, dst.fd, packet))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(json.loads(sys.argv[1]))
