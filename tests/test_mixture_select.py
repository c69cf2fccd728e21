"""The coarse selection against brute force on random monotone instances, and its budgets."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.devices import load_link, load_profile
from edgemoe.errors import MixtureBudgetError
from edgemoe.mixture.select import HeldoutLoss, brute_force, costs_from_profiles, select


def coverage_loss(rng: np.random.Generator, n: int, docs: int = 40):
    """A monotone loss: each document is served by the best enabled specialist for it, its loss
    the mean over documents (adding a specialist can only lower a minimum)."""
    c = rng.gamma(2.0, 1.0, size=(docs, n)) + rng.gamma(1.0, 1.0, size=n)

    def loss(s):
        return float(c[:, list(s)].min(axis=1).mean())

    return loss


def mixture_loss(rng: np.random.Generator, n: int, tokens: int = 200):
    """A monotone loss of the gated-mixture kind: each token's probability is the best of the
    enabled specialists' (a mixture that knows which one to trust)."""
    p = rng.beta(0.5, 2.0, size=(n, tokens)) + 1e-6

    def loss(s):
        return float(-np.log(p[list(s)].max(axis=0)).mean())

    return loss


def gated_loss(rng: np.random.Generator, n: int, docs: int = 24, tokens: int = 12) -> HeldoutLoss:
    """A gated top-2 mixture over distinct specialists, each good at some of eight domains (its
    gate weight follows what it knows), on tokens that are hard or easy for all alike. Nearly
    monotone, not exactly: a specialist the gate ranks first can push a better one out of a top-2."""
    skill = rng.normal(0.0, 1.0, size=(n, 8))
    dom = rng.integers(0, 8, docs)
    hard = rng.gamma(2.0, 1.5, size=(docs, 1, tokens))
    lp = -hard * np.exp(-0.3 * skill[:, dom].T)[:, :, None] - rng.gamma(1.0, 0.2, size=(docs, n, tokens))
    logits = 2.0 * skill[:, dom].T + rng.normal(0.0, 0.5, size=(docs, n))
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return HeldoutLoss.from_arrays(w / w.sum(axis=1, keepdims=True), lp, np.full(docs, tokens), dom.astype(str), 2)


KINDS = {"coverage": coverage_loss, "mixture": mixture_loss, "gated": lambda rng, n: gated_loss(rng, n).loss}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["coverage", "mixture"])
def test_select_equals_brute_force_at_every_budget(seed, kind):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 13)) if seed < 9 else 12 + seed % 3  # the last three: 12 to 14 specialists
    loss = KINDS[kind](rng, n)
    energy = rng.uniform(0.1, 3.0, n)
    latency = rng.uniform(0.01, 0.2, n)
    big = n > 12  # brute force over 8-16 thousand subsets: fewer budgets
    for e_budget in np.quantile(np.cumsum(np.sort(energy)), [0.2, 0.5, 0.8] if big else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]):
        for l_budget in np.quantile(latency, [0.7, 1.0] if big else [0.3, 0.7, 1.0]):
            ref = brute_force(loss, energy, latency, e_budget, l_budget)
            if ref is None:
                with pytest.raises(MixtureBudgetError, match="no specialist fits the budgets"):
                    select(loss, energy, latency, e_budget, l_budget)
                continue
            got = select(loss, energy, latency, e_budget, l_budget)
            assert got.loss == pytest.approx(ref[1], abs=1e-12), (n, e_budget, l_budget, got.enabled, ref)
            assert got.energy_j <= e_budget * (1 + 1e-9) and got.latency_s <= l_budget
            assert got.energy_j == pytest.approx(float(energy[list(got.enabled)].sum()))


@pytest.mark.parametrize("seed", range(6))
def test_a_fan_out_cost_per_further_specialist_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(3, 11))
    loss = mixture_loss(rng, n)
    energy, latency = rng.uniform(0.1, 3.0, n), rng.uniform(0.01, 0.1, n)
    fan, k = float(rng.uniform(0.005, 0.03)), int(rng.integers(2, 4))
    for e_budget in (1.0, 3.0, 100.0):
        for l_budget in (0.05, 0.09, 0.12, 1.0):
            ref = brute_force(loss, energy, latency, e_budget, l_budget, fan_out_s=fan, top_k=k)
            if ref is None:
                continue
            got = select(loss, energy, latency, e_budget, l_budget, fan_out_s=fan, top_k=k)
            assert got.loss == pytest.approx(ref[1], abs=1e-12)
            assert got.latency_s <= l_budget * (1 + 1e-9)
            assert got.latency_s == pytest.approx(
                latency[list(got.enabled)].max() + fan * (min(len(got.enabled), k) - 1)
            )


def test_copies_on_other_devices_match_brute_force():
    """Twelve specialists: four models, each on three devices (a group). The loss sees models."""
    rng = np.random.default_rng(7)
    model_loss = coverage_loss(rng, 4)
    groups = [i % 4 for i in range(12)]

    def loss(s):
        return model_loss(sorted({groups[i] for i in s}))

    energy = rng.uniform(0.2, 2.0, 12)
    latency = rng.uniform(0.01, 0.1, 12)
    for e_budget in (0.3, 0.8, 1.5, 3.0, 10.0):
        for l_budget in (0.05, 0.08, 1.0):
            ref = brute_force(loss, energy, latency, e_budget, l_budget, groups)
            if ref is None:
                continue
            got = select(loss, energy, latency, e_budget, l_budget, groups)
            assert got.loss == pytest.approx(ref[1], abs=1e-12)
            assert len({groups[i] for i in got.enabled}) == len(got.enabled)  # never two copies of one model


@pytest.mark.parametrize("kind", ["coverage", "gated"])
def test_thirty_two_distinct_specialists(kind):
    """Too many for brute force: the choice fits the budgets, and no specialist left out would
    both fit beside it and lower the loss (an optimum of a monotone loss has no such one)."""
    rng = np.random.default_rng(32)
    n = 32
    loss = KINDS[kind](rng, n)
    energy, latency = rng.uniform(0.1, 3.0, n), rng.uniform(0.01, 0.2, n)
    for l_budget in (0.1, 0.19):
        sums = np.cumsum(np.sort(energy[latency <= l_budget]))
        for e_budget in sums[[1, len(sums) // 3, len(sums) // 2]]:
            got = select(loss, energy, latency, e_budget, l_budget)
            s = list(got.enabled)
            assert energy[s].sum() <= e_budget * (1 + 1e-9) and latency[s].max() <= l_budget
            assert got.loss == pytest.approx(loss(tuple(s)))
            assert got.evaluated < 5000  # a few thousand of 4.3e9 subsets
            for j in set(range(n)) - set(s):
                if energy[s].sum() + energy[j] <= e_budget and latency[j] <= l_budget:
                    assert loss(tuple(sorted(s + [j]))) >= got.loss - 1e-12, (j, s)


def test_the_search_prunes_instead_of_enumerating():
    rng = np.random.default_rng(3)
    n = 24
    loss = coverage_loss(rng, n)
    energy = rng.uniform(0.5, 1.5, n)
    got = select(loss, energy, np.full(n, 0.01), 4.0, 1.0)
    assert got.evaluated < 2**n / 100
    assert got.pruned_infeasible > 0 and got.pruned_dominated > 0


def test_a_budget_nothing_fits_is_named():
    names = ["small", "large"]
    with pytest.raises(MixtureBudgetError, match=r"fastest, small, needs 10 ms.*Raise a budget"):
        select(lambda s: 1.0, np.array([1.0, 2.0]), np.array([0.01, 0.02]), 5.0, 0.001, names=names)
    with pytest.raises(MixtureBudgetError, match="most frugal, small"):
        select(lambda s: 1.0, np.array([1.0, 2.0]), np.array([0.01, 0.02]), 0.5, 1.0, names=names)


def test_excluded_specialists_say_why():
    energy, latency = np.array([1.0, 5.0, 1.0]), np.array([0.01, 0.01, 0.5])
    got = select(lambda s: 1.0 / len(s), energy, latency, 2.0, 0.1, names=["a", "b", "c"])
    assert got.enabled == (0,)
    assert "energy budget" in got.excluded[1] and "latency budget" in got.excluded[2]


def test_heldout_loss_restricts_and_renormalises_the_gate():
    # two documents, three models, top-2: the restricted gate of document 0 over {0, 2} is (0.5, 0.5)
    w = np.array([[0.4, 0.2, 0.4], [0.1, 0.6, 0.3]])
    p = np.array([[0.5, 0.5, 0.1], [0.2, 0.2, 0.9], [0.1, 0.3, 0.3]])
    h = HeldoutLoss(w, np.log(p), np.array([0, 0, 1]), np.array(["a", "b"]), top_k=2)
    mix = np.array([0.5 * 0.5 + 0.5 * 0.1, 0.5 * 0.5 + 0.5 * 0.3, 0.25 * 0.1 + 0.75 * 0.3])
    assert h.loss((0, 2)) == pytest.approx(-np.log(mix).mean())
    # all three enabled, top-2: document 1 keeps models 1 and 2 (0.6, 0.3) -> (2/3, 1/3)
    mix_all = np.array([0.5 * 0.5 + 0.5 * 0.1, 0.5 * 0.5 + 0.5 * 0.3, 2 / 3 * 0.9 + 1 / 3 * 0.3])
    assert h.loss((0, 1, 2)) == pytest.approx(-np.log(mix_all).mean())
    assert h.loss((1,), domain="b") == pytest.approx(-np.log(0.9))


def test_costs_from_profiles_and_online_correction():
    agx, pi4 = load_profile("jetson-agx-orin-emmc"), load_profile("raspberry-pi-4-sd")
    c = costs_from_profiles(["a", "b"], [1e8, 1e8], [agx, pi4], vocab=512, links=[load_link("wifi5")] * 2)
    assert c.latency_s[1] > c.latency_s[0]  # the Pi computes slower
    assert c.link_seconds[0] == pytest.approx(0.001 + 512 * 4 * 8 / 300e6)
    e0 = c.energy_j[0]
    c.measured("a", c.seconds[0] * 3)
    assert c.energy_j[0] == pytest.approx(3 * e0) and c.correction[1] == 1.0
    # a measured wait beyond the device's time replaces the link's predicted share
    c.measured("b", c.seconds[1], wall_s=c.seconds[1] + 0.004)
    assert c.latency_s[1] == pytest.approx(c.seconds[1] + 0.004)


def test_latency_is_the_95th_percentile_of_what_requests_waited():
    """Never interpolated down: with fewer than 20 requests the estimate is the slowest one."""
    agx = load_profile("jetson-agx-orin-emmc")
    c = costs_from_profiles(["a", "b"], [1e8, 2e8], [agx, agx], vocab=512, links=[load_link("wifi5")] * 2)
    predicted = c.latency_s.copy()
    waits = np.linspace(0.010, 0.029, 20)  # what 20 requests served by a alone waited per token
    for w in waits:
        c.request(["a"], float(w), top_k=2)
    assert c.latency_s[0] == pytest.approx(np.quantile(waits, 0.95, method="higher"))
    assert c.latency_s[1] == predicted[1]  # b not measured yet: the profile's figure
    assert (waits <= c.latency_s[0]).mean() >= 0.95
    # served together: what a request took beyond the slower one's latency, per further specialist
    for w in (0.031, 0.035, 0.032):
        c.request(["a", "b"], w, top_k=2)
    slow = max(c.latency_s)
    assert c.fan_out_s == pytest.approx(0.035 - slow)  # three samples: the largest
    c.request(["a", "gone"], 1.0, top_k=2)  # a specialist the cost table does not know: no sample
    assert c.fan_out_s == pytest.approx(0.035 - slow)
    # energy follows the mean of the device's recent times per token
    for t in (1.0, 3.0):
        c.measured("b", c.seconds[1] * t)
    assert c.correction[1] == pytest.approx(2.0)
