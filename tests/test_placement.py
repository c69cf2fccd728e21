"""The placement planner: the routing model on cases whose answer is known, the cost model on
hand-computed cases, the optimiser against brute force over every assignment, memory caps,
errors that name the problem, the plan's JSON, and `edgemoe cluster plan` end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from edgemoe.cli import main
from edgemoe.cluster import placement as P
from edgemoe.cluster.placement import CoordinatorSpec, DeviceSpec, Plan, RoutingStats
from edgemoe.errors import EdgeMoEError, PlacementError

MB = 1_000_000
HIDDEN = 1000  # payload: 2 x 1000 float32 = 64 000 bits, 64 us at 1 Gbit/s
PAY = 64e-6


def plan_of(devices, coord, sizes, stats, held=(), local=()):
    """A plan with chosen holders: held = [(device, layer, expert)], local = [(layer, expert)]."""
    sizes = np.asarray(sizes, np.int64)
    h = np.zeros((len(devices), *sizes.shape), bool)
    for d, m, e in held:
        h[d, m, e] = True
    loc = np.zeros(sizes.shape, bool)
    for m, e in local:
        loc[m, e] = True
    return Plan(list(devices), coord, sizes, h, loc, list(range(sizes.shape[0])), stats.top_k, stats.hidden_size)


# -- the routing model -------------------------------------------------------------------------
def test_top1_sets_have_the_usage_shares():
    s = P.layer_sets(RoutingStats(np.array([[30, 10, 0]]), 1, HIDDEN), 0)
    assert s.exact
    assert {tuple(np.flatnonzero(u)): round(float(p), 12) for u, p in zip(s.used, s.p)} == {(0,): 0.75, (1,): 0.25}


def test_top2_sets_keep_each_experts_inclusion_probability():
    usage = np.array([[40, 30, 20, 6, 3, 1]])  # inclusion 0.8, 0.6, 0.4, 0.12, 0.06, 0.02
    s = P.layer_sets(RoutingStats(usage, 2, HIDDEN), 0)
    assert (s.used.sum(1) == 2).all()  # every token has exactly top_k distinct experts
    np.testing.assert_allclose(s.p @ s.used, 2 * usage[0] / usage.sum(), atol=1e-8)
    # an expert with inclusion 1 is in every set
    s = P.layer_sets(RoutingStats(np.array([[10, 5, 5]]), 2, HIDDEN), 0)
    got = {tuple(np.flatnonzero(u)): round(float(p), 6) for u, p in zip(s.used, s.p) if p > 1e-6}
    assert got == {(0, 1): 0.5, (0, 2): 0.5}


def test_sampled_sets_keep_inclusion_probabilities():
    rng = np.random.default_rng(0)
    usage = rng.integers(1, 100, (1, 64)) ** 2
    s = P.layer_sets(RoutingStats(usage, 4, HIDDEN), 0, samples=4000)
    assert not s.exact and (s.used.sum(1) == 4).all()
    target = np.minimum(1, 4 * usage[0] / usage.sum())
    assert np.abs(s.p @ s.used - target).max() < 0.03


def grouped_trace_stats(T=400):
    """Half the tokens use experts {0, 1} at both layers, half {2, 3}: 0 and 1 always together."""
    usage = np.full((2, 4), T // 2)
    c1 = np.zeros((2, 4, 4), np.int64)
    for group in ((0, 1), (2, 3)):
        for i, j in itertools.product(group, group):
            c1[1, i, j] = T // 2
    return usage, c1


def test_first_order_table_makes_co_used_experts_co_occur():
    usage, c1 = grouped_trace_stats()
    s = P.layer_sets(RoutingStats(usage, 2, HIDDEN, c1), 1)
    got = {tuple(np.flatnonzero(u)): round(float(p), 9) for u, p in zip(s.used, s.p)}
    assert got == {(0, 1): 0.5, (2, 3): 0.5}
    s = P.layer_sets(RoutingStats(usage, 2, HIDDEN, None), 1)  # no table: independence, all six pairs
    assert len(s.p) == 6 and np.allclose(s.p, 1 / 6)


# -- the cost model, by hand --------------------------------------------------------------------
COORD = CoordinatorSpec(cache_bytes=20 * MB, flash_bytes_per_s=1e8, flash_latency_s=1e-3, compute_bytes_per_s=1e9)
DEV = DeviceSpec("d", 10 * MB, compute_bytes_per_s=2e9, rtt_s=1e-3, link_bits_per_s=1e9)
DEV2 = DeviceSpec("e", 10 * MB, compute_bytes_per_s=2e9, rtt_s=1e-3, link_bits_per_s=1e9)


def test_cost_of_streaming_from_flash():
    # P({0}) = 0.75, P({1}) = 0.25; an expert from flash: latency + bytes / bandwidth, then compute
    st = RoutingStats(np.array([[3, 1]]), 1, HIDDEN)
    plan = plan_of([], COORD, [[4 * MB, 2 * MB]], st)
    t0 = 1e-3 + 0.04 + 0.004
    t1 = 1e-3 + 0.02 + 0.002
    assert P.expected_token_seconds(plan, st) == pytest.approx(0.75 * t0 + 0.25 * t1, rel=1e-12)


def test_cost_of_a_device_and_the_coordinators_cache():
    st = RoutingStats(np.array([[3, 1]]), 1, HIDDEN)
    remote0 = PAY + 1e-3 + 4 * MB / 2e9  # payload + round trip + compute on the device
    plan = plan_of([DEV], COORD, [[4 * MB, 2 * MB]], st, held=[(0, 0, 0)])
    assert P.expected_token_seconds(plan, st) == pytest.approx(0.75 * remote0 + 0.25 * (1e-3 + 0.02 + 0.002))
    plan = plan_of([DEV], COORD, [[4 * MB, 2 * MB]], st, held=[(0, 0, 0)], local=[(0, 1)])
    assert P.expected_token_seconds(plan, st) == pytest.approx(0.75 * remote0 + 0.25 * 2 * MB / 1e9)


def test_cost_of_two_experts_per_token():
    st = RoutingStats(np.array([[1, 1]]), 2, HIDDEN)  # every token uses both
    sizes = [[4 * MB, 2 * MB]]
    flash = plan_of([], COORD, sizes, st)  # reads one after the other, then both computes
    assert P.expected_token_seconds(flash, st) == pytest.approx((1e-3 + 0.04) + (1e-3 + 0.02) + 0.006)
    mixed = plan_of([DEV], COORD, sizes, st, held=[(0, 0, 0)], local=[(0, 1)])  # in parallel: the slower
    assert P.expected_token_seconds(mixed, st) == pytest.approx(max(2e-3, PAY + 1e-3 + 2e-3))
    # one device computes both, one after the other, and sends both outputs back
    together = plan_of([DEV, DEV2], COORD, sizes, st, held=[(0, 0, 0), (0, 0, 1)])
    assert P.expected_token_seconds(together, st) == pytest.approx(1.5 * PAY + 1e-3 + 3e-3)
    apart = plan_of([DEV, DEV2], COORD, sizes, st, held=[(0, 0, 0), (1, 0, 1)])  # two payloads on one medium
    assert P.expected_token_seconds(apart, st) == pytest.approx(2 * PAY + 1e-3 + 2e-3)
    # a coordinator whose own link is 10x the devices' (a switch): the devices' links carry
    # their payloads at once, and the coordinator's carries both at its rate
    switch = dataclasses.replace(COORD, link_bits_per_s=1e10)
    apart = plan_of([DEV, DEV2], switch, sizes, st, held=[(0, 0, 0), (1, 0, 1)])
    assert P.expected_token_seconds(apart, st) == pytest.approx(PAY + 1e-3 + 2e-3 + PAY / 10)
    together = plan_of([DEV, DEV2], switch, sizes, st, held=[(0, 0, 0), (0, 0, 1)])
    assert P.expected_token_seconds(together, st) == pytest.approx(1.5 * PAY + 1e-3 + 3e-3)
    # a hit computes while the misses are read; the misses compute after
    part = plan_of([], CoordinatorSpec(20 * MB, 1e8, 1e-3, 1e8), sizes, st, local=[(0, 0)])
    assert P.expected_token_seconds(part, st) == pytest.approx(max(0.04, 1e-3 + 0.02) + 0.02)


def test_dispatch_sends_a_replica_to_a_device_the_token_already_visits():
    st = RoutingStats(np.array([[1, 1, 1]]), 2, HIDDEN)
    slow = DeviceSpec("slow", 10 * MB, 1e9, 4e-3, 1e9)
    plan = plan_of([DEV, slow], COORD, [[MB, MB, MB]], st, held=[(0, 0, 0), (1, 0, 1), (0, 0, 2), (1, 0, 2)])
    assert P.dispatch(plan, 0, [1, 2]) == {"local": [], "flash": [], "slow": [1, 2]}
    assert P.dispatch(plan, 0, [0, 2]) == {"local": [], "flash": [], "d": [0, 2]}
    plan.held[1, 0, 0] = False
    plan.local[0, 0] = True
    assert P.dispatch(plan, 0, [0, 2]) == {"local": [0], "flash": [], "d": [2]}  # replica: the quicker device


@pytest.mark.parametrize("seed", range(6))
def test_the_runtimes_dispatcher_makes_the_cost_models_choices(seed):
    """What the cluster runs (Dispatcher.choose, per call) is what the plan was scored on
    (_serve), for every set of random plans with replicas; with a device down, its experts go
    to their other holders or to the coordinator."""
    rng = np.random.default_rng(seed)
    M, E, k = 2, 6, 2
    sizes = rng.integers(1, 5, (M, E)) * MB
    st = RoutingStats(rng.integers(1, 20, (M, E)), k, HIDDEN)
    devs = [
        DeviceSpec(f"d{i}", 100 * MB, float(rng.choice([1e9, 4e9])), float(rng.choice([2e-4, 4e-3])), 1e9)
        for i in range(3)
    ]
    plan = plan_of(devs, COORD, sizes, st)
    plan.held[:] = rng.random(plan.held.shape) < 0.5
    plan.local[:] = rng.random(plan.local.shape) < 0.2
    c = P._Costs.of(plan.devices, plan.coordinator, plan.sizes, HIDDEN)
    for m in range(M):
        sets = P.layer_sets(st, m)
        _, want = P._serve(c, m, sets, plan.held[:, m], plan.local[m])
        d = P.Dispatcher(plan)
        got = np.stack([d.choose(m, row) for row in sets.idx])
        np.testing.assert_array_equal(got, want)
        # device 0 down: the plan as if it held nothing
        down = P.Dispatcher(plan, up=[False, True, True])
        without = plan.held[:, m].copy()
        without[0] = False
        _, want = P._serve(c, m, sets, without, plan.local[m])
        np.testing.assert_array_equal(np.stack([down.choose(m, row) for row in sets.idx]), want)
        assert not (np.stack([down.choose(m, row) for row in sets.idx]) == 0).any()


# -- the optimiser ------------------------------------------------------------------------------
def brute_force(devices, coord, sizes, stats):
    """The best expected time over every assignment of holders (a subset of the devices with
    room and the coordinator's cache) to every expert, within every memory cap."""
    sizes = np.asarray(sizes, np.int64)
    M, E = sizes.shape
    D = len(devices)
    c = P._Costs.of(devices, coord, sizes, stats.hidden_size)
    sets = [P.layer_sets(stats, m) for m in range(M)]
    caps = [max(0, d.expert_bytes) for d in devices] + [P.pinnable(coord.cache_bytes, sizes, stats.top_k)]
    holders = [h for h in range(D + 1) if caps[h] > 0]
    options = [
        sum((1 << holders[i]) for i in range(len(holders)) if bits >> i & 1) for bits in range(1 << len(holders))
    ]
    best = float("inf")
    for combo in itertools.product(options, repeat=M * E):
        held = np.array(
            [[[mask >> h & 1 for mask in combo[m * E : (m + 1) * E]] for m in range(M)] for h in range(D + 1)], bool
        )
        if any((held[h] * sizes).sum() > caps[h] for h in range(D + 1)):
            continue
        best = min(best, sum(P._layer_cost(c, m, sets[m], held[:D, m], held[D, m]) for m in range(M)))
    return best


def trace_stats(rng, M, E, k, T=300):
    """usage and first-order counts of a random trace in which layer m's experts tend to
    follow layer m-1's (expert i at m-1 makes i+1 likely at m)."""
    usage = np.zeros((M, E), np.int64)
    c1 = np.zeros((M, E, E), np.int64)
    for _ in range(T):
        prev = None
        for m in range(M):
            w = rng.random(E) ** 3 + 1e-3
            if prev is not None:
                w[(prev + 1) % E] += 2.0
            cur = rng.choice(E, k, replace=False, p=w / w.sum())
            usage[m, cur] += 1
            if prev is not None:
                c1[m][np.ix_(prev, cur)] += 1
            prev = cur
    return usage, c1


def random_case(seed, M, E, coordinator_room, table=False):
    rng = np.random.default_rng(seed)
    k = 1 if E <= 3 else 2
    sizes = rng.integers(1, 9, (M, E)) * MB
    usage, c1 = trace_stats(rng, M, E, k) if table else (rng.integers(1, 50, (M, E)), None)
    devices = []
    for i in range(2):
        ram = int(rng.integers(0, 3) * 4 * MB + rng.integers(0, 2) * 3 * MB)
        devices.append(
            DeviceSpec(
                f"d{i}",
                ram if ram == 0 or ram >= sizes.min() else 0,
                float(rng.choice([5e8, 2e9, 8e9])),
                float(rng.choice([2e-4, 1e-3, 4e-3])),
                float(rng.choice([5e7, 3e8, 1e9])),
            )
        )
    reserve = P.stream_reserve(sizes, k)
    room = int(rng.integers(1, 3)) * 4 * MB if coordinator_room else 0
    coord = CoordinatorSpec(reserve + room, float(rng.choice([5e7, 2e8, 1e9])), 1e-4, 4e9)
    return devices, coord, sizes, RoutingStats(usage, k, int(rng.choice([512, 4096])), c1)


# (layers, experts, room in the coordinator's cache, first-order co-use table) x seeds: 40
# problems, on which the plan is optimal (docs/cluster.md has a longer run). The search has a
# time budget, so a slower machine may stop it earlier: every plan within TOLERANCE, 90% equal.
TOLERANCE = 0.01
SHAPES = [(1, 4, False, False), (2, 3, False, False), (1, 3, True, False), (2, 3, False, True), (2, 2, True, True)]
SEEDS = range(8)


def test_greedy_is_within_tolerance_of_brute_force():
    ratios = []
    for seed, (M, E, room, table) in itertools.product(SEEDS, SHAPES):
        devices, coord, sizes, st = random_case(seed, M, E, room, table)
        best = brute_force(devices, coord, sizes, st)
        plan = P.plan_placement(devices, coord, sizes, st, search_seconds=1.0)
        assert plan.expected_token_s == pytest.approx(P.expected_token_seconds(plan, st), rel=1e-12)
        assert plan.expected_token_s >= best * (1 - 1e-12)
        ratios.append(plan.expected_token_s / best)
    assert max(ratios) <= 1 + TOLERANCE, ratios
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 0.9 * len(ratios), ratios


def test_obvious_answers_are_found():
    st = RoutingStats(np.array([[5, 3, 2, 1], [1, 2, 3, 4]]), 2, HIDDEN)
    sizes = np.full((2, 4), 2 * MB)
    tight = CoordinatorSpec(P.stream_reserve(sizes, 2), 1e8, 1e-3, 1e9)
    # a fast device with room for every expert holds all of them; a device with no RAM gets nothing
    fast = DeviceSpec("fast", 100 * MB, 1e10, 2e-4, 1e9)
    empty = DeviceSpec("empty", 0, 1e10, 2e-4, 1e9)
    plan = P.plan_placement([empty, fast], tight, sizes, st)
    assert plan.held[1].all() and not plan.held[0].any() and not plan.local.any()
    assert plan.served["fast"] == pytest.approx(1.0) and plan.served["empty"] == 0.0
    # the coordinator's cache holds everything: no device helps
    roomy = CoordinatorSpec(100 * MB, 1e8, 1e-3, 1e9)
    plan = P.plan_placement([DeviceSpec("slow", 100 * MB, 1e8, 4e-3, 5e7)], roomy, sizes, st)
    assert plan.local.all() and not plan.held.any()
    assert plan.expected_token_s == pytest.approx(plan.alone_token_s)
    # room for one expert per layer: the most used one
    one = DeviceSpec("one", 4 * MB, 1e10, 2e-4, 1e9)
    plan = P.plan_placement([one], tight, sizes, st)
    assert [np.flatnonzero(plan.held[0, m]).tolist() for m in range(2)] == [[0], [3]]


def test_co_used_experts_stay_together_when_payloads_cost_more_than_compute():
    usage, c1 = grouped_trace_stats()
    st = RoutingStats(usage, 2, 4096, c1)  # 4096 float32 out and back: 262 us per device at 1 Gbit/s
    sizes = np.full((2, 4), 100_000)  # small experts: 10 us of compute each
    devices = [DeviceSpec(n, 400_000, 1e10, 2e-4, 1e9) for n in ("a", "b")]  # room for half the experts each
    coord = CoordinatorSpec(P.stream_reserve(sizes, 2), 1e7, 1e-3, 1e9)  # slow flash: devices win
    plan = P.plan_placement(devices, coord, sizes, st)
    assert plan.held.any(0).all()  # every expert on a device
    for d in range(2):  # a device holds both of a pair at layer 1, or neither
        held = set(np.flatnonzero(plan.held[d, 1]))
        assert all(len(held & pair) in (0, 2) for pair in ({0, 1}, {2, 3})), held
    crossed = plan_of(
        devices,
        coord,
        sizes,
        st,
        held=[(0, 0, 0), (0, 0, 2), (1, 0, 1), (1, 0, 3), (0, 1, 0), (0, 1, 2), (1, 1, 1), (1, 1, 3)],
    )
    assert plan.expected_token_s < P.expected_token_seconds(crossed, st)


def test_the_coordinator_takes_whole_layers_when_round_trips_cost_most():
    # uniform routing, top-2 of 4: a layer skips the device's round trip only when both of the
    # token's experts are in the coordinator's cache, which has room for two of four layers
    st = RoutingStats(np.ones((4, 4), np.int64), 2, HIDDEN)
    sizes = np.full((4, 4), 2 * MB)
    device = DeviceSpec("far", 100 * MB, 1e10, 4e-3, 1e9)  # holds everything, 4 ms away
    coord = CoordinatorSpec(P.stream_reserve(sizes, 2) + 16 * MB, 1e8, 1e-3, 1e10)
    for seconds in (0.0, 1.0):  # the constructions alone, then with the search
        plan = P.plan_placement([device], coord, sizes, st, search_seconds=seconds)
        assert sorted(plan.local.sum(1).tolist()) == [0, 0, 4, 4], plan.local
        spread = plan_of(
            [device],
            coord,
            sizes,
            st,
            held=[(0, m, e) for m in range(4) for e in range(4)],
            local=[(m, e) for m in range(4) for e in range(2)],
        )
        assert plan.expected_token_s < P.expected_token_seconds(spread, st)


@pytest.mark.parametrize("seed", range(4))
def test_memory_caps_hold(seed):
    rng = np.random.default_rng(100 + seed)
    M, E, k = 4, 16, 2
    sizes = rng.integers(1, 6, (M, E)) * MB
    st = RoutingStats(rng.integers(1, 100, (M, E)) ** 2, k, 2048)
    devices = [
        DeviceSpec(f"d{i}", int(rng.integers(0, 30)) * MB, float(rng.choice([1e9, 1e10])), 2e-4, 1e9) for i in range(3)
    ]
    devices = [
        d if d.expert_bytes >= 5 * MB else DeviceSpec(d.name, 0, d.compute_bytes_per_s, d.rtt_s, d.link_bits_per_s)
        for d in devices
    ]
    coord = CoordinatorSpec(P.stream_reserve(sizes, k) + int(rng.integers(0, 20)) * MB, 2e8, 1e-4, 4e9)
    plan = P.plan_placement(devices, coord, sizes, st, search_seconds=0.5)
    for d, used in zip(devices, plan.device_bytes()):
        assert used <= d.expert_bytes
        if d.expert_bytes == 0:
            assert used == 0 and plan.served[d.name] == 0.0
    assert (plan.local * sizes).sum() <= P.pinnable(coord.cache_bytes, sizes, k)
    assert sum(plan.served.values()) == pytest.approx(1.0)
    assert plan.expected_token_s <= plan.alone_token_s * (1 + 1e-12)


# -- errors -------------------------------------------------------------------------------------
def test_plans_that_cannot_be_made_say_why():
    st = RoutingStats(np.array([[3, 1]]), 1, HIDDEN)
    sizes = np.array([[4 * MB, 2 * MB]])
    with pytest.raises(PlacementError, match="device pi has -.* of RAM for experts"):
        P.plan_placement([DeviceSpec("pi", -MB, 1e9, 1e-3, 1e9)], COORD, sizes, st)
    with pytest.raises(
        PlacementError, match=r"device pi has 1\.0 MB for experts, less than the smallest expert \(2\.0 MB\)"
    ):
        P.plan_placement([DeviceSpec("pi", MB, 1e9, 1e-3, 1e9)], COORD, sizes, st)
    with pytest.raises(PlacementError, match=r"coordinator's expert cache \(1\.0 MB\) cannot hold one layer's top-1"):
        P.plan_placement([DEV], CoordinatorSpec(MB, 1e8, 1e-3, 1e9), sizes, st)
    with pytest.raises(PlacementError, match="expert sizes .* and routing usage .* differ"):
        P.plan_placement([DEV], COORD, np.ones((2, 2), np.int64), st)
    with pytest.raises(PlacementError, match="device names must differ"):
        P.plan_placement([DEV, DEV], COORD, sizes, st)
    assert issubclass(PlacementError, EdgeMoEError) and issubclass(PlacementError, ValueError)


def test_profile_device_without_room_after_the_reserve():
    from edgemoe.devices import load_profile

    pi = load_profile("raspberry-pi-4-sd")
    spec = DeviceSpec.from_profile(pi, reserve_bytes=pi.ram_bytes + 1)
    with pytest.raises(PlacementError, match="raspberry-pi-4-sd has"):
        P.plan_placement([spec], COORD, np.array([[MB, MB]]), RoutingStats(np.array([[1, 1]]), 1, HIDDEN))


# -- the plan as data ---------------------------------------------------------------------------
def test_plan_round_trips_through_json_and_prints():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 4, (3, 6)) * MB
    st = RoutingStats(rng.integers(1, 30, (3, 6)), 2, HIDDEN)
    coord = CoordinatorSpec(P.stream_reserve(sizes, 2) + 3 * MB, 1e8, 1e-3, 1e9)
    plan = P.plan_placement([DEV, DEV2], coord, sizes, st, search_seconds=0.5)
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert (again.held == plan.held).all() and (again.local == plan.local).all() and (again.sizes == plan.sizes).all()
    assert again.devices == plan.devices and again.coordinator == plan.coordinator
    assert again.expected_token_s == plan.expected_token_s and again.served == plan.served
    text = P.format_plan(plan)
    for word in (
        "device",
        "experts held per MoE layer",
        "share of uses",
        "replicas",
        "d ",
        "coordinator RAM",
        "coordinator flash",
    ):
        assert word in text
    assert f"{1e3 * plan.expected_token_s:.3f} ms" in text
    with pytest.raises(PlacementError, match="not a placement plan"):
        Plan.from_json({"format": "something else"})


# -- the command --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cluster") / "model"
    assert main(["convert", str(tiny_checkpoint("mixtral")), "-o", str(dst), "--bits", "4", "-q"]) == 0
    return dst


@pytest.fixture(scope="module")
def profiled(model_dir, tmp_path_factory):
    """A copy of the model with a routing.json from a synthetic trace (expert 0 hot everywhere)."""
    import shutil

    from edgemoe.format.routing_file import save_routing
    from edgemoe.planning.routing import build_routing
    from edgemoe.runtime.trace import RoutingTrace

    dst = tmp_path_factory.mktemp("cluster") / "profiled"
    shutil.copytree(model_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    M, E, k = len(manifest["experts"]["moe_layers"]), manifest["experts"]["num_experts"], manifest["experts"]["top_k"]
    rng = np.random.default_rng(0)
    p = np.arange(E, 0, -1, dtype=np.float64) ** 2
    ex = np.stack([[rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(M)] for _ in range(300)]).astype(
        np.int16
    )
    save_routing(
        dst, build_routing(RoutingTrace(ex, np.full(ex.shape, 1 / k, np.float32), manifest["experts"]["moe_layers"], E))
    )
    return dst


def test_cluster_plan_prints_a_plan(profiled, tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    argv = [
        "cluster",
        "plan",
        str(profiled),
        "--devices",
        "raspberry-pi-5-sdx2,jetson-orin-nano-nvme",
        "--link",
        "wifi5",
    ]
    argv += [
        "--coordinator",
        "raspberry-pi-4-sd",
        "--reserve",
        "7GiB",
        "--search-seconds",
        "0.5",
        "--json",
        str(out_json),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "raspberry-pi-5-sd#1",
        "raspberry-pi-5-sd#2",
        "jetson-orin-nano-nvme",
        "coordinator RAM",
        "expected MoE time per token",
    ):
        assert name in out
    plan = Plan.from_json(json.loads(out_json.read_text()))
    assert [d.name for d in plan.devices] == ["raspberry-pi-5-sd#1", "raspberry-pi-5-sd#2", "jetson-orin-nano-nvme"]
    assert all(d.rtt_s == 0.001 for d in plan.devices)  # --link wifi5 for all


def test_cluster_plan_without_routing_names_edgemoe_profile(model_dir, capsys):
    assert (
        main(
            ["cluster", "plan", str(model_dir), "--devices", "raspberry-pi-5-sd", "--coordinator", "raspberry-pi-4-sd"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "routing.json" in err and f"edgemoe profile {model_dir}" in err and "Traceback" not in err


def test_cluster_plan_refuses_unknown_devices_and_subcommands(profiled, capsys):
    assert main(["cluster", "plan", str(profiled), "--devices", "pdp-11x2", "--coordinator", "raspberry-pi-4-sd"]) == 2
    assert "no device profile 'pdp-11'" in capsys.readouterr().err
    assert main(["cluster", "dance"]) == 2
    assert "unknown subcommand 'dance'" in capsys.readouterr().err
