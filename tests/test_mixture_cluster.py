"""The mixture's specialists as Ray actors pinned to real nodes (ray.cluster_utils.Cluster):
the same tokens as in one process, and a node killed mid-request."""

from __future__ import annotations

import time
from types import SimpleNamespace

import psutil
import pytest

import edgemoe

ray = pytest.importorskip("ray")
tiny_mixture = pytest.importorskip("tiny_mixture")
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPT = [0, 5, 17, 17, 3, 250, 42, 9, 100, 7]
NEW = 10


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Ray puts the driver's working directory on every node's import path: from the root of a
    source checkout the nodes would import its unbuilt edgemoe/ instead of the installed one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("coordinator_cwd"))
        yield


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return tiny_mixture.make_mixture(tmp_path_factory.mktemp("mixture") / "mix")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=1, resources={"edgemoe": 1}) for _ in range(3)]
    c.wait_for_nodes()
    yield SimpleNamespace(cluster=c, address=c.address, nodes=nodes)
    ray.shutdown()
    c.shutdown()


def test_specialists_on_their_nodes_give_the_tokens_of_one_process(mix, cluster):
    with edgemoe.load_mixture(mix) as m:
        want = m.generate(PROMPT, NEW)
    with edgemoe.load_mixture(mix, cluster=cluster.address) as m:
        where = {n: m.members[n].node.id for n in m.names}
        assert len(set(where.values())) == 3  # one node each
        pids = {m.members[n].result(m.members[n].call("info"), 30)["pid"] for n in m.names}
        assert len(pids) == 3
        assert m.generate(PROMPT, NEW) == want
        s = m.stats()
        assert all(s["specialists"][n]["where"] != "this process" for n in m.names)
    # the per-token calls as Ray actor calls (the path the channel replaced) give the same tokens
    with edgemoe.load_mixture(mix, cluster=cluster.address, transport="ray") as m:
        assert all(m.members[n].link is None for n in m.names)
        assert m.generate(PROMPT, NEW) == want


def test_a_slow_node_is_left_out_of_the_steps_it_misses_and_the_tokens_are_those_of_one_process(mix, cluster):
    """Over the actors' channels a late specialist's calls queue behind the one it computes:
    it misses every decode step's deadline, the request finishes from the other, and the
    tokens are those of the same request in one process with the same specialist late."""
    got = {}
    for where in (None, cluster.address):
        with edgemoe.load_mixture(mix, cluster=where) as m:
            (slow, _), _ = m.route(PROMPT)
            if where is None:
                m.members[slow].server.set_pace(0.3)
            else:
                m.members[slow].result(m.members[slow].handle.set_pace.remote(0.3), 30)
            m.enable(m.names, latency_budget=0.1)
            a = m.generate(PROMPT, NEW, details=True)
            assert len(a.tokens) == NEW and not a.dropped and a.late == {slow: list(range(1, NEW))}
            assert m.stats()["specialists"][slow]["late_steps"] == NEW - 1
            got[where] = a.tokens
    assert got[None] == got[cluster.address]


def test_a_node_killed_mid_request_is_dropped_and_the_request_finishes(mix, cluster):
    with edgemoe.load_mixture(mix, cluster=cluster.address, timeout_s=20) as m:
        serving, _ = m.route(PROMPT)
        victim = serving[0]
        node = next(n for n in cluster.nodes if n.node_id == m.members[victim].node.id)
        steps = m.stream(PROMPT, NEW)
        got = [next(steps) for _ in range(3)]
        pid = m.infos[victim]["pid"]
        cluster.cluster.remove_node(node, allow_graceful=False)  # the device dies mid-request
        t0 = time.monotonic()
        while not exited(pid):  # the actor's worker outlives its raylet for a moment
            assert time.monotonic() - t0 < 30, "the removed node's specialist does not exit"
            time.sleep(0.05)
        got += list(steps)
        a = m.last
        assert len(got) == NEW and a.tokens == got
        assert [d["name"] for d in a.dropped] == [victim]
        assert a.dropped[0]["at_token"] >= 3
        assert f"specialist {victim} was dropped" in a.note and serving[1] in a.note
        # the next request is served by the others without waiting for the dead one
        b = m.generate(PROMPT, 3, details=True)
        assert victim not in b.specialists and not b.dropped
