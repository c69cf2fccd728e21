"""The fine level in one process: the gated mixture of the top-k enabled specialists, checked
against the specialists run one by one and mixed here; planning under budgets; bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemoe
from edgemoe.errors import GateMismatchError, MixtureBudgetError, MixtureTokenizerError
from edgemoe.mixture.gate import Gate
from edgemoe.mixture.runtime import model_dir
from edgemoe.mixture.spec import MixtureSpec

tiny_mixture = pytest.importorskip("tiny_mixture")

PROMPT = [0, 5, 17, 17, 3, 250, 42, 9, 100, 7]
NEW = 8
DEVICES = ["raspberry-pi-4-sd", "jetson-orin-nano-nvme", "jetson-agx-orin-emmc"]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return tiny_mixture.make_mixture(tmp_path_factory.mktemp("mixture") / "mix")


def reference(mix_dir, prompt, new, enabled=None):
    """The mixture computed here from the specialists loaded one by one: top-k of the enabled
    by the gate's weight, renormalised, greedy on the mixed probabilities."""
    spec = MixtureSpec.load(mix_dir)
    gate = Gate.load(spec)
    w = gate.weights(np.array(prompt), enabled=enabled)
    order = [i for i in np.argsort(-w, kind="stable") if w[i] > 0][: spec.top_k]
    models = {i: edgemoe.load(model_dir(spec.specialist(gate.names[i]).path)) for i in order}
    ww = np.array([w[i] for i in order]) / sum(w[i] for i in order)
    ids = list(prompt)
    out = []
    for _ in range(new):
        probs = sum(
            wi
            * np.exp(np.asarray(models[i].logits(ids)[-1], np.float64) - np.logaddexp.reduce(models[i].logits(ids)[-1]))
            for wi, i in zip(ww, order)
        )
        t = int(np.argmax(probs))
        out.append(t)
        ids.append(t)
    return out, [gate.names[i] for i in order]


def test_generate_mixes_the_top_k_as_computed_by_hand(mix):
    want, names = reference(mix, PROMPT, NEW)
    with edgemoe.load_mixture(mix) as m:
        a = m.generate(PROMPT, NEW, details=True)
        assert a.specialists == names and len(names) == 2  # top_k 2 of 3
        assert a.tokens[: len(want)] == want[: len(a.tokens)]
        assert not a.dropped and a.note == ""
        s = m.stats()
        assert s["requests"] == 1 and s["tokens_generated"] == len(a.tokens)
        assert all(s["specialists"][n]["tokens"] == len(a.tokens) for n in names)


def test_logits_are_the_log_of_the_mixed_probabilities(mix):
    spec = MixtureSpec.load(mix)
    gate = Gate.load(spec)
    w = gate.weights(np.array(PROMPT))
    order = list(np.argsort(-w, kind="stable")[: spec.top_k])
    mixed = 0.0
    for i in order:
        lg = edgemoe.load(model_dir(spec.specialist(gate.names[i]).path)).logits(PROMPT).astype(np.float64)
        mixed = mixed + w[i] / w[order].sum() * np.exp(lg - np.logaddexp.reduce(lg, axis=1, keepdims=True))
    with edgemoe.load_mixture(mix) as m:
        got = m.logits(PROMPT)
    assert got.shape == (len(PROMPT), mixed.shape[1])
    np.testing.assert_allclose(got, np.log(mixed), atol=1e-4)


def test_text_in_text_out(mix):
    with edgemoe.load_mixture(mix) as m:
        out = m.generate("The quick brown fox", 4)
        assert isinstance(out, str)


def test_plan_enables_what_fits_and_generation_uses_only_it(mix):
    with edgemoe.load_mixture(mix, devices=DEVICES, link="wired-gigabit") as m:
        lat = m.costs.latency_s
        budgets = {"fast": float(np.sort(lat)[0]) * 1.001, "slow": float(lat.max()) * 2}
        got = m.plan(float(m.costs.energy_j.sum()) * 2, budgets)
        assert [m.names[i] for i in got["fast"].enabled] == [m.costs.names[int(np.argmin(lat))]]
        assert len(got["slow"].enabled) >= 2
        a = m.generate(PROMPT, 3, request_class="fast", details=True)
        assert a.specialists == m.enabled["fast"]
        want, _ = reference(mix, PROMPT, 3, enabled=m.enabled["fast"])
        assert a.tokens == want[: len(a.tokens)]
        with pytest.raises(MixtureBudgetError, match="no specialist fits the budgets"):
            m.plan(1e-12, 1e-12)


def test_requests_correct_the_latency_the_plan_sees(mix):
    """A request's time per decode token, as the coordinator saw it, becomes a latency sample of
    the specialist that served it alone; the plan then uses their 95th percentile."""
    with edgemoe.load_mixture(mix, devices=DEVICES, link="wired-gigabit") as m:
        one = m.names[0]
        m.enable([one])
        i = m.costs.names.index(one)
        answers = [m.generate(PROMPT, 4, details=True) for _ in range(3)]
        seen = [float(np.mean(a.seconds_per_token[1:])) for a in answers if len(a.seconds_per_token) > 1]
        assert seen and list(m.costs.waits[i]) == pytest.approx(seen)
        assert m.costs.latency_s[i] == pytest.approx(max(seen))  # three requests: the slowest
        assert m.costs.table()[i]["latency_samples"] == len(seen)


def test_an_unknown_transport_is_named(mix):
    with pytest.raises(edgemoe.MixtureError, match="transport 'grpc'.*'channel'"):
        edgemoe.load_mixture(mix, transport="grpc")


def test_a_plan_without_devices_is_named(mix):
    with edgemoe.load_mixture(mix) as m:
        with pytest.raises(edgemoe.MixtureError, match="no cost model.*devices"):
            m.plan(1.0, 1.0)


def test_a_specialist_that_fails_is_dropped_and_the_answer_says_so(mix):
    with edgemoe.load_mixture(mix) as m:
        first = m.route(PROMPT)[0]
        victim = first[0]
        steps = m.stream(PROMPT, NEW)
        got = [next(steps), next(steps)]
        m.members[victim].server.model = None  # its model is gone: the next step raises there
        got += list(steps)
        a = m.last
        assert len(got) == NEW and a.tokens == got
        assert [d["name"] for d in a.dropped] == [victim] and a.dropped[0]["at_token"] == 2
        assert f"specialist {victim} was dropped at token 2" in a.note and first[1] in a.note
        assert m.stats()["specialists"][victim]["up"] is False


def copy_mixture(mix, tmp_path):
    dst = tmp_path / "mix"
    shutil.copytree(mix, dst)
    return dst


def test_a_specialist_with_another_tokenizer_is_named(mix, tmp_path):
    dst = copy_mixture(mix, tmp_path)
    spec = json.loads((dst / "mixture.json").read_text())
    tok = dst / spec["specialists"][1]["path"] / "tokenizer.json"
    t = json.loads(tok.read_text())
    vocab = t["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok.write_text(json.dumps(t))
    with pytest.raises(
        MixtureTokenizerError, match=f"specialist '{spec['specialists'][1]['name']}'.*another tokenizer"
    ):
        edgemoe.load_mixture(dst)


def test_a_gate_trained_for_other_specialists_is_named(mix, tmp_path):
    dst = copy_mixture(mix, tmp_path)
    spec = json.loads((dst / "mixture.json").read_text())
    spec["specialists"][0]["name"] = "renamed"
    (dst / "mixture.json").write_text(json.dumps(spec))
    with pytest.raises(GateMismatchError, match="trained for specialists"):
        edgemoe.load_mixture(dst)


def test_cli_plan_prints_the_choice_and_why(mix, capsys):
    from edgemoe.cli import main

    assert (
        main(
            [
                "mixture",
                "plan",
                str(mix),
                "--devices",
                ",".join(DEVICES),
                "--energy",
                "100",
                "--latency",
                "chat=5,batch=500",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "class chat" in out and "class batch" in out and "enable" in out and "search" in out
    assert (
        main(["mixture", "plan", str(mix), "--devices", ",".join(DEVICES), "--energy", "1e-12", "--latency", "1"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("edgemoe mixture: error: no specialist fits the budgets") and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--latency", "fast=", "--energy", "1"], "--latency"),
        (["--latency", "10", "--energy", "-1"], "--energy"),
        (["--latency", "10", "--energy", "1", "--devices", "no-such-board"], "--devices"),
    ],
)
def test_cli_bad_values_are_one_line(mix, capsys, flags, what):
    from edgemoe.cli import main

    argv = ["mixture", "plan", str(mix), *flags]
    if "--devices" not in flags:
        argv += ["--devices", DEVICES[0]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemoe mixture plan: error: argument") and what in err and err.count("\n") == 1


def test_cli_run(mix, capsys):
    from edgemoe.cli import main

    assert main(["mixture", "run", str(mix), "-p", "The quick", "-n", "3"]) == 0
    cap = capsys.readouterr()
    assert "served by" in cap.err


@pytest.mark.slow  # about 30 s here: every budget runs requests, and brute force checks 12 specialists
def test_cli_bench_in_this_process(mix, tmp_path, capsys):
    from edgemoe.cli import main

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["mixture", "bench", str(mix), "--devices", ",".join(DEVICES), "--requests", "1", "--tokens", "2"]
    argv += ["--calibration-requests", "2", "--warmup", "1"]
    assert main([*argv, "--budgets", "2", "--json", str(out), "--plot", str(png)]) == 0
    r = json.loads(out.read_text())
    assert set(r["singles"]) == {"small", "medium", "large"} and png.stat().st_size > 0
    assert r["all"]["quality"]["mixed"] < min(s["quality"]["mixed"] for s in r["singles"].values())
    fits = [p for p in r["frontier"] if p["fits"]]
    assert fits and all(p["equal_to_brute_force"] and p["at_least_best_single"] for p in fits)
    # the sweep reaches sets that mix: latencies up to the slowest set's (the slowest specialist
    # and the fan-out to the further one), energies up to all of them together, as calibrated
    assert max(p["latency_budget_s"] for p in r["frontier"]) >= max(c["latency_s"] for c in r["costs"]) + r["fan_out_s"]
    assert max(p["energy_budget_j"] for p in r["frontier"]) >= sum(c["energy_j"] for c in r["costs"])
    assert r["selection"]["12"]["equal_to_brute_force"] == r["selection"]["12"]["tested"]


def test_a_specialist_that_misses_the_step_deadline_is_left_out_of_those_steps(mix):
    """With a latency budget, a step mixes only the distributions that came in time: a slow
    specialist is left out of the steps it misses (the others renormalised), still fed every
    token, and the tokens are those of the mixture of the answers that came: here both for the
    prompt's step (it waits for all), the fast one alone after."""
    with edgemoe.load_mixture(mix) as m:
        (slow, fast), w = m.route(PROMPT)
        m.members[slow].server.pace_s = 0.3  # each of its tokens takes 0.3 s at least
        m.enable(m.names, latency_budget=0.05)
        a = m.generate(PROMPT, NEW, details=True)
        assert len(a.tokens) == NEW and not a.dropped
        assert a.late == {slow: list(range(1, NEW))}
        assert f"specialist {slow} missed the 50 ms step deadline at {NEW - 1} of {NEW} tokens" in a.note
        s = m.stats()["specialists"]
        assert s[slow]["late_steps"] == NEW - 1 and s[slow]["up"] and s[fast]["late_steps"] == 0
        # without a budget every step waits for both again (the slow one catches up first)
        m.enable(m.names)
        b = m.generate(PROMPT, 3, details=True)
        assert not b.late and b.note == ""
    models = {n: edgemoe.load(model_dir(MixtureSpec.load(mix).specialist(n).path)) for n in (slow, fast)}

    def logp(n, ids):
        lg = np.asarray(models[n].logits(ids)[-1], np.float64)
        return lg - np.logaddexp.reduce(lg)

    first = int(np.argmax(np.logaddexp(np.log(w[0]) + logp(slow, PROMPT), np.log(w[1]) + logp(fast, PROMPT))))
    want = [first]
    for _ in range(NEW - 1):
        want.append(int(np.argmax(logp(fast, PROMPT + want))))
    assert a.tokens == want
    assert b.tokens == reference(mix, PROMPT, 3)[0]


def test_no_answer_within_the_budget_waits_for_the_first(mix):
    with edgemoe.load_mixture(mix) as m:
        names, _ = m.route(PROMPT)
        for n in names:
            m.members[n].server.pace_s = 0.02
        m.enable(m.names, latency_budget=1e-6)  # no answer can come in time
        a = m.generate(PROMPT, 4, details=True)
        assert len(a.tokens) == 4 and not a.dropped
        assert all(len(set(names) - {n for n, t in a.late.items() if i in t}) >= 1 for i in range(1, 4))
        with pytest.raises(edgemoe.MixtureError, match="latency budget"):
            m.enable(m.names, latency_budget=0.0)


def test_a_link_whose_answer_header_names_too_much_breaks_and_fails_its_call():
    """The coordinator's connection to a specialist: an answer header naming more than a frame
    may hold is not read as an answer (nor allocated); the call fails and the link is broken."""
    import socket
    import threading
    import time

    from edgemoe.cluster.channel import MAX_FRAME_BYTES, REPLY, REQUEST
    from edgemoe.mixture.runtime import Gone, Link

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def garbled() -> None:
        conn, _ = server.accept()
        seq, _, n = REQUEST.unpack(conn.recv(REQUEST.size))
        conn.recv(n)
        conn.sendall(REPLY.pack(seq, 0, MAX_FRAME_BYTES + 1))
        time.sleep(2)
        conn.close()

    threading.Thread(target=garbled, daemon=True).start()
    woken = threading.Event()
    link = Link(*server.getsockname()[:2], woken.set)
    try:
        seq = link.send("step", np.array([5], np.int64))
        assert woken.wait(5) and link.done(seq)
        assert link.broken is not None and "not a peer" in link.broken
        with pytest.raises(Gone):
            link.take(seq)
    finally:
        link.close()
        server.close()
