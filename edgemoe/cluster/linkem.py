"""A link emulator for `edgemoe cluster local` on kernels without `tc netem`: one process in
a network namespace of its own is the switch between the cluster's namespaces. Each
endpoint (the head, each node) gets a TUN device made here and moved into its namespace;
every IP packet an endpoint sends is read here, held for its links' one-way delay and
paced at their rate, and written to the endpoint its destination address names.

    delivery = max(now, src uplink free) + bits / src rate + src delay      (leaves the sender's link)
               then max(that, dst downlink free) + bits / dst rate + dst delay

so a round trip between the head (no delay) and a node costs the node's RTT (RTT / 2 each
way) and a transfer is paced at the node's bandwidth. The switching loop is native
(`_core.LinkSwitch`: epoll on the TUN devices and an absolute timerfd, GIL released), so a
packet is read as soon as it is sent, even while others are held, and written when due.
The addresses are the ones local.py gives, inside namespaces it created; this process
touches no other interface.

Counters (per flow: packets, bytes, time queued behind other packets; how late packets were
written) go to the spec's "stats" file as JSON on SIGUSR1 and at exit (`local.link_counters`).

    python -m edgemoe.cluster.linkem SPEC_JSON     (run by local.py inside its switch namespace)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

from .. import _core

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU = 65000  # large segments: fewer packets through this process; delay and rate are what is emulated


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def serve(spec: dict) -> None:
    """spec: {"prefix": 24, "ports": [{"netns", "address", "delay_s", "bits_per_s"}], "stats": path,
    "spin_s": s}. Makes the devices, hands each to its namespace, prints "ready", then switches
    until SIGTERM, writing its counters to spec["stats"] on SIGUSR1 and before it exits."""
    # A signal (to whichever thread) writes its number to this pipe, which ends the switch's run()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)
    ports = []
    for i, p in enumerate(spec["ports"]):
        dev = f"lem{i}"
        fd = open_tun(dev)
        ip("link", "set", dev, "netns", p["netns"])
        ip("-n", p["netns"], "link", "set", dev, "name", "eth0")
        ip("-n", p["netns"], "addr", "add", f"{p['address']}/{spec['prefix']}", "dev", "eth0")
        ip("-n", p["netns"], "link", "set", "eth0", "mtu", str(MTU), "up")
        ip("-n", p["netns"], "link", "set", "lo", "up")
        ports.append((fd, p["address"], float(p["delay_s"]), float(p["bits_per_s"])))
    switch = _core.LinkSwitch(ports, spin_s=float(spec.get("spin_s", 0.0)))
    realtime(int(spec.get("priority", 0)))
    print("ready", flush=True)
    dumps = 0
    while True:
        switch.run(watch_fd=wake_r)
        try:
            signals = set(os.read(wake_r, 64))
        except BlockingIOError:
            signals = set()
        if spec.get("stats"):
            dumps += 1
            write_stats(Path(spec["stats"]), switch.stats(), spec, dumps)
        if signals - {signal.SIGUSR1}:
            return


def realtime(priority: int) -> None:
    """Run the switch under SCHED_FIFO at `priority` (0: as started): a packet due is written
    when due, not after the cluster's compute on the same cores lets this process run. It
    sleeps between packets, and the kernel keeps 5% of each second for other tasks anyway."""
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as e:
        print(f"link emulator: not real-time ({e}); packets wait for a core like any process", file=sys.stderr)


def write_stats(path: Path, stats: dict, spec: dict, dumps: int) -> None:
    """The counters as JSON (written whole, then renamed into place), with each flow's
    endpoints by address and the dump's sequence number."""
    names = [p["address"] for p in spec["ports"]]
    for f in stats["flows"]:
        f["src"], f["dst"] = names[f["src"]], names[f["dst"]]
    stats["dump"] = dumps
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, path)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
