"""One model's experts across a local Ray cluster (edgemoe.cluster, docs/cluster.md).

Real Ray nodes as separate processes (ray.cluster_utils.Cluster): a head that offers no
device, and two nodes offering the `edgemoe` resource, each with its own $EDGEMOE_CACHE (its
flash). Tiny checkpoints converted at 8 bits; every result is compared with the same model
loaded without a cluster, bit for bit.
"""

from __future__ import annotations

import faulthandler
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

import edgemoe
from edgemoe.cluster import ClusterMoE, assign_experts
from edgemoe.converters.convert import convert
from edgemoe.errors import ClusterError

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPT = [5, 17, 17, 3, 250, 0, 42, 9, 9, 100, 7, 64]
NEW = 12


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_models")
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        convert(tiny_checkpoint(arch), root / arch, bits=8, progress=False)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Ray puts the driver's working directory on every device's import path: from the root of
    a source checkout the devices would import its unbuilt edgemoe/ instead of the installed one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("coordinator_cwd"))
        yield


@pytest.fixture(scope="module")
def head():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def devices(head, tmp_path_factory):
    """Two device nodes; each keeps its copies under its own $EDGEMOE_CACHE."""
    root = tmp_path_factory.mktemp("device_flash")
    nodes = [
        head.add_node(num_cpus=1, resources={"edgemoe": 1}, env_vars={"EDGEMOE_CACHE": str(root / f"device{i}")})
        for i in range(2)
    ]
    head.wait_for_nodes()
    return SimpleNamespace(cluster=head, address=head.address, nodes=nodes, root=root)


def single(path, budget=None):
    """The reference: the model on this process alone."""
    m = edgemoe.load(path, memory_budget=budget)
    return m.logits(PROMPT), m.generate(PROMPT, max_new_tokens=NEW)


def expert_bytes(path) -> int:
    return edgemoe.load(path).info()["expert_bytes"]


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def override(m) -> ClusterMoE:
    assert isinstance(m.net.moe_override, ClusterMoE)
    return m.net.moe_override


def test_assign_experts_fills_devices_with_the_most_used_first():
    sizes = np.array([[10, 10, 0, 10], [10, 10, 10, 10]])
    usage = np.array([[1, 9, 0, 5], [7, 1, 1, 1]])
    got = assign_experts({"b": 20, "a": 25}, sizes, usage)
    # by share of their layer: (1,0) .7, (0,1) .6, (0,3) .33, (1,1) .1, ... (0,0) .07; each to the
    # device with the most room left, ties by name
    assert got == {"a": [(1, 0), (0, 3)], "b": [(0, 1), (1, 1)]}
    # no usage: round the layers; nothing placed where nothing fits
    assert assign_experts({"a": 15}, sizes) == {"a": [(0, 0)]}
    assert assign_experts({"a": 0}, sizes) == {"a": []}


def test_an_address_nobody_answers_is_named(models):
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ClusterError, match=r"no Ray cluster answers at .*127\.0\.0\.1:1.*ray start --head"):
            edgemoe.load(models["mixtral"], cluster=address)
    with pytest.raises(ClusterError, match="is not 'auto', 'HOST:PORT'"):
        edgemoe.load(models["mixtral"], cluster="a cluster")
    assert not ray.is_initialized()


def test_run_names_an_unreachable_cluster_in_one_line(models, capsys):
    from edgemoe.cli import main

    assert main(["run", str(models["mixtral"]), "-p", "x", "-n", "2", "--cluster", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemoe run: error: no Ray cluster answers at 127.0.0.1:1") and err.count("\n") == 1


def test_a_cluster_without_devices_is_named(head, models):
    if head.worker_nodes:
        pytest.skip("device nodes were added already (this test runs first in file order)")
    with pytest.raises(ClusterError, match="no live node offering the 'edgemoe' resource.*--resources="):
        edgemoe.load(models["mixtral"], cluster=head.address)
    assert not ray.is_initialized()  # the connection load made is closed again


@pytest.mark.parametrize(
    "arch, budget",
    [("mixtral", None), ("mixtral", "min"), ("qwen2_moe", None)],
    ids=["mixtral", "mixtral-budget", "qwen2_moe"],
)
def test_tokens_through_the_cluster_are_the_single_device_tokens(devices, models, arch, budget):
    path = models[arch]
    if budget == "min":
        budget = edgemoe.load(path).min_budget
    want_logits, want_tokens = single(path, budget)
    # each device holds about a third of the experts: the rest stream through this process's cache
    m = edgemoe.load(path, memory_budget=budget, cluster=devices.address, device_memory=expert_bytes(path) // 3)
    try:
        got_logits = m.logits(PROMPT)  # prefill: every prompt token in one call per device and layer
        s = m.stats()["cluster"]
        moe_layers = m.info()["moe_layers"]
        assert s["remote_slots"] > 0 and s["local_slots"] > 0
        for d in s["devices"].values():
            assert d["state"] == "up" and d["experts"] > 0
            assert 0 < d["calls"] <= moe_layers and d["rows_sent"] <= d["calls"] * len(PROMPT)
        np.testing.assert_array_equal(got_logits, want_logits)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want_tokens
        s = m.stats()["cluster"]
        assert s["recomputed_slots"] == 0 and all(d["failures"] == 0 for d in s["devices"].values())
        if budget:
            assert m.stats()["cache_misses"] > 0  # the coordinator's experts really streamed
    finally:
        m.close()
    assert m.net.moe_override is None and not ray.is_initialized()


def test_run_through_the_cluster_prints_its_statistics(devices, models, capsys):
    from edgemoe.cli import main

    path = str(models["mixtral"])
    args = ["run", path, "-p", "The robot", "-n", "6", "--temperature", "0", "--stats"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main([*args, "--cluster", devices.address, "--device-memory", "60KB"]) == 0
    out, err = capsys.readouterr()
    assert out == alone
    assert f"cluster       {devices.address}:" in err and err.count(" up ") == 2
    assert not ray.is_initialized()


def test_a_device_that_misses_the_deadline_is_computed_here(devices, models):
    path = models["mixtral"]
    _, want = single(path)
    m = edgemoe.load(path, cluster=devices.address, cluster_timeout=1e-6, device_memory=expert_bytes(path))
    try:
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        s = m.stats()["cluster"]
        assert s["recomputed_slots"] > 0
        down = [d for d in s["devices"].values() if d["state"] == "down"]
        assert down and all("no answer within 0 ms" in d["error"] and d["failures"] == 1 for d in down)
    finally:
        m.close()


def test_a_server_started_again_reads_its_experts_from_its_flash(devices, models):
    path = models["mixtral"]
    _, want = single(path)
    room = expert_bytes(path) // 2
    first = edgemoe.load(path, cluster=devices.address, device_memory=room)
    first.close()  # the devices now hold copies on their flash
    m = edgemoe.load(path, cluster=devices.address, device_memory=room)
    try:
        s = m.stats()["cluster"]["devices"]
        assert all(d["blob_bytes_sent"] == 0 and d["blobs_from_flash"] == d["experts"] > 0 for d in s.values())

        # a server that dies: its slots are computed here; refresh starts it again, from its flash
        cm = override(m)
        victim = cm.devices[0]
        ray.kill(victim.handle)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        assert m.stats()["cluster"]["devices"][victim.name]["state"] == "down"
        cm.refresh()
        d = m.stats()["cluster"]["devices"][victim.name]
        assert d["state"] == "up" and d["blob_bytes_sent"] == 0 and d["blobs_from_flash"] > d["experts"] > 0
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        assert m.stats()["cluster"]["devices"][victim.name]["calls"] > 0
    finally:
        m.close()


def test_a_damaged_copy_on_a_device_is_named(devices, models):
    path = models["mixtral"]
    edgemoe.load(path, cluster=devices.address, device_memory=expert_bytes(path) // 2).close()
    copies = sorted(devices.root.glob("device0/cluster/*/*.blob"))
    assert copies
    for copy in copies:  # whichever the device is given, its copy is damaged
        data = bytearray(copy.read_bytes())
        data[100] ^= 0xFF
        copy.write_bytes(bytes(data))
    try:
        with pytest.raises(
            ClusterError, match=r"its copy of expert \d+ of layer \d+ \(.*\.blob\) failed its checksum.*delete"
        ):
            edgemoe.load(path, cluster=devices.address, device_memory=expert_bytes(path) // 2)
        assert not ray.is_initialized()
    finally:
        for copy in copies:
            copy.unlink()


def test_a_node_removed_mid_generation_changes_no_token(devices, models):
    """Runs last: it takes a device node away."""
    path = models["mixtral"]
    _, want = single(path)
    # room for every expert on each device: they share them, and the survivor can take all
    m = edgemoe.load(path, cluster=devices.address, device_memory=expert_bytes(path))
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the run with the stacks, not never
    try:
        cm = override(m)
        victim = cm.devices[0]
        node = next(n for n in devices.nodes if n.node_id == victim.node.id)
        t0 = time.monotonic()
        got = []
        for i, token in enumerate(m.generate(PROMPT, max_new_tokens=2 * NEW, stream=True)):
            got.append(token)
            if i == 3:
                devices.cluster.remove_node(node, allow_graceful=False)
                # the server's worker outlives its raylet for a moment; a device that is gone is gone
                while not exited(victim.info["pid"]):
                    assert time.monotonic() - t0 < 30, "the removed node's server does not exit"
                    time.sleep(0.05)
        assert time.monotonic() - t0 < 60  # no hang: a dead device costs one deadline
        assert got == edgemoe.load(path).generate(PROMPT, max_new_tokens=2 * NEW)
        assert got[:NEW] == want
        s = m.stats()["cluster"]
        d = s["devices"][victim.name]
        assert d["state"] == "down" and d["failures"] == 1 and d["error"]
        assert s["recomputed_slots"] > 0
        cm._wait_rebalance()  # its experts went to the device left
        s = m.stats()["cluster"]
        survivor = next(name for name in s["devices"] if name != victim.name)
        assert s["assignment"][victim.name] == []
        assert len(s["assignment"][survivor]) == m.info()["moe_layers"] * m.info()["experts_per_layer"]
    finally:
        faulthandler.cancel_dump_traceback_later()
        m.close()
