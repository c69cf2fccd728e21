"""`edgemoe cluster local` and `down`: Ray nodes on this machine, each in its own network
namespace and cgroup v1 memory limit, their links emulated (docs/cluster.md). One cluster of
two nodes over the Wi-Fi 5 profile for the module; a generation through it gives the tokens
of the model alone; down leaves no namespace, cgroup or process behind. Needs root."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgemoe
from edgemoe.cluster import local
from edgemoe.converters.convert import convert
from edgemoe.devices import load_link
from edgemoe.devices.limits import cgroup_v1_available
from edgemoe.errors import ClusterError

pytest.importorskip("ray")
ok, reason = cgroup_v1_available("memory")
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.cgroup,
    pytest.mark.slow,
    pytest.mark.skipif(not ok, reason=f"needs a cgroup v1 memory group of our own: {reason}"),
]

LINK = "wifi5"
NODE_MEMORY = 700 << 20
PROMPT = [5, 17, 17, 3, 250, 0, 42, 9, 9, 100, 7, 64]
NEW = 12

GENERATE = """
import json, sys
import edgemoe
from edgemoe.cluster import PlanFigures
path, address, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
figures = PlanFigures(link=sys.argv[4], device="jetson-orin-nano-nvme", coordinator="raspberry-pi-4-sd")
m = edgemoe.load(path, memory_budget=budget, cluster=address, device_memory="100KB", cluster_figures=figures)
tokens = m.generate(json.loads(sys.argv[5]), max_new_tokens=int(sys.argv[6]))
print(json.dumps({"tokens": tokens, "cluster": m.stats()["cluster"]}))
m.close()
"""


def ours_left(tag: str) -> list[str]:
    """Namespaces and cgroups of cluster `tag` that still exist."""
    netns = [p.name for p in Path("/run/netns").glob(f"edgemoe-{tag}-*")] if Path("/run/netns").is_dir() else []
    groups = [p.name for p in Path("/sys/fs/cgroup/memory").glob(f"edgemoe-{tag}-*")]
    return netns + groups


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def outside_the_checkout(tmp_path_factory):
    """Ray puts the driver's working directory on the devices' import path (see test_cluster)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("coordinator_cwd"))
        yield


def test_an_interrupted_start_leaves_nothing(outside_the_checkout):
    """Runs first, before the module's cluster: a `cluster local` stopped by SIGTERM while it
    makes the cluster removes what it made."""
    before = {lc.tag for lc in local.running()}
    cmd = [sys.executable, "-c", "import sys; from edgemoe.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen(
        [*cmd, "cluster", "local", "--nodes", "1", "--node-memory", "500MB", "--link", LINK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    tag = None
    while tag is None:  # once its first namespaces exist
        assert time.monotonic() - t0 < 60 and proc.poll() is None, "cluster local did not start making anything"
        for lc in local.running():
            if lc.tag not in before and len(lc.namespaces) >= 2:
                tag = lc.tag
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert ours_left(tag) == []
    assert tag not in {lc.tag for lc in local.running()}


@pytest.fixture(scope="module")
def cluster(outside_the_checkout):
    lc = local.up(2, NODE_MEMORY, LINK, node_cpus=2)  # each node's server then runs two experts at once
    yield lc
    local.down(lc)


def test_nodes_are_up_each_in_its_namespace_and_memory_limit(cluster):
    assert [lc.tag for lc in local.running()][-1] == cluster.tag
    assert all(Path("/run/netns", n).exists() for n in cluster.namespaces)
    for i in range(cluster.nodes):
        group = cluster.node_cgroup(i)
        assert int((group / "memory.limit_in_bytes").read_text()) == NODE_MEMORY
        assert (group / "cgroup.procs").read_text().split()  # the node's Ray processes are in it
    with pytest.raises(ClusterError, match="at least 400MB"):
        local.up(1, 100 << 20, LINK)
    with pytest.raises(ClusterError, match="--node-cpus must be at least 1"):
        local.up(1, NODE_MEMORY, LINK, node_cpus=0)
    for priority in (-1, local.LINK_PRIORITY):  # a device's calls must not preempt the link emulator
        with pytest.raises(ClusterError, match="--serve-priority must be from 0"):
            local.up(1, NODE_MEMORY, LINK, serve_priority=priority)


def test_the_measured_round_trip_is_the_links(cluster):
    want = load_link(LINK)
    counting = cluster.emulator == "userspace"
    before = local.link_counters(cluster) if counting else None
    for node in range(cluster.nodes):
        got = local.measure_link(cluster, node)
        # the emulator adds its own time (a process woken on a busy machine): at least the
        # profile's round trip, within a millisecond more at the median
        assert want.rtt_s <= got["rtt_median_s"] <= want.rtt_s + 1e-3, got
        assert got["echo_bits_per_s"] <= 1.05 * want.bits_per_s, got
    if before is not None:  # the userspace emulator counted each node's 1 MiB echo, both ways, over TCP
        crossed = local.counters_delta(local.link_counters(cluster), before)
        for node in range(cluster.nodes):
            ends = (local.HEAD_ADDRESS, local.node_address(node))
            for src, dst in (ends, ends[::-1]):
                tcp = [f for f in crossed["flows"] if (f["src"], f["dst"], f["protocol"]) == (src, dst, 6)]
                assert sum(f["bytes"] for f in tcp) >= 1 << 20, crossed
        assert crossed["packets"] == sum(f["packets"] for f in crossed["flows"])


def test_a_generation_through_the_emulated_links_gives_the_same_tokens(cluster, tiny_checkpoint, tmp_path):
    path = tmp_path / "mixtral"
    convert(tiny_checkpoint("mixtral"), path, bits=8, progress=False)
    budget = edgemoe.load(path).min_budget
    want = edgemoe.load(path, memory_budget=budget).generate(PROMPT, max_new_tokens=NEW)
    args = [str(path), cluster.address, str(budget), LINK, json.dumps(PROMPT), str(NEW)]
    r = subprocess.run(
        cluster.command([sys.executable, "-c", GENERATE, *args]), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == want
    c = out["cluster"]
    assert c["remote_slots"] > 0 and c["recomputed_slots"] == 0
    assert sorted(d["address"] for d in c["devices"].values()) == [local.node_address(i) for i in range(2)]
    assert all(d["threads"] == 2 for d in c["devices"].values())  # the CPUs each node offers Ray
    assert all(
        (d["serve_priority"], d["serve_priority_error"]) == (local.NODE_SERVE_PRIORITY, None)
        for d in c["devices"].values()
    )
    assert 0 < c["slowest_device_seconds"] and 0 < c["hop_seconds"]  # the devices said what they spent
    assert all(d["device_ms_per_call"] > 0 for d in c["devices"].values())
    for usage in cluster.node_memory_usage():  # every node stayed inside its limit
        assert usage["oom_kills"] == 0 and usage["peak_bytes"] <= usage["limit_bytes"] == NODE_MEMORY


def test_down_leaves_nothing_behind(cluster):
    """Runs last: removes the module's cluster (its fixture's down then finds nothing)."""
    pids = local._pids(cluster)
    assert pids
    local.down(cluster)
    assert ours_left(cluster.tag) == []
    assert not any(alive(p) for p in pids)
    assert not cluster.state_file.exists() and not cluster.root.exists()
    local.down(cluster)  # twice is harmless
