#!/usr/bin/env python3
"""Routing statistics of a training checkpoint on held-out text: is routing non-uniform and predictable?

    python tools/train/routing_stats.py artifacts/train/last.pt --split validation --windows 64

Per layer: expert usage entropy (1.0 = uniform), largest and smallest expert share.
Per layer pair l -> l+1: how well layer l's top-1 expert predicts layer l+1's experts
(table fitted on the first half of the tokens, scored on the second half), against a
baseline that always guesses layer l+1's most used experts; the same conditioned on (l-1, l).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import TokenData  # noqa: E402
from train_moe import TrainMixtral  # noqa: E402


@torch.no_grad()
def collect_routes(ck_path: Path, data_dir: Path, split: str, windows: int, seq_len: int):
    from transformers import MixtralConfig

    ck = torch.load(ck_path, weights_only=False)
    c = MixtralConfig.from_dict(ck["config"])
    model = TrainMixtral(c)
    model.load_state_dict(ck["model"])
    model.eval()
    wins = TokenData(data_dir).eval_windows(split, seq_len, windows)
    routes = []  # per batch: [L, tokens, k]
    nll, n = 0.0, 0
    for i in range(0, len(wins), 8):
        b = torch.from_numpy(wins[i : i + 8])
        logits, _, topi = model(b[:, :-1])
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += b[:, 1:].numel()
        routes.append(torch.stack(topi).numpy())
    return np.concatenate(routes, axis=1), c.num_local_experts, nll / n, ck["step"]


def predictability(ctx: np.ndarray, nxt: np.ndarray, k: int):
    """ctx [T] context keys, nxt [T, k] next layer's experts. Returns (recall of predicted top-k, baseline)."""
    half = len(ctx) // 2
    table: dict[int, Counter] = defaultdict(Counter)
    marginal = Counter()
    for c, row in zip(ctx[:half], nxt[:half]):
        table[int(c)].update(row.tolist())
        marginal.update(row.tolist())
    base_guess = [e for e, _ in marginal.most_common(k)]
    hit = base = 0
    for c, row in zip(ctx[half:], nxt[half:]):
        guess = [e for e, _ in table[int(c)].most_common(k)] or base_guess
        actual = set(row.tolist())
        hit += len(actual & set(guess))
        base += len(actual & set(base_guess))
    total = k * (len(ctx) - half)
    return hit / total, base / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=Path("artifacts/tokenizer"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    routes, E, loss, step = collect_routes(args.checkpoint, args.data, args.split, args.windows, args.seq_len + 1)
    L, T, k = routes.shape
    print(f"checkpoint step {step}: {args.split} loss {loss:.4f} ppl {math.exp(loss):.2f} over {T} tokens")
    out = {"step": step, "split": args.split, "tokens": T, "ppl": math.exp(loss), "layers": [], "pairs": []}
    for l in range(L):
        cnt = np.bincount(routes[l].reshape(-1), minlength=E) / (T * k)
        ent = float(-(cnt * np.log(np.clip(cnt, 1e-12, None))).sum() / math.log(E))
        out["layers"].append({"usage": cnt.round(4).tolist(), "entropy": ent})
        print(f"layer {l}: usage entropy {ent:.3f}  max share {cnt.max():.3f}  min share {cnt.min():.4f}")
    for l in range(L - 1):
        rec1, base = predictability(routes[l][:, 0], routes[l + 1], k)
        line = {"from": l, "to": l + 1, "topk_recall_given_l": rec1, "baseline_most_used": base}
        msg = f"layer {l}->{l + 1}: top-{k} recall from l's top-1 {rec1:.3f} (baseline {base:.3f})"
        if l > 0:
            pair = routes[l - 1][:, 0] * E + routes[l][:, 0]
            rec2, _ = predictability(pair, routes[l + 1], k)
            line["topk_recall_given_l-1_l"] = rec2
            msg += f", from (l-1, l) {rec2:.3f}"
        out["pairs"].append(line)
        print(msg)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
