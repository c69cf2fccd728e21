"""A cluster of Ray nodes on this machine, each a device with its own memory limit and link
(`edgemoe cluster local`, `edgemoe cluster down`): tests and benchmarks of several devices
on one computer.

    namespace edgemoe-TAG-head      the Ray head and the coordinator, 10.77.0.1
    namespace edgemoe-TAG-nodeI     Ray node I (the `edgemoe` resource), 10.77.0.(10+I),
                                    in cgroup v1 memory group edgemoe-TAG-nodeI (the limit)
    namespace edgemoe-TAG-switch    what joins them: a bridge of veth pairs shaped by `tc netem`
                                    (delay RTT/2 each way, rate) where the kernel has netem,
                                    else the userspace link emulator (linkem.py) over TUN devices

The addresses (10.77.0.0/24, a private range) exist only inside the namespaces made here;
no interface of the host, nor any other namespace or cgroup, is touched. Everything made is
written to a state file as it is made, so `down` removes all of it, and an interrupted `up`
removes what it made before it stops. Needs root, iproute2 and cgroup v1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..devices import load_link
from ..devices.limits import CGROUP_ROOT, cgroup_v1_available
from ..errors import ClusterError
from ..runtime.paths import cache_root
from ..units import format_bytes
from .server import SERVE_PRIORITY_ENV

SUBNET = "10.77.0"  # a private range, used only inside the namespaces this module creates
PREFIX = 24
HEAD_ADDRESS = f"{SUBNET}.1"
PORT = 6379
OBJECT_STORE_BYTES = 80 << 20  # Ray's shared-memory store per node (its minimum is 75 MiB)
START_TIMEOUT_S = 240.0
LINK_STATS = "linkem-stats.json"  # the userspace emulator's counters, in the cluster's directory
# The userspace emulator polls without sleeping for this long before a packet is due: a timer
# wake-up on this kind of VM lands 40-77 us late, polling the last 80 us lands 4-6 us late
# (docs/benchmarks/cluster.md), for about 1 ms of CPU per token.
LINK_SPIN_S = 80e-6
# The userspace emulator's SCHED_FIFO priority (0: an ordinary process): the link must not
# wait behind the cluster's own compute for a core, or every packet arrives late.
LINK_PRIORITY = 10
# The SCHED_FIFO priority of the nodes' expert servers' channel threads (below the link's):
# emulated devices share this machine's cores, and a call that wakes a device's thread behind
# another device's expert work (the scheduler packs woken threads onto a busy vCPU here) waits
# for it. Wi-Fi 5, 3 nodes: 2.5-2.7 ms a layer with it against 3.0-3.1 ms without
# (docs/benchmarks/cluster.md).
NODE_SERVE_PRIORITY = 5


def node_address(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def state_dir() -> Path:
    """Where the state files (and each node's flash) of local clusters live."""
    return cache_root() / "cluster-local"


@dataclasses.dataclass
class LocalCluster:
    """A local cluster as made, and everything made for it (the state file's content)."""

    tag: str
    nodes: int
    node_memory: int
    link: str
    emulator: str = ""  # "netem" or "userspace"
    namespaces: list[str] = dataclasses.field(default_factory=list)
    cgroups: list[str] = dataclasses.field(default_factory=list)
    pids: list[int] = dataclasses.field(default_factory=list)  # the link emulator
    flash: str = ""  # where each node keeps its expert copies (default: under root, removed by down)
    node_cpus: int = 1  # the CPUs each node offers Ray, which its expert server uses as threads
    serve_priority: int = NODE_SERVE_PRIORITY  # its expert server's channel threads' SCHED_FIFO priority (0: ordinary)

    @property
    def address(self) -> str:
        return f"{HEAD_ADDRESS}:{PORT}"

    @property
    def head_netns(self) -> str:
        return f"edgemoe-{self.tag}-head"

    def node_netns(self, i: int) -> str:
        return f"edgemoe-{self.tag}-node{i}"

    def node_cgroup(self, i: int) -> Path:
        return CGROUP_ROOT / "memory" / f"edgemoe-{self.tag}-node{i}"

    @property
    def root(self) -> Path:
        return state_dir() / self.tag

    @property
    def state_file(self) -> Path:
        return state_dir() / f"{self.tag}.json"

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, path: Path) -> LocalCluster:
        return cls(**json.loads(path.read_text()))

    def node_flash(self, i: int) -> Path:
        return (Path(self.flash) if self.flash else self.root) / f"node{i}"

    def command(self, cmd: Sequence[str]) -> list[str]:
        """cmd run inside the head's namespace (where the coordinator reaches the cluster)."""
        return ["ip", "netns", "exec", self.head_netns, *cmd]

    def node_memory_usage(self) -> list[dict[str, int]]:
        """Per node: its limit, peak and current usage and OOM kills (cgroup v1 counters)."""
        out = []
        for i in range(self.nodes):
            g = self.node_cgroup(i)
            oom = 0
            for line in (g / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    oom = int(line.split()[1])
            out.append(
                {
                    "limit_bytes": int((g / "memory.limit_in_bytes").read_text()),
                    "peak_bytes": int((g / "memory.max_usage_in_bytes").read_text()),
                    "usage_bytes": int((g / "memory.usage_in_bytes").read_text()),
                    "failcnt": int((g / "memory.failcnt").read_text()),
                    "oom_kills": oom,
                }
            )
        return out


def _run(*cmd: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _ray_command() -> list[str]:
    """Ray's `ray` command run by this Python: its raylets start workers with the same
    interpreter, so the devices import the edgemoe this process imports."""
    try:
        import ray.scripts.scripts  # noqa: F401  (an optional dependency: the `cluster` extra)
    except ImportError:
        raise ClusterError("a local cluster needs Ray: pip install 'edgemoe[cluster]'") from None
    return [sys.executable, "-m", "ray.scripts.scripts"]


def check_host() -> None:
    """Root, iproute2 and cgroup v1 memory, or a ClusterError naming what is missing."""
    if os.geteuid() != 0:
        raise ClusterError("a local cluster makes network namespaces and cgroups: run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ClusterError(f"a local cluster needs `{tool}` (apt-get install iproute2)")
    ok, why = cgroup_v1_available("memory")
    if not ok:
        raise ClusterError(f"a local cluster limits each node's memory with cgroup v1: {why}")


def netem_available(netns: str) -> bool:
    """Whether this kernel has the netem qdisc (probed on the loopback of a namespace of ours)."""
    r = subprocess.run(
        ["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
        text=True,
    )
    if r.returncode == 0:
        subprocess.run(["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    return r.returncode == 0


def _links_netem(lc: LocalCluster, switch: str, endpoints: list[tuple[str, str, float, float]]) -> None:
    """A bridge in the switch namespace, one veth pair per endpoint, netem on both ends of a node's pair."""
    _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", switch, "link", "set", "br0", "up")
    for i, (netns, address, delay_s, bits) in enumerate(endpoints):
        port = f"p{i}"
        _run("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        if delay_s > 0 or bits > 0:
            shape = ["netem", "delay", f"{delay_s * 1e6:.0f}us", "rate", f"{int(bits)}bit"]
            _run("tc", "-n", netns, "qdisc", "add", "dev", "eth0", "root", *shape)  # the node's uplink
            _run("tc", "-n", switch, "qdisc", "add", "dev", port, "root", *shape)  # its downlink


def _links_userspace(lc: LocalCluster, switch: str, endpoints: list[tuple[str, str, float, float]]) -> None:
    """The link emulator (linkem.py) in the switch namespace, one TUN device per endpoint."""
    spec = {
        "prefix": PREFIX,
        "ports": [{"netns": n, "address": a, "delay_s": d, "bits_per_s": b} for n, a, d, b in endpoints],
        "stats": str(lc.root / LINK_STATS),
        "spin_s": LINK_SPIN_S,
        "priority": LINK_PRIORITY,
    }
    log = open(lc.root / "linkem.log", "w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", switch, sys.executable, "-m", "edgemoe.cluster.linkem", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd="/",
        start_new_session=True,  # it outlives `cluster local`: `cluster down` ends it
    )
    lc.pids.append(proc.pid)
    lc.save()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30.0)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        raise ClusterError(f"the link emulator did not start: {(lc.root / 'linkem.log').read_text()[-2000:]}")


def link_counters(lc: LocalCluster, timeout_s: float = 10.0) -> dict[str, Any]:
    """The userspace link emulator's counters so far (it writes them on SIGUSR1): per flow
    between two endpoints (by address, IP protocol and TCP/UDP ports) packets, bytes and the
    time they queued behind other packets on the links; and how late it wrote packets (its
    own delay beyond the link's). The difference of two readings is what crossed meanwhile."""
    if lc.emulator != "userspace" or not lc.pids:
        raise ClusterError(
            f"cluster {lc.tag}'s links are {lc.emulator or 'not made'}: only the userspace emulator counts"
        )
    path = lc.root / LINK_STATS
    before = json.loads(path.read_text())["dump"] if path.exists() else 0
    os.kill(lc.pids[0], signal.SIGUSR1)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            out: dict[str, Any] = json.loads(path.read_text())
            if out["dump"] > before:
                return out
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    raise ClusterError(
        f"the link emulator (pid {lc.pids[0]}) wrote no counters in {timeout_s:.0f} s: see {lc.root}/linkem.log"
    )


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What crossed the emulator between two link_counters() readings: the totals and each
    flow's packets, bytes and queued seconds, busiest flows first."""
    key = ("src", "dst", "protocol", "sport", "dport")
    old = {tuple(f[k] for k in key): f for f in before.get("flows", [])}
    flows = []
    for f in after["flows"]:
        o = old.get(tuple(f[k] for k in key), {})
        d = {k: f[k] for k in key}
        d.update({k: f[k] - o.get(k, 0) for k in ("packets", "bytes", "queued_s")})
        if d["packets"]:
            flows.append(d)
    flows.sort(key=lambda f: -f["bytes"])
    out = {k: after[k] - before.get(k, 0) for k in after if k not in ("flows", "dump", "late_max_s")}
    out["flows"] = flows
    return out


def _tail(log: Path, chars: int = 3000) -> str:
    """The end of a log that down() is about to remove, for the error."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _join(cgroup: Path) -> Any:
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return join


def up(
    nodes: int,
    node_memory: int,
    link: str,
    object_store_bytes: int = OBJECT_STORE_BYTES,
    flash_dir: str | os.PathLike[str] | None = None,
    node_cpus: int = 1,
    serve_priority: int = NODE_SERVE_PRIORITY,
) -> LocalCluster:
    """Make the namespaces, links and cgroups, start the Ray head and `nodes` device nodes,
    and wait until every node has joined. On any error or interruption, removes what it made.
    flash_dir: where node I keeps its expert copies (flash_dir/nodeI), kept after down so
    that the next cluster's nodes read them instead of receiving them (default: removed).
    node_cpus: the CPUs each node offers Ray (its servers' threads); the nodes share this
    machine's cores, as many as each may use at once, not a partition of them.
    serve_priority: the SCHED_FIFO priority of the nodes' expert servers' channel threads
    (SERVE_PRIORITY_ENV; 0: ordinary), below the link emulator's."""
    check_host()
    if nodes < 1:
        raise ClusterError(f"--nodes must be at least 1, got {nodes}")
    if node_cpus < 1:
        raise ClusterError(f"--node-cpus must be at least 1, got {node_cpus}")
    if not 0 <= serve_priority < LINK_PRIORITY:
        raise ClusterError(
            f"--serve-priority must be from 0 (ordinary) to {LINK_PRIORITY - 1} (below the link emulator's), "
            f"got {serve_priority}"
        )
    ln = load_link(link)
    if node_memory < object_store_bytes + (64 << 20):
        raise ClusterError(
            f"--node-memory {format_bytes(node_memory)} leaves no room: a node's Ray processes alone take "
            f"its {format_bytes(object_store_bytes)} object store and more; give it at least 400MB"
        )
    lc = LocalCluster(
        uuid.uuid4().hex[:6],
        nodes,
        int(node_memory),
        link,
        flash=str(flash_dir or ""),
        node_cpus=int(node_cpus),
        serve_priority=int(serve_priority),
    )
    lc.save()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in previous:
        signal.signal(s, interrupted)
    try:
        _up(lc, ln.rtt_s, ln.bits_per_s, object_store_bytes)
    except BaseException:
        down(lc)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return lc


def _up(lc: LocalCluster, rtt_s: float, bits_per_s: float, object_store_bytes: int) -> None:
    switch = f"edgemoe-{lc.tag}-switch"
    for netns in [switch, lc.head_netns, *(lc.node_netns(i) for i in range(lc.nodes))]:
        _run("ip", "netns", "add", netns)
        lc.namespaces.append(netns)
        lc.save()
    endpoints = [(lc.head_netns, HEAD_ADDRESS, 0.0, 0.0)]
    endpoints += [(lc.node_netns(i), node_address(i), rtt_s / 2, bits_per_s) for i in range(lc.nodes)]
    lc.emulator = "netem" if netem_available(switch) else "userspace"
    lc.save()
    (_links_netem if lc.emulator == "netem" else _links_userspace)(lc, switch, endpoints)

    head_group = CGROUP_ROOT / "memory" / f"edgemoe-{lc.tag}-head"  # no limit: it tracks the head's processes
    for g in [head_group, *(lc.node_cgroup(i) for i in range(lc.nodes))]:
        g.mkdir()
        lc.cgroups.append(str(g))
        lc.save()
    for i in range(lc.nodes):
        (lc.node_cgroup(i) / "memory.limit_in_bytes").write_text(str(lc.node_memory))

    log = lc.root / "ray-start.log"
    with open(log, "w") as out:
        r = subprocess.run(
            ["ip", "netns", "exec", lc.head_netns, *_ray_start(object_store_bytes, head=True)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_join(head_group),
            cwd="/",
            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
            timeout=START_TIMEOUT_S,
        )
    if r.returncode != 0:
        raise ClusterError(f"the Ray head did not start: {_tail(log)}")
    for i in range(lc.nodes):  # one at a time: nodes on one machine share Ray's session directory
        start_node(lc, i, object_store_bytes)
    wait_for_nodes(lc, lc.nodes)


def _ray_start(
    object_store_bytes: int, head: bool = False, address: str = "", node_ip: str = "", cpus: int = 1
) -> list[str]:
    cmd = [*_ray_command(), "start", "--disable-usage-stats", f"--object-store-memory={object_store_bytes}"]
    cmd.append(f"--num-cpus={cpus}")
    if head:
        return [*cmd, "--head", f"--node-ip-address={HEAD_ADDRESS}", f"--port={PORT}", "--include-dashboard=false"]
    return [*cmd, f"--address={address}", f"--node-ip-address={node_ip}", '--resources={"edgemoe": 1}']


def start_node(lc: LocalCluster, i: int, object_store_bytes: int = OBJECT_STORE_BYTES) -> None:
    """Start Ray node i in its namespace and cgroup (again, after kill_node: a device that
    comes back, with the copies on its flash)."""
    log = lc.root / "ray-start.log"
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        EDGEMOE_CACHE=str(lc.node_flash(i)),
        **{SERVE_PRIORITY_ENV: str(lc.serve_priority)},
    )
    with open(log, "a") as out:
        r = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lc.node_netns(i),
                *_ray_start(object_store_bytes, False, lc.address, node_address(i), lc.node_cpus),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_join(lc.node_cgroup(i)),
            cwd="/",
            env=env,
            timeout=START_TIMEOUT_S,
        )
    if r.returncode != 0:
        raise ClusterError(f"Ray node {i} did not start: {_tail(log)}")


def kill_node(lc: LocalCluster, i: int, timeout_s: float = 10.0) -> int:
    """SIGKILL every process of node i (a device losing power); returns how many."""
    procs = lc.node_cgroup(i) / "cgroup.procs"
    pids = [int(x) for x in procs.read_text().split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout_s
    while procs.read_text().split() and time.monotonic() < end:
        time.sleep(0.02)
    return len(pids)


WAIT_SCRIPT = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    n = sum(1 for x in ray.nodes() if x["Alive"] and x["Resources"].get("edgemoe", 0) > 0)
    if n >= int(sys.argv[2]):
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"{n} of {sys.argv[2]} nodes joined")
"""


def wait_for_nodes(lc: LocalCluster, n: int, timeout_s: float = START_TIMEOUT_S) -> None:
    r = subprocess.run(
        lc.command([sys.executable, "-c", WAIT_SCRIPT, lc.address, str(n), str(timeout_s)]),
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout_s + 60,
    )
    if r.returncode != 0:
        raise ClusterError(f"the local cluster's nodes did not all join: {r.stderr.strip()[-1000:]}")


def _pids(lc: LocalCluster) -> set[int]:
    """Every process in the cluster's cgroups and namespaces, and its link emulator."""
    pids = set(lc.pids)
    for g in lc.cgroups:
        try:
            pids.update(int(x) for x in Path(g, "cgroup.procs").read_text().split())
        except OSError:
            pass
    for netns in lc.namespaces:
        r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        pids.update(int(x) for x in r.stdout.split())
    pids.discard(os.getpid())
    return pids


def namespace_cpu_seconds(namespaces: Sequence[str]) -> dict[str, float]:
    """User + system CPU seconds used so far by the live processes of each named network
    namespace (read from /proc, so it works from inside any of them). The difference of two
    readings is the CPU a local cluster spent in between, which on a machine whose cores it
    shares bounds its time: no token takes less than its CPU over the cores."""
    names: dict[tuple[int, int], str] = {}
    for n in namespaces:
        try:
            st = os.stat(f"/run/netns/{n}")
        except OSError:
            continue
        names[(st.st_dev, st.st_ino)] = n
    out = dict.fromkeys(namespaces, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
            name = names.get((st.st_dev, st.st_ino))
            if name is None:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes (its parent reaps it)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def down(lc: LocalCluster, grace_s: float = 2.0) -> None:
    """Stop every process of the cluster (SIGTERM, then SIGKILL after grace_s), delete its
    namespaces and cgroups, its nodes' flash and its state file."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids = _pids(lc)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and any(_alive(p) for p in _pids(lc)):
            time.sleep(0.05)
    for netns in reversed(lc.namespaces):
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    for g in reversed(lc.cgroups):
        path = Path(g)
        for _ in range(100):  # the kernel frees a group a moment after its last task exits
            if not path.exists():
                break
            try:
                path.rmdir()
            except OSError:
                time.sleep(0.05)
    shutil.rmtree(lc.root, ignore_errors=True)
    lc.state_file.unlink(missing_ok=True)
    left = [n for n in lc.namespaces if Path("/run/netns", n).exists()] + [g for g in lc.cgroups if Path(g).exists()]
    if left:
        raise ClusterError(f"could not remove {', '.join(left)}: remove them by hand (ip netns del, rmdir)")


def running() -> list[LocalCluster]:
    """The local clusters whose state files are here, oldest first."""
    files = sorted(state_dir().glob("*.json"), key=lambda p: p.stat().st_mtime) if state_dir().is_dir() else []
    return [LocalCluster.load(f) for f in files]


def down_all() -> list[str]:
    """`edgemoe cluster down`: remove every local cluster; returns their tags."""
    tags = []
    for lc in running():
        down(lc)
        tags.append(lc.tag)
    return tags


@contextmanager
def local_cluster(
    nodes: int,
    node_memory: int,
    link: str,
    flash_dir: str | os.PathLike[str] | None = None,
    node_cpus: int = 1,
    serve_priority: int = NODE_SERVE_PRIORITY,
) -> Iterator[LocalCluster]:
    """up(), and down() when the block ends however it ends."""
    lc = up(nodes, node_memory, link, flash_dir=flash_dir, node_cpus=node_cpus, serve_priority=serve_priority)
    try:
        yield lc
    finally:
        down(lc)


ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    c.sendall(d)
"""

ECHO_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    c.sendall(b"x" * 64)
    got = 0
    while got < 64:
        got += len(c.recv(64 - got))
    rtts.append(time.perf_counter() - t)
big = b"x" * int(sys.argv[4])
t = time.perf_counter()
c.sendall(big)
got = 0
while got < len(big):
    got += len(c.recv(1 << 16))
print(json.dumps({"rtts": rtts, "echo_seconds": time.perf_counter() - t}))
"""


def measure_link(lc: LocalCluster, node: int = 0, count: int = 50, bulk_bytes: int = 1 << 20) -> dict[str, float]:
    """The round trip of a 64-byte message between the head's namespace and a node's (TCP,
    median and p90 over `count`) and the throughput of echoing `bulk_bytes` (out and back at
    once over a full-duplex link: at most the link's rate), as the emulated link gives them."""
    port = 7000 + node
    server = subprocess.Popen(
        ["ip", "netns", "exec", lc.node_netns(node), sys.executable, "-c", ECHO_SERVER, node_address(node), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        r = subprocess.run(
            lc.command([sys.executable, "-c", ECHO_CLIENT, node_address(node), str(port), str(count), str(bulk_bytes)]),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        if r.returncode != 0:
            raise ClusterError(f"measuring the link to node {node} failed: {r.stderr.strip()[-1000:]}")
        out = json.loads(r.stdout)
    finally:
        server.kill()
        server.wait()
    rtts = sorted(out["rtts"])
    return {
        "rtt_median_s": rtts[len(rtts) // 2],
        "rtt_p90_s": rtts[int(0.9 * (len(rtts) - 1))],
        "echo_bits_per_s": 8 * bulk_bytes / out["echo_seconds"],
    }
