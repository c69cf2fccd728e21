"""`edgemoe mixture bench`: held-out perplexity against time and energy per token for each
single specialist, all of them mixed, and the MoE² choice at a sweep of latency and energy
budgets (the frontier), with the specialists on Ray nodes.

With --testbed LINK the bench starts `edgemoe cluster local` (one node per specialist, each in
its own network namespace and memory limit, its link emulated) and runs itself again beside
the head; with --cluster ADDRESS it uses a running cluster; with neither, threads of this
process. Perplexities come from heldout.npz (every specialist's log-probability of each true
next token); times come from real requests on the nodes. Energy per token is each enabled
specialist's device power (its profile) x its measured time per token.

The cost model starts from the device profiles and is corrected by a calibration run of each
specialist alone (its measured device time and the coordinator's wait) and of all of them
together (the fan-out), after a warm-up that is not counted, as a deployment corrects it
online; the budgets of the sweep are then taken around the corrected costs: latencies from
the fastest specialist's to the slowest set's (the slowest specialist and the fan-out to the
further ones), energies from the most frugal specialist's to all of them together.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import load_profile
from ..errors import MixtureError
from ..mixture.heldout import Heldout
from ..mixture.runtime import DEFAULT_CLASS, Mixture, load
from ..mixture.select import HeldoutLoss, brute_force, select
from ..units import parse_bytes

OUTER_COMMAND = "EDGEMOE_MIXTURE_BENCH_COMMAND"  # the command as typed, for the results of the run beside the head
COPY_PROFILES = (
    "raspberry-pi-4-sd",
    "raspberry-pi-5-sd",
    "jetson-orin-nano-nvme",
    "jetson-orin-nx-nvme",
    "jetson-agx-orin-emmc",
    "phone-ufs31",
    "phone-sd8gen3-ufs40",
    "rtx4090-server-nvme",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags; the CLI gives them their checked types (cli/mixture.py)."""
    p.add_argument("mix", help="a mixture directory")
    p.add_argument(
        "--devices", required=True, help="a device profile per specialist (mixture.json's order), comma-separated"
    )
    p.add_argument("--link", default=None, help="the link to every device (default: each profile's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--testbed", default=None, metavar="LINK", help="run on `edgemoe cluster local` nodes over LINK")
    where.add_argument("--cluster", default=None, metavar="ADDRESS", help="run on this Ray cluster")
    p.add_argument("--node-memory", default="1500MB", help="each test-bed node's memory limit (default 1500MB)")
    p.add_argument("--requests", default=8, help="requests per budget of the sweep (default 8)")
    p.add_argument(
        "--calibration-requests",
        default=40,
        help="requests of each specialist alone and of all together that calibrate the latencies and the "
        "fan-out, after the warm-up (default 40: their 95th percentile is a sample below the slowest)",
    )
    p.add_argument("--warmup", default=4, help="requests of each configuration first, not counted anywhere (default 4)")
    p.add_argument("--tokens", default=12, help="tokens generated per request (default 12)")
    p.add_argument("--budgets", default=5, help="latency budgets and energy budgets each (default 5)")
    p.add_argument(
        "--pace-scale",
        default=0.0,
        help="each specialist takes at least this many times its profile's predicted time per token "
        "(0: as fast as it runs here)",
    )
    p.add_argument("--json", metavar="FILE", default="mixture-bench.json", help="results (default mixture-bench.json)")
    p.add_argument(
        "--plot", metavar="FILE", default="mixture-bench.png", help="the frontier plot (default mixture-bench.png)"
    )
    p.add_argument("--timeout", default=60.0, help="seconds a token waits for a specialist (default 60)")


# -- quality from the held-out set ---------------------------------------------------------
def quality(h: HeldoutLoss, models: Sequence[int]) -> dict[str, float]:
    """Perplexity on each domain and on all documents together (mixed-domain)."""
    out = {"mixed": float(np.exp(h.loss(tuple(models))))}
    for d in sorted(set(h.domains.tolist())):
        out[d] = float(np.exp(h.loss(tuple(models), domain=d)))
    return out


# -- timing from real requests -------------------------------------------------------------
def requests(
    mix: Mixture, prompts: list[list[int]], n: int, tokens: int, cls: str = DEFAULT_CLASS
) -> list[dict[str, Any]]:
    """n requests (prompts in turn), each `tokens` long: its time per decode token and the
    device seconds per decode token of the specialists that served it (after the prompt: the
    unit the energy budget is in)."""
    out = []
    for i in range(n):
        before = {k: (v.decode_tokens, v.decode_device_seconds) for k, v in mix.records.items()}
        a = mix.generate(prompts[i % len(prompts)], tokens, request_class=cls, details=True)
        # the first token also carries the prompt: a request that ended there (its first token
        # was the end of text) has no time per decode token, the unit a latency budget is in
        per = a.seconds_per_token[1:]
        dev = {}
        for k, v in mix.records.items():
            dt, ds = v.decode_tokens - before[k][0], v.decode_device_seconds - before[k][1]
            if dt:
                dev[k] = ds / dt
        late_steps = {t for ts in a.late.values() for t in ts}
        out.append(
            {
                "seconds_per_token": float(np.mean(per)) if per else None,
                "decode_steps": max(0, len(a.tokens) - 1),
                "steps_with_late": len(late_steps),
                "served_by": a.specialists,
                "device_seconds_per_token": dev,
                "dropped": a.dropped,
            }
        )
    return out


def summarize(runs: list[dict[str, Any]], enabled: Sequence[str], power: dict[str, float]) -> dict[str, Any]:
    spt = [r["seconds_per_token"] for r in runs if r["seconds_per_token"] is not None]
    dev: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["device_seconds_per_token"].items():
            dev.setdefault(k, []).append(v)
    dev_mean = {k: float(np.mean(v)) for k, v in dev.items()}
    # the budget's definition: every enabled specialist's power x its time per token
    energy = sum(power[k] * dev_mean.get(k, 0.0) for k in enabled)
    return {
        "seconds_per_token_median": float(np.median(spt)) if spt else float("nan"),
        "seconds_per_token": spt,  # of the requests with a decode token
        "requests_ended_at_first_token": len(runs) - len(spt),
        "energy_j_per_token": float(energy),
        "device_seconds_per_token": dev_mean,
    }


# -- the selection's own targets: brute force and speed ---------------------------------------
def selection_checks(h: HeldoutLoss, names: list[str], emit: Any) -> dict[str, Any]:
    """Copies of the real specialists on other device profiles: `select` against brute force
    at every budget of a grid (12 specialists) and its time for 32."""
    m = len(names)
    out: dict[str, Any] = {}
    model_loss = functools.lru_cache(maxsize=None)(h.loss)  # copies share a model: one evaluation per model set
    for n in (12, 32):
        groups = [i % m for i in range(n)]
        profs = [load_profile(COPY_PROFILES[(i // m + i) % len(COPY_PROFILES)]) for i in range(n)]
        # a copy's time per token: the same model bytes at its device's speed (a relative figure)
        rel = np.array([1.0 + i % m for i in range(n)])
        seconds = np.array([rel[i] / (p.int4_bytes_per_s or 1) * 1e9 for i, p in enumerate(profs)]) * 1e-3
        energy = seconds * np.array([p.active_w for p in profs])
        latency = seconds + np.array([p.link.rtt_s if p.link else 0.0 for p in profs])

        def loss(s: tuple[int, ...], groups: list[int] = groups) -> float:
            return model_loss(tuple(sorted({groups[i] for i in s})))

        e_grid = np.quantile(np.cumsum(np.sort(energy)), np.linspace(0.0, 1.0, 8))
        l_grid = np.quantile(latency, np.linspace(0.1, 1.0, 6))
        times, agree, tested = [], 0, 0
        for eb in e_grid:
            for lb in l_grid:
                ref = brute_force(loss, energy, latency, eb, lb, groups) if n <= 12 else None
                try:
                    c = select(loss, energy, latency, eb, lb, groups)
                except MixtureError:
                    if n <= 12:
                        tested += 1
                        agree += ref is None
                    continue
                times.append(c.seconds)
                if n <= 12:
                    tested += 1
                    agree += ref is not None and abs(ref[1] - c.loss) <= 1e-12
        out[str(n)] = {
            "specialists": n,
            "budgets": int(len(e_grid) * len(l_grid)),
            "max_search_seconds": float(max(times)) if times else 0.0,
            "median_search_seconds": float(np.median(times)) if times else 0.0,
            **({"equal_to_brute_force": agree, "tested": tested} if n <= 12 else {}),
        }
        r = out[str(n)]
        emit(
            f"selection over {n} specialists ({m} models on {len(set(p.name for p in profs))} device profiles): "
            f"slowest search {r['max_search_seconds'] * 1e3:.1f} ms over {r['budgets']} budgets"
            + (f"; equal to brute force at {agree} of {tested}" if n <= 12 else "")
        )
    out["32-distinct"] = distinct_selection(h, emit)
    return out


def distinct_selection(h: HeldoutLoss, emit: Any, n: int = 32, seed: int = 32) -> dict[str, Any]:
    """32 distinct specialists, for the search's speed where no two share a model: each is one of
    the real ones with its log-probabilities on each domain shifted by its own random amount
    (normal, 0.3 nats) and its gate logits likewise, on the real held-out documents; random
    energies and latencies; the search timed over a grid of budgets."""
    rng = np.random.default_rng(seed)
    m = h.weights.shape[1]
    base = np.arange(n) % m
    doms = sorted(set(h.domains.tolist()))
    shift = rng.normal(0.0, 0.3, size=(n, len(doms)))  # [n, domains]
    dom_of_doc = np.array([doms.index(d) for d in h.domains])
    logprobs = np.minimum(h.logprobs[base] + shift[:, dom_of_doc[h.doc]], 0.0)  # [n, T], still log-probabilities
    logits = np.log(np.maximum(h.weights[:, base], 1e-12)) + shift[:, dom_of_doc].T  # [D, n]
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    hd = HeldoutLoss(w / w.sum(axis=1, keepdims=True), logprobs, h.doc, h.domains, h.top_k)
    energy, latency = rng.uniform(0.1, 3.0, n), rng.uniform(0.01, 0.2, n)
    times, evals, sizes = [], [], []
    for lb in (0.1, 0.15, 0.2):
        sums = np.cumsum(np.sort(energy[latency <= lb]))
        for eb in sums[np.linspace(0, len(sums) - 1, 6).astype(int)]:
            c = select(hd.loss, energy, latency, float(eb), lb)
            times.append(c.seconds)
            evals.append(c.evaluated)
            sizes.append(len(c.enabled))
    slowest, median = float(max(times)), float(np.median(times))
    emit(
        f"selection over {n} distinct specialists: slowest search {slowest * 1e3:.1f} ms, median "
        f"{median * 1e3:.1f} ms over {len(times)} budgets (at most {max(evals)} "
        f"loss evaluations of {2**n - 1} subsets; {min(sizes)} to {max(sizes)} enabled)"
    )
    return {
        "specialists": n,
        "budgets": len(times),
        "max_search_seconds": slowest,
        "median_search_seconds": median,
        "max_loss_evaluations": int(max(evals)),
        "enabled_sizes": sizes,
    }


# -- the bench -----------------------------------------------------------------------------
def run(args: argparse.Namespace, emit: Any) -> dict[str, Any]:
    mix = load(
        args.mix,
        cluster=args.cluster,
        devices=args.devices,
        link=args.link,
        timeout_s=args.timeout,
        pace_scale=args.pace_scale,
    )
    with mix:
        names = mix.names
        h = mix.heldout_loss()
        raw = Heldout.load(mix.spec.heldout)
        prompts = [[int(t) for t in raw.prompt(i)] for i in range(len(raw.domain))]
        assert mix.costs is not None
        costs = mix.costs
        power = dict(zip(costs.names, costs.power_w.tolist()))
        emit(f"specialists: {', '.join(f'{n} on {d}' for n, d in zip(costs.names, costs.devices))}; top_k {mix.top_k}")
        emit(f"where: {', '.join(f'{n}: {mix.members[n].where}' for n in names)}")
        results: dict[str, Any] = {"singles": {}, "frontier": []}

        # a warm-up of each configuration (connections, caches, the allocator), then each alone
        # and all of them: their quality, and the calibration of the cost model (every request
        # corrects it, in the runtime, as in a deployment: each specialist's latency from the
        # requests it served alone, the fan-out from those served by several)
        for cfg in [[n] for n in names] + [names]:
            mix.enable(cfg)
            requests(mix, prompts, args.warmup, args.tokens)
        costs.forget()
        mix.mix_seconds.clear()
        for i, n in enumerate(names):
            mix.enable([n])
            runs = requests(mix, prompts, args.calibration_requests, args.tokens)
            results["singles"][n] = {"quality": quality(h, [i]), **summarize(runs, [n], power)}
        mix.enable(names)
        runs = requests(mix, prompts, args.calibration_requests, args.tokens)
        results["all"] = {"quality": quality(h, range(len(names))), **summarize(runs, names, power)}
        lat_of = dict(zip(costs.names, costs.latency_s.tolist()))
        emit(
            f"calibrated: {', '.join(f'{n} {v * 1e3:.2f} ms' for n, v in lat_of.items())}; "
            f"fan-out {costs.fan_out_s * 1e3:.2f} ms per further specialist; a step's own time "
            f"{mix.mix_estimate() * 1e3:.2f} ms (95th percentile)"
        )

        order = [costs.names.index(n) for n in names]
        energy, latency = costs.energy_j[order], costs.latency_s[order]
        results["costs"] = costs.table()  # as calibrated; requests go on correcting them online
        results["fan_out_s"] = costs.fan_out_s
        results["mix_seconds_p95"] = mix.mix_estimate()
        # budgets around the corrected costs, with a 5% margin for noise: latencies from the
        # fastest specialist's to what all of them enabled take (the slowest one plus the
        # fan-out to the top-k), energies from the most frugal specialist's to all of them
        # together (the top one with the margin too: the online correction moves them)
        top = float(latency.max()) + costs.fan_out_s * (min(mix.top_k, len(names)) - 1)
        l_grid = np.unique(np.linspace(float(latency.min()), top, args.budgets) * 1.05)
        e_grid = np.cumsum(np.sort(energy))
        e_grid = np.unique(np.interp(np.linspace(0.0, len(e_grid) - 1, args.budgets), np.arange(len(e_grid)), e_grid))
        e_grid[-1] *= 1.05
        for lb in l_grid:
            for eb in e_grid:
                energy, latency = costs.energy_j[order], costs.latency_s[order]  # the costs the plan sees
                try:
                    c = mix.plan(float(eb), float(lb), heldout=h)[DEFAULT_CLASS]
                except MixtureError as e:
                    results["frontier"].append(
                        {"latency_budget_s": float(lb), "energy_budget_j": float(eb), "fits": False, "why": str(e)}
                    )
                    continue
                ref = brute_force(h.loss, energy, latency, float(eb), float(lb), None, costs.fan_out_s, mix.top_k)
                fits = [i for i in range(len(names)) if energy[i] <= eb * (1 + 1e-9) and latency[i] <= lb * (1 + 1e-9)]
                best = min(fits, key=lambda i: h.loss((i,)))
                runs = requests(mix, prompts, args.requests, args.tokens)
                enabled = [names[i] for i in c.enabled]
                s = summarize(runs, enabled, power)
                within = (
                    float(np.mean([x <= lb for x in s["seconds_per_token"]]))
                    if s["seconds_per_token"]
                    else float("nan")
                )
                steps = sum(r["decode_steps"] for r in runs)
                short = sum(r["steps_with_late"] for r in runs)
                point = {
                    "latency_budget_s": float(lb),
                    "energy_budget_j": float(eb),
                    "fits": True,
                    "enabled": enabled,
                    "expected_loss": c.loss,
                    "brute_force_loss": ref[1] if ref else None,
                    "equal_to_brute_force": ref is not None and abs(ref[1] - c.loss) <= 1e-12,
                    "best_single": names[best],
                    "best_single_perplexity": float(np.exp(h.loss((best,)))),
                    "quality": quality(h, c.enabled),
                    "planned_energy_j": c.energy_j,
                    "planned_latency_s": c.latency_s,
                    "search_seconds": c.seconds,
                    "within_latency_budget": within,
                    "decode_steps": steps,
                    "steps_with_a_specialist_late": short,
                    **s,
                }
                point["at_least_best_single"] = point["quality"]["mixed"] <= point["best_single_perplexity"] * (
                    1 + 1e-9
                )
                results["frontier"].append(point)
                emit(
                    f"latency <= {lb * 1e3:7.2f} ms, energy <= {eb:9.4g} J: {'+'.join(enabled):<28} "
                    f"ppl {point['quality']['mixed']:8.3f} (best single {names[best]} {point['best_single_perplexity']:8.3f}); "
                    f"measured {s['seconds_per_token_median'] * 1e3:6.2f} ms/token, {s['energy_j_per_token']:.4g} J/token; "
                    f"{within * 100:.0f}% of requests within budget"
                    + (f"; {short} of {steps} steps left a late specialist out" if short else "")
                )
        results["selection"] = selection_checks(h, names, emit)
        results["stats"] = mix.stats()
    return results


def targets(results: dict[str, Any]) -> dict[str, Any]:
    pts = [p for p in results["frontier"] if p.get("fits")]
    singles = results["singles"]
    best_single = min(v["quality"]["mixed"] for v in singles.values())
    within = [x <= p["latency_budget_s"] for p in pts for x in p["seconds_per_token"]]
    return {
        "all_mixed_vs_best_single_mixed_ppl": results["all"]["quality"]["mixed"] / best_single - 1,
        "choice_at_least_best_single_at_every_budget": all(p["at_least_best_single"] for p in pts),
        "choice_equal_to_brute_force_at_every_budget": all(p["equal_to_brute_force"] for p in pts),
        "requests_within_latency_budget": float(np.mean(within)) if within else 0.0,
        "budgets_that_fit": len(pts),
        "budgets": len(results["frontier"]),
    }


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib  # deferred: optional (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "seconds_per_token_median", "time per token (ms)"),
        (axes[1], "energy_j_per_token", "energy per token (mJ)"),
    ):
        pts = [p for p in results["frontier"] if p.get("fits")]
        ax.scatter(
            [p[key] * 1e3 for p in pts],
            [p["quality"]["mixed"] for p in pts],
            c="tab:blue",
            label="MoE² choice at a budget",
            s=18,
        )
        for n, s in results["singles"].items():
            ax.scatter([s[key] * 1e3], [s["quality"]["mixed"]], marker="s", s=40, label=f"{n} alone")
        a = results["all"]
        ax.scatter([a[key] * 1e3], [a["quality"]["mixed"]], marker="*", s=120, c="k", label="all mixed")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity, mixed-domain held-out")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("edgemoe mixture bench: quality against time and energy per token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict[str, Any]:
    from .. import _core

    return {"platform": platform.platform(), "simd": _core.simd(), "python": platform.python_version()}


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the bench with the parsed flags (`argv` as given: recorded, and passed on to the test bed)."""
    if args.testbed:
        return on_testbed(args, list(argv))
    t0 = time.time()
    results = run(args, lambda line: print(line, flush=True))
    results["targets"] = targets(results)
    results["machine"] = _machine()
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
    results["command"] = os.environ.get(OUTER_COMMAND) or "edgemoe mixture bench " + " ".join(argv)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    print(json.dumps(results["targets"], indent=1))
    print(f"results in {args.json}, plot in {args.plot}", file=sys.stderr)
    return 0


def on_testbed(args: argparse.Namespace, argv: list[str]) -> int:
    """One node per specialist on `edgemoe cluster local` over the link; this bench again
    beside the head with --cluster pointing at it."""
    from ..cluster import local

    i = argv.index("--testbed")
    inner = argv[:i] + argv[i + 2 :]
    inner = [str(Path(a).resolve()) if a == args.mix else a for a in inner]
    for flag in ("--json", "--plot"):
        val = getattr(args, flag[2:])
        if flag in inner:
            inner[inner.index(flag) + 1] = str(Path(val).resolve())
        else:
            inner += [flag, str(Path(val).resolve())]
    n = len(args.devices) if len(args.devices) > 1 else 1
    with local.local_cluster(max(1, n), parse_bytes(args.node_memory), args.testbed) as lc:
        print(f"test bed {lc.tag}: {lc.nodes} nodes over {lc.link} ({lc.emulator} links)", file=sys.stderr)
        cmd = [sys.executable, "-m", "edgemoe.cli", "mixture", "bench", *inner, "--cluster", lc.address]
        env = {**os.environ, OUTER_COMMAND: "edgemoe mixture bench " + " ".join(argv)}
        return subprocess.call(lc.command(cmd), cwd="/", env=env)
