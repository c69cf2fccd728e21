"""Tokens/s and expert cache hit rate against the memory budget, for one model on this
machine, plotted with matplotlib.

    python examples/budget_explorer.py [MODEL] [--budgets 10,20,40,60,80,100] [-o budget.png]

Each budget is a share of the model's expert bytes (never below the smallest budget the model
runs under). For each one the model is loaded with that budget and generates the same
greedy continuation; the run's decode speed and hit rate are plotted.
"""

import argparse
import statistics

import matplotlib

matplotlib.use("Agg")  # a PNG, no display needed
import matplotlib.pyplot as plt

import edgemoe
from edgemoe.planning.default_model import default_model_path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", nargs="?", help="a converted model directory (default: the default model)")
p.add_argument("--budgets", default="10,20,30,40,60,80,100", help="percentages of the expert bytes")
p.add_argument("--tokens", type=int, default=64, help="new tokens per budget")
p.add_argument("--repeat", type=int, default=3, help="runs per budget; the median speed is plotted")
p.add_argument("--prompt", default="The Linux kernel")
p.add_argument("-o", "--output", default="budget.png")
args = p.parse_args()

path = args.model or default_model_path()
probe = edgemoe.load(path, preload="none")
expert_bytes, least = probe.info()["expert_bytes"], probe.min_budget
probe.close()

rows = []
for pct in sorted(int(b) for b in args.budgets.split(",")):
    budget = max(least, expert_bytes * pct // 100)
    speeds = []
    for _ in range(args.repeat):  # each run starts with an empty cache
        m = edgemoe.load(path, memory_budget=budget, preload="none")
        m.generate(args.prompt, max_new_tokens=args.tokens)  # greedy: the same tokens at every budget
        s = m.stats()
        speeds.append(s["decode_tokens_per_s"])
        m.close()
    rows.append((pct, budget, statistics.median(speeds), s["cache_hit_rate"]))
    print(f"{pct:4d}% {budget / 1e6:8.2f} MB  {rows[-1][2]:8.1f} tok/s  hit rate {rows[-1][3]:.1%}")

mb = [r[1] / 1e6 for r in rows]
fig, speed = plt.subplots(figsize=(7, 4), dpi=110)
speed.plot(mb, [r[2] for r in rows], "o-", color="tab:blue", label="decode tokens/s")
speed.set_xlabel(f"expert memory budget (MB; all experts: {expert_bytes / 1e6:.1f} MB)")
speed.set_ylabel("decode tokens/s", color="tab:blue")
hits = speed.twinx()
hits.plot(mb, [100 * r[3] for r in rows], "s--", color="tab:orange", label="cache hit rate")
hits.set_ylabel("expert cache hit rate (%)", color="tab:orange")
hits.set_ylim(0, 100)
speed.set_title(f"{probe.architecture}: {args.tokens} new tokens from an empty cache, median of {args.repeat}")
fig.tight_layout()
fig.savefig(args.output)
print(f"wrote {args.output}")
