"""`edgemoe bench`: decode speed, time to first token, peak RSS and bytes read for
several expert-loading modes side by side, each in a fresh process with the model's
files dropped from the page cache first.

Modes:
  ram       every expert read into RAM before timing (the ceiling)
  ondemand  a cache of one layer's routed experts, no prefetch (EdgeMoE's baseline)
  lru       LRU cache at the given budget, no prefetch
  edgemoe   the best policy and predictor at the given budget (BEST, chosen by measurement)
  POLICY+PREDICTOR[@RATIO[/P]][+warm]  any other combination, e.g. lfu+table, structure+fitted,
            lru+none, structure+lookahead@1.0/0.5 (prefetch within 1.0x the bytes a token needs,
            only guesses needed with probability >= 0.5); +warm: with a warm start at load
            (the most used experts that fit the budget), as the edgemoe mode has; without it,
            each expert is read when first needed

With --cgroup-limit, the Mixtral-shaped model also runs inside a fresh cgroup v1 memory
group of that size (expert budget = limit - Model.memory_needed's other terms) and is
compared with its I/O lower bound: the expert bytes it read per decoded token divided by
the O_DIRECT read bandwidth measured on the same file in the same run.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..devices.limits import Cgroup, drop_page_cache
from ..format.manifest import blob_tables, load_manifest, page_bytes
from ..format.routing_file import ROUTING_FILE
from ..planning.default_model import SHIPPED
from ..runtime.engine import load, peak_rss_bytes
from ..runtime.prefetch import FIT_FILE
from .llama_cpp_worker import proc_read_bytes

MODES = ("ram", "ondemand", "lru", "edgemoe")
POLICIES = ("lru", "lfu", "structure")

# The edgemoe mode: policy and predictor, in order of preference, by measurement
# (docs/benchmarks/streaming.md); the first whose files the model has is used. Measured
# at 50% on both bench models (lru/lfu/structure x none/table/lookahead/fitted): the structure
# policy reads the fewest bytes, and every predictor loses here. A layer computes in 0.1 ms
# (default model) while one expert read takes 0.6 ms, so a guess issued one layer ahead lands
# late, and at 55-60% precision prefetch reads 1.8-3x the bytes of a disk that is the bottleneck.
# A warm start (Model preload="warm": the most used experts by routing.json, up to the budget,
# read at load behind the prompt) lifts the first tokens' hit rate from a cold cache; the
# baselines (ondemand, lru, POLICY+PREDICTOR) load without one.
BEST: list[dict[str, Any]] = [
    {"policy": "structure", "prefetch": None, "preload": "warm"},
]


def has_predictor_files(model_dir: Path, prefetch: str | None) -> bool:
    kind = (prefetch or "").partition(":")[0]
    if kind == "table":
        return (model_dir / ROUTING_FILE).exists()
    if kind == "fitted":
        return (model_dir / FIT_FILE).exists()
    return True


def mode_options(mode: str, model_dir: Path) -> dict[str, Any]:
    """load() keyword arguments of a mode (beyond the budget)."""
    if mode == "ram":
        return {"policy": "lru", "prefetch": None}
    if mode in ("ondemand", "lru"):
        return {"policy": "lru", "prefetch": None, "preload": "none"}
    if mode == "edgemoe":
        for opts in BEST:
            if has_predictor_files(model_dir, opts["prefetch"]):
                return dict(opts)
        return {"policy": "lru", "prefetch": "lookahead"}
    warm = mode.endswith("+warm")
    policy, sep, predictor = mode.removesuffix("+warm").partition("+")
    predictor, at, ratio = predictor.partition("@")
    ratio, slash, min_prob = ratio.partition("/")
    if not sep or policy not in POLICIES:
        raise ValueError(
            f"unknown bench mode {mode!r}: use {', '.join(MODES)} or POLICY+PREDICTOR[@RATIO[/P]][+warm] "
            f"(policy {', '.join(POLICIES)}; predictor none, table, lookahead, fitted[:layer_out]; "
            f"RATIO[/P]: prefetch bytes per layer / bytes a token needs, default 1.5, and the "
            f"least probability of being needed a guess must have, default 0; +warm: a warm start at load)"
        )
    out: dict[str, Any] = {
        "policy": policy,
        "prefetch": None if predictor == "none" else predictor,
        "preload": "warm" if warm else "none",
    }
    if at and ratio:
        out["prefetch_ratio"] = float(ratio)
    if slash:
        out["prefetch_min_prob"] = float(min_prob)
    return out


def held_out_prompt(
    encode: Callable[[str], Sequence[int]] | None, vocab_size: int, tokens: int, seed: int
) -> list[int]:
    """`tokens` prompt ids: from a seeded position of the default model's test text, encoded by
    `encode`, when one is given and the text is installed (learned routing follows text, not
    random ids); else seeded random ids. bench and bench --peers both take their prompts here."""
    text = SHIPPED / "test.txt"
    if encode is not None and text.exists():
        ids = list(encode(text.read_text(encoding="utf-8")[: 40 * tokens + 4000]))
        start = int(np.random.default_rng(seed).integers(0, max(1, len(ids) - tokens)))
        if len(ids) >= tokens:
            return ids[start : start + tokens]
    return np.random.default_rng(seed).integers(3, vocab_size, tokens).tolist()


def bench_prompt(m: Any, tokens: int, seed: int) -> list[int]:
    """The prompt of a bench run: held-out text when the model has a tokenizer, else random ids."""
    encode = m.encode if (m.path / "tokenizer.json").exists() else None
    return held_out_prompt(encode, m.config.vocab_size, tokens, seed)


# -- one measured run (in its own process) ------------------------------------------
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    io_before = proc_read_bytes()
    t0 = time.perf_counter()
    m = load(spec["model"], memory_budget=spec["budget"] or None, device=spec.get("device"), **spec.get("options", {}))
    load_s = time.perf_counter() - t0
    if spec["mode"] == "ram":
        m.preload()
    prompt = bench_prompt(m, spec["prompt_tokens"], spec["seed"])
    m.eos_ids = set()  # always generate the full count
    m.reset_stats()
    t0 = time.perf_counter()
    tokens = m.generate(
        prompt, max_new_tokens=spec["new_tokens"], temperature=0.8, top_p=0.95, seed=spec["seed"], stream=True
    )
    ids = [next(tokens)]
    ttft = time.perf_counter() - t0
    at_first = m.cache.stats()
    ids += list(tokens)
    n = len(ids)
    total = time.perf_counter() - t0
    s = m.stats()
    decoded = n - 1
    decode_s = total - ttft
    return {
        "load_seconds": load_s,
        "ttft_seconds": ttft,
        "decode_tokens_per_s": decoded / decode_s if decoded else 0.0,
        "decode_seconds_per_token": decode_s / decoded if decoded else 0.0,
        "tokens": n,
        "peak_rss_bytes": peak_rss_bytes(),
        "storage_read_bytes": proc_read_bytes() - io_before,
        "expert_bytes_read": s["bytes_read"],
        "decode_bytes_per_token": (s["bytes_read"] - at_first["bytes_read"]) / decoded if decoded else 0.0,
        "decode_demand_bytes_per_token": (s["demand_bytes"] - at_first["demand_bytes"]) / decoded if decoded else 0.0,
        "decode_stall_seconds_per_token": (s["stall_seconds"] - at_first["stall_seconds"]) / decoded
        if decoded
        else 0.0,
        "cache_hit_rate": s["cache_hit_rate"],
        "direct_io": s["direct_io"],
        "options": spec.get("options", {}),
        "token_ids": ids,
        "stats": s,
    }


# -- the disk ---------------------------------------------------------------------
def direct_read_bandwidth(
    model_dir: Path, threads: int = 2, max_bytes: int = 256 << 20, seed: int = 0
) -> dict[str, float]:
    """O_DIRECT read bandwidth of the experts file as the cache reads it: whole expert blobs
    in random order by `threads` concurrent readers (bytes/s), and one reader of 4 MiB
    sequential chunks. At most max_bytes per figure."""
    manifest = load_manifest(model_dir)
    offsets, lengths, _, _ = blob_tables(manifest)
    path = model_dir / manifest["experts"]["file"]
    blobs = [
        (int(o), int(n)) for o, n, used in zip(offsets.ravel(), page_bytes(lengths).ravel(), lengths.ravel()) if used
    ]
    order = np.random.default_rng(seed).permutation(len(blobs))
    picked, total = [], 0
    for i in order:
        if total >= max_bytes:
            break
        picked.append(blobs[i])
        total += blobs[i][1]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:

        def reader(jobs: list[tuple[int, int]]) -> None:
            buf = mmap.mmap(-1, max(n for _, n in picked))  # page-aligned, as O_DIRECT needs
            for off, n in jobs:
                os.preadv(fd, [memoryview(buf)[:n]], off)
            buf.close()

        t0 = time.perf_counter()
        workers = [threading.Thread(target=reader, args=(picked[i::threads],)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        random_bps = total / (time.perf_counter() - t0)

        chunk, size = 4 << 20, os.fstat(fd).st_size // 4096 * 4096
        buf = mmap.mmap(-1, chunk)
        t0, done, off = time.perf_counter(), 0, 0
        while done < min(max_bytes, size):
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            done += n
            off = (off + n) % max(chunk, size - chunk)
        seq_bps = done / (time.perf_counter() - t0)
        buf.close()
    finally:
        os.close(fd)
    return {
        "expert_reads_bytes_per_s": random_bps,
        "sequential_bytes_per_s": seq_bps,
        "threads": threads,
        "bytes": total,
    }


# -- the comparison -----------------------------------------------------------------
def measure(
    model_dir: Path, mode: str, budget: int, args: argparse.Namespace, limit: int | None = None, around: Any = None
) -> dict[str, Any]:
    """The median (by decode speed) of args.repeat runs, each in a fresh process after the
    model's files left the page cache; with `limit`, inside a fresh cgroup of that many bytes.
    around: called with no arguments just before and just after each run; its results go into
    the run's record as "around" (the bandwidth probes of run_cgroup)."""
    spec = {
        "model": str(model_dir),
        "mode": mode,
        "budget": budget,
        "seed": args.seed,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.tokens,
        "device": args.device,
        "options": mode_options(mode, model_dir),
    }
    cmd = [sys.executable, "-m", "edgemoe.bench.modes", "--worker", json.dumps(spec)]
    runs = []
    extra: dict[str, Any]  # a run's record beyond the worker's own: the cgroup's figures, the probes
    for _ in range(args.repeat):
        before = around() if around else None
        drop_page_cache(model_dir)
        if limit is None:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")  # import the installed package
            rc, out, err, extra = r.returncode, r.stdout, r.stderr, {}
        else:
            with Cgroup(memory_limit=limit) as cg:
                lr = cg.run(cmd, cwd="/", timeout=600)
            rc, out, err = lr.returncode, lr.stdout, lr.stderr
            extra = {
                "cgroup_limit_bytes": limit,
                "cgroup_peak_bytes": lr.peak_memory_bytes,
                "oom_killed": lr.oom_killed,
            }
            if lr.oom_killed:
                raise RuntimeError(f"bench worker was OOM-killed in a {limit / 1e6:.0f} MB cgroup ({mode})")
        if rc != 0:
            raise RuntimeError(f"bench worker failed ({mode}, budget {budget}):\n{err[-3000:]}")
        if around:
            extra["around"] = [before, around()]
        runs.append(dict(json.loads(out.strip().splitlines()[-1]), **extra))
    best = sorted(runs, key=lambda x: x["decode_tokens_per_s"])[len(runs) // 2]  # the median run
    best["decode_tokens_per_s_all"] = [x["decode_tokens_per_s"] for x in runs]
    best["runs"] = [{k: v for k, v in x.items() if k != "stats"} for x in runs]
    return best


HEADER = (
    "| model | mode | policy+predictor | budget | decode tok/s | TTFT s | peak RSS MB | expert MB read "
    "| hit rate | stall ms/tok |\n|---|---|---|---|---|---|---|---|---|---|"
)


def combo_name(o: dict[str, Any]) -> str:
    ratio = f"@{o.get('prefetch_ratio', 1.5):g}" if "prefetch_ratio" in o or "prefetch_min_prob" in o else ""
    if "prefetch_min_prob" in o:
        ratio += f"/{o['prefetch_min_prob']:g}"
    warm = "+warm" if o.get("preload") == "warm" else ""
    return f"{o.get('policy')}+{o.get('prefetch') or 'none'}{ratio}{warm}"


def row(r: dict[str, Any]) -> str:
    o = r["options"]
    combo = "-" if r["mode"] in ("ram", "ondemand") else combo_name(o)
    label = "all" if r["mode"] == "ram" else f"{100 * r['budget'] / r['expert_bytes']:.0f}%"
    if r["mode"] == "ondemand":
        label = f"1 layer ({label})"
    return (
        f"| {r['model']} | {r['mode']} | {combo} | {label} | {r['decode_tokens_per_s']:.2f} | "
        f"{r['ttft_seconds']:.3f} | {r['peak_rss_bytes'] / 1e6:.0f} | {r['expert_bytes_read'] / 1e6:.1f} | "
        f"{100 * r['cache_hit_rate']:.1f}% | {1e3 * r['decode_stall_seconds_per_token']:.1f} |"
    )


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The streaming speed targets (edgemoe at a 50% budget at least 3x on-demand, and within
    1.3x of all-in-RAM), from the rows measured, per model. A mode listed more than once
    (interleaved) counts by the median of its rows' tok/s."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == name and not r.get("cgroup_limit_bytes")]

        def speed(mode: str, half: bool = False) -> float | None:
            v = [
                r["decode_tokens_per_s"]
                for r in rs
                if r["mode"] == mode and (not half or abs(r["budget"] / r["expert_bytes"] - 0.5) < 0.01)
            ]
            return statistics.median(v) if v else None

        e, od, ram = speed("edgemoe", half=True), speed("ondemand"), speed("ram")
        if e and od and ram:
            lines.append(
                f"{name}: edgemoe at 50% = {e / od:.2f}x on-demand (target >= 3x), "
                f"all-in-RAM is {ram / e:.2f}x faster (target <= 1.3x)"
            )
    return lines


def run_cgroup(
    name: str, model_dir: Path, limit: int, args: argparse.Namespace, emit: Any = print
) -> list[dict[str, Any]]:
    """The model's modes inside a `limit`-byte cgroup, against the I/O lower bound."""
    sized = load(model_dir, memory_budget=1 << 30)
    others = sized.memory_needed(args.prompt_tokens + args.tokens) - sized.budget
    expert_bytes = sized.info()["expert_bytes"]
    budget = limit - others
    del sized
    if budget <= 0:
        raise RuntimeError(
            f"a {limit / 1e6:.0f} MB limit leaves no room for experts ({others / 1e6:.0f} MB for the rest)"
        )

    # The disk of this VM drifts (750-1390 MB/s between runs of one command), so each run is
    # compared with probes taken just before and just after it; the bound uses the fastest
    # figure of either (expert blobs with 2 readers, 4 MiB sequential): the strictest bound.
    def fastest(b: dict[str, float]) -> float:
        return max(b["expert_reads_bytes_per_s"], b["sequential_bytes_per_s"])

    def probe() -> dict[str, float]:
        return direct_read_bandwidth(model_dir, threads=2, max_bytes=128 << 20)

    emit(
        f"\n## {name} inside a {limit / 1e6:.0f} MB cgroup: expert budget {budget / 1e6:.1f} MB "
        f"({100 * budget / expert_bytes:.0f}% of {expert_bytes / 1e6:.0f} MB); the I/O bound of each run uses the "
        f"fastest O_DIRECT bandwidth probed just before or just after it (expert blobs with 2 readers, "
        f"4 MiB sequential)\n"
    )
    emit(
        "| mode | policy+predictor | decode tok/s | ms/token | expert MB read/token | O_DIRECT MB/s "
        "| I/O bound ms/token | ratio (median, range) | cgroup peak MB |\n|---|---|---|---|---|---|---|---|---|"
    )
    out = []
    for mode in args.cgroup_modes.split(","):
        b = budget if mode != "ondemand" else load(model_dir).min_budget
        r = measure(model_dir, mode, b, args, limit=limit, around=probe)
        for run in r["runs"]:
            bw = max(fastest(p) for p in run["around"])
            bound = run["decode_bytes_per_token"] / bw
            run.update(
                io_bound_bytes_per_s=bw,
                io_bound_seconds_per_token=bound,
                ratio_to_io_bound=run["decode_seconds_per_token"] / bound if bound else None,
            )
        ratios = sorted(x["ratio_to_io_bound"] for x in r["runs"] if x["ratio_to_io_bound"] is not None)
        mine = next(x for x in r["runs"] if x["decode_tokens_per_s"] == r["decode_tokens_per_s"])
        r.update(
            model=name,
            mode=mode,
            budget=b,
            expert_bytes=expert_bytes,
            io_bound_bytes_per_s=mine["io_bound_bytes_per_s"],
            io_bound_seconds_per_token=mine["io_bound_seconds_per_token"],
            ratio_to_io_bound=ratios[len(ratios) // 2] if ratios else None,
            ratios_to_io_bound=ratios,
        )
        o = r["options"]
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        emit(
            f"| {mode} | {combo_name(o)} | {r['decode_tokens_per_s']:.2f} | "
            f"{1e3 * r['decode_seconds_per_token']:.1f} | {r['decode_bytes_per_token'] / 1e6:.1f} | "
            f"{r['io_bound_bytes_per_s'] / 1e6:.0f} | {1e3 * r['io_bound_seconds_per_token']:.1f} | "
            f"{r['ratio_to_io_bound']:.2f}{spread} | {r['cgroup_peak_bytes'] / 1e6:.0f} |"
        )
        out.append(r)
    emit("")
    for line in pooled_io_ratios(out):
        emit(line)
    return out


def pooled_io_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per mode, every run's ratio to the I/O bound pooled over the mode's rows (a mode listed
    more than once, interleaved), against the target of at most 1.5x."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        v = sorted(x for r in rows if r["mode"] == mode for x in r.get("ratios_to_io_bound") or [])
        if v:
            lines.append(
                f"- {mode}: ratio to the I/O bound over {len(v)} runs: median {statistics.median(v):.2f} "
                f"({v[0]:.2f}-{v[-1]:.2f}), {sum(x <= 1.5 for x in v)} of {len(v)} runs within 1.5x"
            )
    return lines


if __name__ == "__main__":  # one measured run in a fresh process (measure)
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: edgemoe bench (see edgemoe bench -h)")
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
