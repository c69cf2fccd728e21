"""Decode speed with the one-call native decoder layer (native/layer.h) against the per-op
Python path (DecoderLM.block), on the same model in one process, interleaved.

Both paths give the same logits bit for bit (tests/test_decode_layer.py), so they generate
the same tokens; only the time differs. Each round generates --tokens sampled tokens after
the bench prompt with the native step, then again with it off (model.net.decode_layers =
None), in alternating order; the median tok/s of each over --rounds rounds is printed.

    python tools/bench_decode_step.py                                   # the default model, all in RAM
    python tools/bench_decode_step.py --budget 50%                      # experts streamed, half the bytes
    python tools/bench_decode_step.py --model ~/.cache/edgemoe/bench/mixtral-shaped-4bit-bb4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import edgemoe
    from edgemoe.bench.modes import bench_prompt
    from edgemoe.planning.allocate import parse_fraction
    from edgemoe.planning.default_model import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    ap.add_argument("--model", default=None, help="a converted model directory (default: the default model, 8 bits)")
    ap.add_argument(
        "--budget",
        default=None,
        help="expert budget as a share of the expert bytes, e.g. 50%% (default: unbounded, every expert in RAM)",
    )
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    path = args.model or default_model_path()
    share = parse_fraction(args.budget)
    budget = None
    if share:  # the budget's bytes come from the model's own sizes
        probe = edgemoe.load(path, memory_budget="1TB")
        budget = max(probe.min_budget, int(share * probe.info()["expert_bytes"]))
        del probe
    m = edgemoe.load(path, memory_budget=budget, policy="structure")
    if budget is None:
        m.preload()
    native = m.net.decode_layers
    if native is None:
        sys.exit(f"{path}: its layers do not allow the native decode step (see DecoderLM._decode_layer)")
    m.eos_ids = set()
    prompt = bench_prompt(m, 16, 0)
    runs: dict[str, list[float]] = {"native": [], "python": []}
    for r in range(args.rounds):
        for name in ("native", "python") if r % 2 == 0 else ("python", "native"):
            m.net.decode_layers = native if name == "native" else None
            it = m.generate(prompt, max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, seed=r, stream=True)
            next(it)
            t0 = time.perf_counter()
            n = sum(1 for _ in it)
            runs[name].append(n / (time.perf_counter() - t0))
    m.net.decode_layers = native
    where = f"budget {100 * share:g}% of the expert bytes" if share else "every expert in RAM"
    print(f"{path} ({where}), {args.tokens} tokens x {args.rounds} rounds, decode tok/s:")
    for name, v in runs.items():
        print(f"  {name:7s} median {statistics.median(v):8.1f}   ({', '.join(f'{x:.1f}' for x in v)})")
    print(f"  native / python: {statistics.median(runs['native']) / statistics.median(runs['python']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
