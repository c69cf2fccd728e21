"""One model's experts across a local Ray cluster (edgemoe.cluster, docs/cluster.md).

Real Ray nodes as separate processes (ray.cluster_utils.Cluster): a head that offers no
device, and two nodes offering the `edgemoe` resource, each with its own $EDGEMOE_CACHE (its
flash); a third joins late in the module. Tiny checkpoints converted at 8 bits; every result
is compared with the same model loaded without a cluster, bit for bit.

The coordinator streams at its minimum budget, and plans with profile figures (a Raspberry
Pi 4 streaming from SD, Orin Nano devices on wired gigabit): experts of a few KB read from an
SD card cost more than a round trip, so the plans use the devices, as they would on boards.
A plan from this machine's own figures would keep tiny experts here (its disk beats Ray's
round trip on 2 busy cores).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

import edgemoe
from edgemoe.cluster import ClusterMoE, PlanFigures
from edgemoe.cluster.placement import Plan
from edgemoe.converters.convert import convert
from edgemoe.errors import ClusterError

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPT = [5, 17, 17, 3, 250, 0, 42, 9, 9, 100, 7, 64]
NEW = 12
BOARDS = PlanFigures(link="wired-gigabit", device="jetson-orin-nano-nvme", coordinator="raspberry-pi-4-sd")


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_models")
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        convert(tiny_checkpoint(arch), root / arch, bits=8, progress=False)
        out[arch] = root / arch
    convert(tiny_checkpoint("mixtral"), root / "mixtral4", bits=4, progress=False)
    out["mixtral4"] = root / "mixtral4"
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


def on_cluster(path, address, room, budget="min", **kw):
    """The model at its minimum budget, its experts planned over the cluster with board figures."""
    budget = edgemoe.load(path).min_budget if budget == "min" else budget
    kw.setdefault("cluster_figures", BOARDS)
    return edgemoe.load(path, memory_budget=budget, cluster=address, device_memory=room, **kw)


def expert_bytes(path) -> int:
    return edgemoe.load(path).info()["expert_bytes"]


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_server(d) -> None:
    """Kill a device's server and wait until its process is gone: ray.kill returns at once, and
    a server still alive would answer the next calls as if nothing had happened."""
    ray.kill(d.handle)
    end = time.monotonic() + 30
    while not exited(int(d.info["pid"])):
        assert time.monotonic() < end, "the killed server's process is still there after 30 s"
        time.sleep(0.01)


def override(m) -> ClusterMoE:
    assert isinstance(m.net.moe_override, ClusterMoE)
    return m.net.moe_override


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


def plan_held(s) -> dict[str, set[tuple[int, int]]]:
    """The plan in stats as device -> its (layer, expert) pairs."""
    plan = Plan.from_json(s["plan"])
    return {
        d.name: {(plan.moe_layers[m], int(e)) for m, e in zip(*np.nonzero(plan.held[i]))}
        for i, d in enumerate(plan.devices)
    }


@pytest.mark.parametrize("arch, data_path", [("mixtral", "socket"), ("qwen2_moe", "socket"), ("mixtral", "ray")])
def test_tokens_through_the_cluster_are_the_single_device_tokens(devices, models, arch, data_path):
    """Over each data path: the devices' own TCP channels (the default) and Ray actor calls."""
    path = models[arch]
    want_logits, want_tokens = single(path, edgemoe.load(path).min_budget)
    # each device has room for about a third of the experts: the rest stream through this process's cache
    m = on_cluster(path, devices.address, expert_bytes(path) // 3, cluster_path=data_path)
    try:
        got_logits = m.logits(PROMPT)  # prefill: every prompt token in one call per device and layer
        s = m.stats()["cluster"]
        assert s["path"] == data_path
        assert all((d.channel is not None) == (data_path == "socket") for d in override(m).devices)
        moe_layers = m.info()["moe_layers"]
        assert s["remote_slots"] > 0 and s["local_slots"] > 0
        for d in s["devices"].values():
            assert d["state"] == "up" and d["experts"] > 0
            assert 0 < d["calls"] <= moe_layers and d["rows_sent"] <= d["calls"] * len(PROMPT)
        # what runs is the plan kept in the stats
        assert {k: set(map(tuple, v)) for k, v in s["assignment"].items()} == plan_held(s)
        assert [e["reason"] for e in s["plans"]] == ["start"]
        np.testing.assert_array_equal(got_logits, want_logits)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want_tokens
        s = m.stats()["cluster"]
        assert s["recomputed_slots"] == 0 and all(d["failures"] == 0 for d in s["devices"].values())
        assert m.stats()["cache_misses"] > 0  # the coordinator's experts really streamed
    finally:
        m.close()
    assert m.net.moe_override is None and not ray.is_initialized()


def test_calls_carry_their_input_rounded_to_int8_where_it_changes_no_number(devices, models):
    """A 4-bit model: a call whose experts round x to int8 for their row counts (one row, or a
    long prompt's GEMM_MIN_TOKENS rows or more where the device has the integer prefill)
    carries x as those int8 values and block maxima, about a quarter of float32's bytes; the
    logits and the tokens are the single-device run's, and the same as with x sent as float32."""
    from edgemoe.cluster.server import PREFILL_ROUNDING

    path = models["mixtral4"]
    budget = edgemoe.load(path).min_budget
    long_prompt = [(7 * i + 3) % 250 for i in range(120)]  # every expert takes many rows
    ref = edgemoe.load(path, memory_budget=budget)
    want_one, want_long = ref.logits(PROMPT[:1]), ref.logits(long_prompt)
    want_tokens = ref.generate(PROMPT, max_new_tokens=NEW)
    m = on_cluster(path, devices.address, expert_bytes(path) // 3)
    try:
        moe = override(m)
        held = [pair for d in moe.devices for pair in d.pairs]
        assert held and all(moe.int8_input[pair] for pair in held)  # every 4-bit expert a device holds
        sent: dict[tuple[bool, str], int] = {}
        calls = {}
        for rounded in (True, False):
            moe.round_inputs = rounded
            for name, prompt, want in (("one", PROMPT[:1], want_one), ("long", long_prompt, want_long)):
                m.reset_stats()
                np.testing.assert_array_equal(m.logits(prompt), want)
                s = m.stats()["cluster"]
                calls[name] = sum(d["calls"] for d in s["devices"].values())
                rounded_calls = sum(d["rounded_calls"] for d in s["devices"].values())
                assert rounded_calls == (calls[name] if rounded and (name == "one" or PREFILL_ROUNDING) else 0)
                sent[rounded, name] = sum(d["bytes_sent"] for d in s["devices"].values())
                assert calls[name] > 0 and s["recomputed_slots"] == 0
            assert m.generate(PROMPT, max_new_tokens=NEW) == want_tokens
            assert m.stats()["cluster"]["recomputed_slots"] == 0
        hidden = m.info()["hidden_size"]
        saved = 4 * hidden - (hidden + 4 * hidden // 32)  # per row
        assert sent[False, "one"] - sent[True, "one"] == calls["one"] * saved
        if PREFILL_ROUNDING:  # the prompt's calls carry every row rounded
            assert sent[True, "long"] < sent[False, "long"] * 0.4
        else:
            assert sent[True, "long"] == sent[False, "long"]
    finally:
        m.close()


def test_replicated_experts_change_no_token(devices, models):
    """A plan with replicas: an expert on both devices goes, per call, to a device the call
    visits anyway, else to the quicker one; every expert's rows still go to one place."""
    from edgemoe.cluster.placement import CoordinatorSpec, DeviceSpec, model_inputs

    path = models["mixtral"]
    budget = edgemoe.load(path).min_budget
    want_logits, want_tokens = single(path, budget)
    sizes, stats, moe_layers = model_inputs(path, require_routing=False)
    held = np.zeros((2, *sizes.shape), bool)
    held[0, 0, :2] = held[1, 0, :] = True  # layer 0: experts 0-1 on both, 2-3 on the slower device only
    held[0, 1, :] = held[1, 1, 2:] = True  # layer 1: 2-3 on both, 0-1 on the quicker device only
    total = int(sizes.sum())
    plan = Plan(
        [DeviceSpec("quick", total, 18e9, 2e-4, 1e9), DeviceSpec("slow", total, 18e9, 4e-3, 5e7)],
        CoordinatorSpec(budget, 45e6, 1e-3, 4e9),
        sizes,
        held,
        np.zeros(sizes.shape, bool),
        moe_layers,
        stats.top_k,
        stats.hidden_size,
    )
    m = on_cluster(path, devices.address, expert_bytes(path), cluster_plan=plan)
    try:
        s = m.stats()["cluster"]
        assert [e["reason"] for e in s["plans"]] == ["the plan given"]
        assert Plan.from_json(s["plan"]).held.tolist() == held.tolist()
        np.testing.assert_array_equal(m.logits(PROMPT), want_logits)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want_tokens
        s = m.stats()["cluster"]
        assert s["remote_slots"] > 0 and s["local_slots"] == 0 and s["recomputed_slots"] == 0
        assert all(d["calls"] > 0 for d in s["devices"].values())
    finally:
        m.close()


def test_tokens_with_the_plan_from_measured_figures(devices, models):
    """Without profile figures the plan is made from the devices and this machine as measured
    (it may keep every expert here): the tokens are the same whatever it decides."""
    path = models["mixtral"]
    _, want = single(path, edgemoe.load(path).min_budget)
    m = on_cluster(path, devices.address, expert_bytes(path) // 2, cluster_figures=None)
    try:
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        plan = Plan.from_json(m.stats()["cluster"]["plan"])
        assert all(d.rtt_s > 0 and d.compute_bytes_per_s > 0 and d.link_bits_per_s > 0 for d in plan.devices)
        assert plan.coordinator.flash_bytes_per_s > 0 and plan.coordinator.compute_bytes_per_s > 0
        # the link both devices' payloads cross here, measured with both sending at once
        assert plan.coordinator.link_bits_per_s is not None and plan.coordinator.link_bits_per_s > 0
    finally:
        m.close()


def test_run_follows_a_plan_given_and_prints_it(devices, models, tmp_path, capsys):
    from edgemoe.cli import main
    from edgemoe.cluster.placement import CoordinatorSpec, DeviceSpec, model_inputs, plan_placement

    path = str(models["mixtral"])
    budget = edgemoe.load(path).min_budget
    sizes, stats, moe_layers = model_inputs(path, require_routing=False)
    fast = DeviceSpec("board-a", int(sizes.sum()) // 2, 18e9, 2e-4, 1e9)
    plan = plan_placement(
        [fast, DeviceSpec("board-b", int(sizes.sum()) // 2, 18e9, 2e-4, 1e9)],
        CoordinatorSpec(budget, 45e6, 1e-3, 4e9),
        sizes,
        stats,
        moe_layers,
        search_seconds=0.5,
    )
    (tmp_path / "plan.json").write_text(__import__("json").dumps(plan.to_json()))
    args = ["run", path, "-p", "The robot", "-n", "6", "--temperature", "0", "--memory-budget", str(budget), "--stats"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main([*args, "--cluster", devices.address, "--plan", str(tmp_path / "plan.json")]) == 0
    out, err = capsys.readouterr()
    assert out == alone
    assert f"cluster       {devices.address}:" in err and err.count(" up ") == 2
    assert "plan (the plan given)" in err and "expected MoE time per token" in err
    assert not ray.is_initialized()

    # a plan of another model is refused before anything starts
    other = plan.to_json()
    other["sizes"] = [[1 + x for x in row] for row in other["sizes"]]
    (tmp_path / "other.json").write_text(__import__("json").dumps(other))
    with pytest.raises(ClusterError, match="made for another model.*edgemoe cluster plan"):
        edgemoe.load(path, cluster=devices.address, cluster_plan=tmp_path / "other.json")
    with pytest.raises(ClusterError, match="cannot read the placement plan"):
        edgemoe.load(path, cluster=devices.address, cluster_plan=tmp_path / "missing.json")
    assert not ray.is_initialized()


def test_run_through_the_cluster_prints_its_statistics(devices, models, capsys):
    from edgemoe.cli import main

    path = str(models["mixtral"])
    args = ["run", path, "-p", "The robot", "-n", "6", "--temperature", "0", "--stats"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main([*args, "--cluster", devices.address, "--device-memory", "60KB", "--link", "wifi5"]) == 0
    out, err = capsys.readouterr()
    assert out == alone
    assert f"cluster       {devices.address}:" in err and err.count(" up ") == 2
    assert "plan (start)" in err
    assert not ray.is_initialized()


def test_a_device_that_misses_the_deadline_is_computed_here(devices, models):
    path = models["mixtral"]
    _, want = single(path, edgemoe.load(path).min_budget)
    m = on_cluster(path, devices.address, expert_bytes(path), cluster_timeout=1e-6)
    try:
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        s = m.stats()["cluster"]
        assert s["recomputed_slots"] > 0
        down = [d for d in s["devices"].values() if d["state"] == "down"]
        assert down and all("no answer within 0 ms" in d["error"] and d["failures"] == 1 for d in down)
    finally:
        m.close()


def test_a_channel_that_stalls_past_its_deadline_is_computed_here(devices, models):
    """A device's server stops answering on its channel mid-generation (its process stopped,
    its node alive): each call waits its deadline and no longer, the device's slots are
    computed here, the tokens do not change; once it runs again, a new server on the same
    device takes over (the stalled one's connection was dropped, its late answers never read)."""
    path = models["mixtral"]
    want = edgemoe.load(path, memory_budget=edgemoe.load(path).min_budget).generate(PROMPT, max_new_tokens=2 * NEW)
    m = on_cluster(path, devices.address, expert_bytes(path) // 2, cluster_timeout=0.3, cluster_retry=0.3)
    faulthandler.dump_traceback_later(180, exit=True)
    try:
        cm = override(m)
        assert cm.path == "socket"
        held = plan_held(m.stats()["cluster"])
        victim = next(d for d in cm.devices if held.get(d.name))
        pid = victim.info["pid"]
        got = []
        try:
            for i, token in enumerate(m.generate(PROMPT, max_new_tokens=2 * NEW, stream=True)):
                got.append(token)
                if i == 3:
                    os.kill(pid, signal.SIGSTOP)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert got == want
        s = m.stats()["cluster"]
        assert s["devices"][victim.name]["failures"] >= 1 and s["recomputed_slots"] > 0
        assert s["max_wait_seconds"] <= 2 * 1e-3 * s["max_deadline_ms"]
        wait_for(cm, lambda: m.stats()["cluster"]["devices"][victim.name]["recoveries"] >= 1)
        assert any(f"{victim.name} down: no answer within" in e["reason"] for e in cm.plan_events)
        assert m.stats()["cluster"]["devices"][victim.name]["state"] == "up"
        assert m.generate(PROMPT, max_new_tokens=2 * NEW) == want
    finally:
        faulthandler.cancel_dump_traceback_later()
        m.close()


def test_a_server_started_again_reads_its_experts_from_its_flash(devices, models):
    path = models["mixtral"]
    _, want = single(path, edgemoe.load(path).min_budget)
    room = expert_bytes(path) // 2
    first = on_cluster(path, devices.address, room)
    first.close()  # the devices now hold copies on their flash
    m = on_cluster(path, devices.address, room)
    try:
        s = m.stats()["cluster"]["devices"]
        assert all(d["blob_bytes_sent"] == 0 and d["blobs_from_flash"] == d["experts"] > 0 for d in s.values())

        # a server that dies: its slots are computed here; refresh starts it again, from its flash
        cm = override(m)
        victim = cm.devices[0]
        kill_server(victim)
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
    on_cluster(path, devices.address, expert_bytes(path) // 2).close()
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
            on_cluster(path, devices.address, expert_bytes(path) // 2)
        assert not ray.is_initialized()
    finally:
        for copy in copies:
            copy.unlink()


def wait_for(cm: ClusterMoE, what, seconds: float = 60.0) -> None:
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < seconds, "the cluster did not plan again in time"
        time.sleep(0.05)
    cm.settle()


def test_a_device_down_comes_back_by_itself(devices, models):
    """A server that dies is started again by the watcher after cluster_retry, from its
    flash, without a refresh; a device that fails again waits twice as long."""
    path = models["mixtral"]
    _, want = single(path, edgemoe.load(path).min_budget)
    # a second: the generation that finds the server dead ends well before the watcher retries
    m = on_cluster(path, devices.address, expert_bytes(path) // 2, cluster_retry=1.0)
    try:
        cm = override(m)
        victim = cm.devices[0]
        kill_server(victim)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        d = m.stats()["cluster"]["devices"][victim.name]
        # marked down by that generation (on a slow machine the watcher may have brought it back already)
        assert d["failures"] == 1 and d["retry_wait_s"] == 1.0
        wait_for(cm, lambda: m.stats()["cluster"]["devices"][victim.name]["state"] == "up")
        d = m.stats()["cluster"]["devices"][victim.name]
        assert d["recoveries"] == 1 and d["failures"] == 1 and d["error"] is None
        assert d["blobs_from_flash"] > 0  # what it held before comes from its flash (a new plan may add others)
        assert any(f"{victim.name} tried again" in e["reason"] for e in cm.plan_events)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        assert m.stats()["cluster"]["devices"][victim.name]["calls"] > 0

        again = cm.devices[victim.index]  # the new server; killed at once, it backs off longer
        kill_server(again)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
        d = m.stats()["cluster"]["devices"][victim.name]
        assert d["failures"] == 2 and d["retry_wait_s"] == 2.0
        assert d["state"] == "up" or d["retry_in_s"] <= 2.0
        wait_for(cm, lambda: m.stats()["cluster"]["devices"][victim.name]["recoveries"] == 2)
        assert m.generate(PROMPT, max_new_tokens=NEW) == want
    finally:
        m.close()


def test_the_deadline_grows_with_what_a_call_carries(devices, models):
    """A base deadline of 2 ms plus each call's bytes over the link (the crowded Wi-Fi
    profile's 50 Mbit/s) and its rows at the device's compute: a 240-token prompt's calls,
    which carry tens of KB, are given tens of milliseconds and none is taken for a dead
    device."""
    path = models["mixtral"]
    prompt = (PROMPT * 20)[:240]
    want = edgemoe.load(path, memory_budget=edgemoe.load(path).min_budget).logits(prompt)
    from edgemoe.cluster.placement import CoordinatorSpec, DeviceSpec, model_inputs, plan_placement

    budget = edgemoe.load(path).min_budget
    sizes, stats, moe_layers = model_inputs(path, require_routing=False)
    boards = [DeviceSpec(f"board-{i}", int(sizes.sum()), 18e9, 2e-4, 1e9) for i in range(2)]
    plan = plan_placement(
        boards, CoordinatorSpec(budget, 45e6, 1e-3, 4e9), sizes, stats, moe_layers, search_seconds=0.2
    )
    figures = PlanFigures(link="crowded-wifi", device="jetson-orin-nano-nvme", coordinator="raspberry-pi-4-sd")
    m = on_cluster(
        path, devices.address, expert_bytes(path), cluster_timeout=0.002, cluster_figures=figures, cluster_plan=plan
    )
    try:
        assert np.array_equal(m.logits(prompt), want)
        s = m.stats()["cluster"]
        assert s["remote_slots"] > 0 and s["recomputed_slots"] == 0
        assert all(d["failures"] == 0 for d in s["devices"].values())
        hidden, top_k = 64, 2
        slots = len(prompt) * top_k // len(s["devices"])  # some device answers at least this many rows
        assert s["max_deadline_ms"] > 2 + 1e3 * 8 * slots * hidden * 4 / 50e6
    finally:
        m.close()


def test_a_node_joining_mid_generation_gets_experts(devices, models):
    """Adds a third device node: later tests run with it."""
    path = models["mixtral"]
    reference = edgemoe.load(path, memory_budget=edgemoe.load(path).min_budget)
    want = reference.generate(PROMPT, max_new_tokens=2 * NEW)
    m = on_cluster(path, devices.address, expert_bytes(path) // 3)
    faulthandler.dump_traceback_later(180, exit=True)
    try:
        cm = override(m)
        got = []
        for i, token in enumerate(m.generate(PROMPT, max_new_tokens=2 * NEW, stream=True)):
            got.append(token)
            if i == 3:
                node = devices.cluster.add_node(
                    num_cpus=1, resources={"edgemoe": 1}, env_vars={"EDGEMOE_CACHE": str(devices.root / "device2")}
                )
                devices.nodes.append(node)
                wait_for(cm, lambda: any("joined" in e["reason"] for e in cm.plan_events))
                m.reset_stats()
        assert got == want
        s = m.stats()["cluster"]
        joined = next(name for name, d in s["devices"].items() if d["node"] == node.node_id)
        assert s["devices"][joined]["state"] == "up" and s["devices"][joined]["experts"] > 0
        assert joined in plan_held(s) and s["devices"][joined]["calls"] > 0
        assert s["plans"][-1]["reason"] == f"{joined} joined" and len(s["plans"][-1]["devices"]) == 3
    finally:
        faulthandler.cancel_dump_traceback_later()
        m.close()


def test_a_node_killed_mid_generation_changes_no_token(devices, models):
    """Runs last: it takes a device node away."""
    path = models["mixtral"]
    want = edgemoe.load(path, memory_budget=edgemoe.load(path).min_budget).generate(PROMPT, max_new_tokens=2 * NEW)
    m = on_cluster(path, devices.address, expert_bytes(path) // 2)
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the run with the stacks, not never
    try:
        cm = override(m)
        held = plan_held(m.stats()["cluster"])
        victim = next(d for d in cm.devices if held.get(d.name))
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
        assert got == want
        s = m.stats()["cluster"]
        assert s["path"] == "socket"  # the default data path: the devices' own TCP channels
        d = s["devices"][victim.name]
        assert d["state"] == "down" and d["failures"] == 1 and d["error"]
        wait_for(cm, lambda: any(victim.name in e["reason"] for e in cm.plan_events))
        s = m.stats()["cluster"]
        assert s["assignment"][victim.name] == [] and victim.name not in plan_held(s)
        event = next(e for e in s["plans"] if victim.name in e["reason"])
        assert "down" in event["reason"] and victim.name not in event["devices"]
        # and the plan for the devices left gives the same tokens
        assert m.generate(PROMPT, max_new_tokens=2 * NEW) == want
    finally:
        faulthandler.cancel_dump_traceback_later()
        m.close()
