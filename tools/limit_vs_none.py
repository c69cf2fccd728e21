"""Is edgemoe slower with no memory limit than under one? The edgemoe runs of `edgemoe bench
--peers` (same spec, one process and one cgroup each, files dropped from the page cache),
with no limit and at --limit times the Q4_0 file, alternated for --rounds rounds so that a
shared machine's drift falls on both. Prints each setting's decode tok/s (median, min-max),
cache hit rates and bytes read.

    python tools/limit_vs_none.py --cache DIR [--limit 1.2] [--rounds 5]

DIR is the --cache of an earlier `edgemoe bench --peers llama.cpp --models mixtral-shaped`
(the converted model and the GGUF are taken from DIR/peers). Needs root (cgroup v1).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from edgemoe.bench import llama_cpp as peers
from edgemoe.runtime.engine import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="the --cache of an earlier bench --peers run")
    ap.add_argument("--limit", type=float, default=1.2, help="the limit, a multiple of the Q4_0 file (default 1.2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    d = Path(args.cache) / "peers"
    ours = next(d.glob("mixtral-shaped-*-edgemoe-4bit-g32-sym"))
    q4 = next(d.glob("mixtral-shaped-*-Q4_0.gguf")).stat().st_size
    probe = load(ours, memory_budget=1 << 40)
    others = probe.memory_needed(args.prompt_tokens + args.tokens) - probe.budget
    min_budget, vocab = probe.min_budget, probe.config.vocab_size
    del probe
    options = peers.mode_options("edgemoe", ours)
    prompt = peers.prompt_ids("mixtral-shaped", ours, args.prompt_tokens, 0, vocab)
    settings = {"no limit": None, f"{args.limit:g}x": args.limit}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, factor in settings.items():
            limit = peers.limit_bytes(factor, q4)
            budget = peers.edgemoe_budget(limit, others, min_budget)
            spec = dict(engine="edgemoe", model=str(ours), budget=budget, options=options, prompt=prompt)
            spec.update(new_tokens=args.tokens, threads=2, seed=0)
            runs[name].append(peers.run_limited(spec, [ours], limit, None, timeout=300))
    for name, rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        tps = [r["decode_tokens_per_s"] for r in ok]
        if not tps:
            print(f"{name}: no run completed ({', '.join(r['status'] for r in rs)})")
            continue
        hits = ", ".join(f"{r['cache_hit_rate']:.3f}" for r in ok)
        read = ", ".join(f"{r['read_bytes'] / 1e6:.0f}" for r in ok)
        print(
            f"{name}: decode {statistics.median(tps):.1f} tok/s ({min(tps):.1f}-{max(tps):.1f}), "
            f"hit rate {hits}, read MB {read}"
        )


if __name__ == "__main__":
    main()
