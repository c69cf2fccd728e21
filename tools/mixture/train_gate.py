#!/usr/bin/env python3
"""Train the mixture's gate once over all specialists, export it, and finish the mixture directory.

    python tools/mixture/make_specialists.py --corpus artifacts/corpus --out artifacts/mixture
    python tools/mixture/train_gate.py --mix artifacts/mixture

1. Every specialist (and the default model, for comparison) scores the corpus's validation and
   test documents (48 per domain of each split, a random sample): per document, the first min(32, length/2)
   tokens are the prompt the gate sees, and the log-probability of each of the next (up to) 64
   true tokens is kept.
   The gate also gets `--train-docs` documents per domain of the training split, scored the
   same way: the validation split has only 5 code-python and 8 reference-docs documents, too
   few for the gate to learn those domains from. The specialists were fine-tuned on random
   windows of their domains' training text, but on a few percent of it (200 000 tokens of
   python's 6M at most), so their scores on these documents are nearly those of unseen text.
2. The gate (features -> 64 ReLU -> one logit per specialist) is trained on those documents
   to minimise the cross-entropy of the gated mixture, and exported as gate.onnx; the test
   documents are never used to train or tune it.
3. The test documents with their log-probabilities become heldout.npz; mixture.json is written.
4. Figures (results.json, results.md): held-out loss per domain of each specialist, of the
   default model and of the gated mixture; the mixture against the best single specialist on
   the whole (mixed-domain) test split; and for subsets of the specialists, the full gate
   restricted and renormalised against a gate retrained on that subset only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_specialists import DEFAULT_MODEL, SPECIALISTS, Split, train_moe  # noqa: E402

from edgemoe.mixture.features import FeatureSpec  # noqa: E402
from edgemoe.mixture.gate import Gate, restrict  # noqa: E402
from edgemoe.mixture.heldout import Heldout, mixture_loss, single_loss  # noqa: E402
from edgemoe.mixture.spec import MixtureSpec, write_spec  # noqa: E402
from edgemoe.mixture.training import export_gate, gate_logits, make_heldout, train_gate  # noqa: E402

REFERENCE = "default"  # the default model: scored for comparison, not part of the mixture


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


class FastForward:
    """A checkpoint in train_moe's forward (grouped expert matmuls, the same logits as
    MixtralForCausalLM's, checked by `train_moe.py --check`), several times faster here."""

    def __init__(self, path: Path):
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        self.model = train_moe.TrainMixtral(hf.config)
        self.model.load_state_dict(hf.state_dict(), strict=True)
        self.model.eval()

    def __call__(self, input_ids):
        logits, _, _ = self.model(input_ids)
        return SimpleNamespace(logits=logits)


def load_models(mix: Path, only: list[str] | None = None) -> dict:
    paths = {s["name"]: mix / "specialists" / s["name"] for s in SPECIALISTS} | {REFERENCE: DEFAULT_MODEL}
    return {name: FastForward(p) for name, p in paths.items() if only is None or name in only}


def rescore(path: Path, models: dict, split: Split, rows: np.ndarray, score_tokens: int, features: FeatureSpec) -> None:
    """Replace the columns of `models` (a specialist fine-tuned further) in a scored sample."""
    h, docs = Heldout.load(path), split.docs()
    fresh = make_heldout(models, [docs[i] for i in rows], list(split.domain[rows]), features, score_tokens)
    assert np.array_equal(fresh.tokens, h.tokens), f"{path} was scored from other documents"
    for j, name in enumerate(fresh.specialists):
        h.logprobs[:, h.specialists.index(name)] = fresh.logprobs[:, j]
    h.save(path)
    log(f"rescored {path.name} with {', '.join(fresh.specialists)}")


def scored_path(mix: Path, split: str, n_docs: int) -> Path:
    # the validation and test samples keep their old names; the training sample's size is in its name
    return mix / "work" / (f"{split}{n_docs}_scored.npz" if split == "train" else f"{split}_scored.npz")


def sample_rows(s: Split, n_docs: int) -> np.ndarray:
    # the split's documents are in a seeded random order; take the first n_docs of each domain
    # (fortune cookies are most of the documents by count, a twelfth of the text)
    return np.concatenate([np.flatnonzero(s.domain == d)[:n_docs] for d in sorted(set(s.domain))])


def scored(
    mix: Path, split: str, features: FeatureSpec, score_tokens: int, n_docs: int, models: dict | None
) -> Heldout:
    path = scored_path(mix, split, n_docs)
    if path.exists():
        return Heldout.load(path)
    s = Split(mix / "data" / f"{split}.npz")
    models = models or load_models(mix)
    t = time.time()
    rows = sample_rows(s, n_docs)
    docs = s.docs()
    h = make_heldout(models, [docs[i] for i in rows], list(s.domain[rows]), features, score_tokens)
    log(f"scored {split}: {len(h.domain)} documents, {int(h.n_scored.sum())} tokens, {time.time() - t:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    h.save(path)
    return h


def columns(h: Heldout, names: list[str]) -> Heldout:
    idx = [h.specialists.index(n) for n in names]
    return Heldout(names, h.domain, h.tokens, h.prompt_len, h.n_scored, h.features, h.logprobs[:, idx])


def concat(a: Heldout, b: Heldout) -> Heldout:
    assert a.specialists == b.specialists and a.tokens.shape[1] == b.tokens.shape[1]
    return Heldout(
        a.specialists,
        np.concatenate([a.domain, b.domain]),
        np.concatenate([a.tokens, b.tokens]),
        np.concatenate([a.prompt_len, b.prompt_len]),
        np.concatenate([a.n_scored, b.n_scored]),
        np.concatenate([a.features, b.features]),
        np.concatenate([a.logprobs, b.logprobs]),
    )


def ppl(loss: float) -> float:
    return math.exp(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", type=Path, default=Path("artifacts/mixture"))
    ap.add_argument("--buckets", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--score-tokens", type=int, default=64)
    ap.add_argument("--docs", type=int, default=48, help="documents per domain scored in each split")
    ap.add_argument(
        "--train-docs",
        type=int,
        default=96,
        help="documents per domain of the training split the gate also trains on (0: validation only)",
    )
    ap.add_argument(
        "--rescore",
        default=None,
        help="comma-separated specialists fine-tuned since the documents were scored: score again with these only",
    )
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)  # see make_specialists.py
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mix = args.mix
    feats = FeatureSpec(buckets=args.buckets, prompt_tokens=args.prompt_tokens)
    names = [s["name"] for s in SPECIALISTS]

    samples = [("validation", args.docs), ("test", args.docs)] + (
        [("train", args.train_docs)] if args.train_docs else []
    )
    if args.rescore:
        fresh = load_models(mix, args.rescore.split(","))
        for split, n in samples:
            if scored_path(mix, split, n).exists():
                s = Split(mix / "data" / f"{split}.npz")
                rescore(scored_path(mix, split, n), fresh, s, sample_rows(s, n), args.score_tokens, feats)
    need = not all(scored_path(mix, s, n).exists() for s, n in samples)
    models = load_models(mix) if need else None
    val_all = scored(mix, "validation", feats, args.score_tokens, args.docs, models)
    test_all = scored(mix, "test", feats, args.score_tokens, args.docs, models)
    val, test = columns(val_all, names), columns(test_all, names)
    if args.train_docs:
        val = concat(val, columns(scored(mix, "train", feats, args.score_tokens, args.train_docs, models), names))

    hp = dict(hidden=args.hidden, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    t = time.time()
    net = train_gate(val, **hp)
    log(f"gate trained on {len(val.domain)} validation and training documents in {time.time() - t:.1f}s")
    export_gate(net, mix / "gate.onnx", names, feats)
    test.save(mix / "heldout.npz")
    made = {s["name"]: json.loads((mix / "specialists" / s["name"] / "made.json").read_text()) for s in SPECIALISTS}
    write_spec(
        mix,
        [
            {
                "name": n,
                "path": f"specialists/{n}",
                "params": made[n]["params"],
                "domains": made[n]["domains"],
                "made_by": made[n]["made_by"],
            }
            for n in names
        ],
        feats,
        names,
        top_k=args.top_k,
    )
    spec = MixtureSpec.load(mix)
    gate = Gate.load(spec)
    w_full = gate.weights_from_features(test.features)
    # the ONNX gate is the torch gate
    ref = torch.softmax(torch.from_numpy(gate_logits(net, test.features)), -1).numpy()
    parity = float(np.abs(w_full - ref).max())

    domains = sorted(set(test.domain))
    rows = {d: np.flatnonzero(test.domain == d) for d in domains}
    rows["all (mixed)"] = np.arange(len(test.domain))
    ref_idx = test_all.specialists.index(REFERENCE)
    per_domain: dict[str, dict[str, float]] = {}
    for key, r in rows.items():
        per_domain[key] = {n: single_loss(test, i, r) for i, n in enumerate(names)}
        per_domain[key][REFERENCE] = single_loss(test_all, ref_idx, r)
        per_domain[key]["gated mixture"] = mixture_loss(test, w_full, r)
        top = restrict(gate.logits_from_features(test.features), np.ones(len(names), bool))
        kth = np.sort(top, axis=1)[:, -args.top_k][:, None]
        w_topk = np.where(top >= kth, top, 0.0)
        w_topk /= w_topk.sum(1, keepdims=True)
        per_domain[key][f"gated top-{args.top_k}"] = mixture_loss(test, w_topk, r)
        per_domain[key]["uniform mixture"] = mixture_loss(test, np.full_like(w_full, 1 / len(names)), r)
        per_domain[key]["tokens"] = int(test.mask[r].sum())
    mixed = per_domain["all (mixed)"]
    best_single = min(names, key=lambda n: mixed[n])
    gain = 1 - ppl(mixed["gated mixture"]) / ppl(mixed[best_single])

    subsets = []
    for k in range(1, len(names) + 1):
        for sub in itertools.combinations(range(len(names)), k):
            mask = np.zeros(len(names), bool)
            mask[list(sub)] = True
            restricted = mixture_loss(test, gate.weights_from_features(test.features, list(sub)))
            if k == len(names):
                retrained = restricted
            elif k == 1:
                retrained = single_loss(test, sub[0])  # a gate over one specialist is that specialist
            else:
                net_s = train_gate(val, enabled=mask, **hp)
                retrained = mixture_loss(test, restrict(gate_logits(net_s, test.features), mask))
            subsets.append(
                {
                    "subset": [names[i] for i in sub],
                    "restricted_full_gate": restricted,
                    "retrained_gate": retrained,
                    "best_single": min(single_loss(test, i) for i in sub),
                }
            )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "specialists": {n: {k: made[n][k] for k in ("params", "domains", "made_by")} for n in names},
        "gate": hp
        | {"features": feats.to_dict(), "gate_documents": len(val.domain), "train_docs_per_domain": args.train_docs},
        "onnx_vs_torch_max_weight_diff": parity,
        "test_documents": len(test.domain),
        "loss_per_domain": per_domain,
        "best_single_on_mixed": best_single,
        "mixture_ppl_reduction_vs_best_single": gain,
        "subsets": subsets,
    }
    (mix / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (mix / "results.md").write_text(markdown(results, names))
    print(markdown(results, names))


def markdown(r: dict, names: list[str]) -> str:
    cols = [*names, REFERENCE, "uniform mixture", "gated top-2", "gated mixture"]
    out = ["| test documents | tokens | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for key, v in r["loss_per_domain"].items():
        cells = [f"{v[c]:.3f} ({ppl(v[c]):.1f})" if c in v else "" for c in cols]
        out.append(f"| {key} | {v['tokens']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        f"Mixed-domain test split: gated mixture perplexity {ppl(r['loss_per_domain']['all (mixed)']['gated mixture']):.2f}"
        f" against {ppl(r['loss_per_domain']['all (mixed)'][r['best_single_on_mixed']]):.2f} for the best single"
        f" specialist ({r['best_single_on_mixed']}): {100 * r['mixture_ppl_reduction_vs_best_single']:.1f}% lower."
    )
    out.append("")
    out.append("| subset | full gate, restricted and renormalised | gate retrained on the subset | best single in it |")
    out.append("| --- | --- | --- | --- |")
    for s in r["subsets"]:
        a, b, c = s["restricted_full_gate"], s["retrained_gate"], s["best_single"]
        out.append(
            f"| {' + '.join(s['subset'])} | {a:.4f} ({ppl(a):.2f}) | {b:.4f} ({ppl(b):.2f}) | {c:.4f} ({ppl(c):.2f}) |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
