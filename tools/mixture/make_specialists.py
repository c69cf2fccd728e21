#!/usr/bin/env python3
"""Make the mixture's specialists from edgemoe's default model, one per part of its corpus.

Each specialist starts from the default model (same tokenizer, same recipe as
tools/train/train_moe.py): the experts its domains route to most (routing statistics of
the default model on that domain's training text) are kept, the others dropped, and the
result is fine-tuned on the domain's training text for a fixed time budget. Fewer experts
per layer (and top-1 routing for the smallest) make the specialists differ in size, so
quality, memory, time and energy per token trade against each other.

    python tools/corpus/build_corpus.py --out artifacts/corpus --seed 1234
    python tools/mixture/make_specialists.py --corpus artifacts/corpus --out artifacts/mixture
    python tools/mixture/train_gate.py --mix artifacts/mixture

Writes OUT/data/ (the corpus tokenized with the default tokenizer, per split: token ids,
document offsets, each document's domain), OUT/specialists/NAME/ (a MixtralForCausalLM
checkpoint with the default tokenizer, and made.json: how it was made, with its figures),
and with --scratch also OUT/scratch/ (the smallest specialist's shape trained from scratch
for the same time, to compare with fine-tuning). Steps whose output exists are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "train"))
import train_moe  # noqa: E402

DEFAULT_MODEL = REPO / "edgemoe" / "default_model"
DOC_SEP = "\n\x1e\n"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name, corpus domains, experts kept per layer, experts per token, peak learning rate. Fewer experts
# make a specialist smaller and faster but cost it routing it must relearn (more than a few hundred
# steps recover), so only python is pruned; the others keep all 16 and only sharpen on their domains.
SPECIALISTS = [
    {"name": "sys", "domains": ["manpages", "code-c"], "experts": 16, "top_k": 2, "lr": 4e-4},
    {"name": "python", "domains": ["code-python", "reference-docs"], "experts": 12, "top_k": 2, "lr": 8e-4},
    {"name": "lexicon", "domains": ["dictionary"], "experts": 16, "top_k": 2, "lr": 8e-4},
    {"name": "fortunes", "domains": ["fortunes"], "experts": 16, "top_k": 2, "lr": 8e-4},
]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


# --- data ----------------------------------------------------------------------------------


def tokenize(corpus: Path, out: Path) -> None:
    """OUT/data/{split}.npz: tokens (uint16, every document <s> ... </s>), offsets [D+1], domain [D]."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    sources = json.loads((corpus / "sources.json").read_text())
    part_domain = {p["part"]: p["domain"] for p in sources["parts"]}
    for split in ("train", "validation", "test"):
        dst = out / f"{split}.npz"
        if dst.exists():
            continue
        docs = [d for d in (corpus / f"{split}.txt").read_text(encoding="utf-8").rstrip("\n").split(DOC_SEP) if d]
        parts = (corpus / f"{split}.parts.txt").read_text().split()
        assert len(parts) == len(docs), (split, len(parts), len(docs))
        ids = []
        for i in range(0, len(docs), 2048):
            for enc in tok.encode_batch(docs[i : i + 2048]):  # the post-processor adds <s>
                ids.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in ids])]).astype(np.int64)
        np.savez(
            dst,
            tokens=np.concatenate(ids),
            offsets=offsets,
            domain=np.array([part_domain[p] for p in parts]),
            part=np.array(parts),
        )
        log(f"tokenized {split}: {len(docs)} documents, {offsets[-1]} tokens")


class Split:
    def __init__(self, path: Path):
        z = np.load(path)
        self.tokens, self.offsets, self.domain = z["tokens"], z["offsets"], z["domain"].astype(str)

    def docs(self, domains: list[str] | None = None) -> list[np.ndarray]:
        return [
            self.tokens[self.offsets[i] : self.offsets[i + 1]]
            for i in range(len(self.domain))
            if domains is None or self.domain[i] in domains
        ]

    def stream(self, domains: list[str]) -> np.ndarray:
        return np.concatenate(self.docs(domains))


def windows(stream: np.ndarray, length: int, limit: int) -> np.ndarray:
    n = len(stream) // length
    idx = np.linspace(0, n - 1, min(limit, n)).astype(np.int64)
    return np.stack([stream[i * length : (i + 1) * length] for i in idx]).astype(np.int64)


# --- models --------------------------------------------------------------------------------


def default_train_model():
    """The default model in train_moe's fast training forward (transformers reads the checkpoint's
    per-expert tensors into its fused layout; the names then match)."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(str(DEFAULT_MODEL), dtype=torch.float32)
    c = hf.config
    model = train_moe.TrainMixtral(c)
    model.load_state_dict(hf.state_dict(), strict=True)
    return model, c


@torch.no_grad()
def routing_counts(model, stream: np.ndarray, n_windows: int = 32, length: int = 256) -> np.ndarray:
    """How often each expert is among a token's top-k, per layer: [layers, experts]."""
    c = model.config
    counts = np.zeros((c.num_hidden_layers, c.num_local_experts), dtype=np.int64)
    w = windows(stream, length, n_windows)
    model.eval()
    for i in range(0, len(w), 8):
        _, _, topis = model(torch.from_numpy(w[i : i + 8]))
        for layer, ti in enumerate(topis):
            counts[layer] += np.bincount(ti.reshape(-1).numpy(), minlength=c.num_local_experts)
    return counts


def prune(model, config, keep: list[list[int]], top_k: int):
    """A TrainMixtral with only experts `keep[layer]` per layer (router rows kept to match)."""
    c = config.__class__.from_dict(config.to_dict())
    c.num_local_experts = len(keep[0])
    c.num_experts_per_tok = top_k
    new = train_moe.TrainMixtral(c)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "layers" in parts and ("experts" in parts or k.endswith("mlp.gate.weight")):
            layer = int(parts[parts.index("layers") + 1])
            idx = torch.tensor(keep[layer])
            out[k] = v.index_select(0, idx).clone()  # experts and router rows: expert axis first
        else:
            out[k] = v.clone()
    new.load_state_dict(out, strict=True)
    return new, c


@torch.no_grad()
def eval_loss(model, w: np.ndarray) -> float:
    loss, _ = train_moe.evaluate(model, w, 8, model.config.num_local_experts)
    return loss


def finetune(
    model, stream: np.ndarray, val: np.ndarray, minutes: float, lr: float, seed: int, tag: str, batch: int, seq: int
) -> dict:
    """Train `model` on random (seq + 1)-token windows of `stream` for `minutes` of training time."""
    args = argparse.Namespace(aux_coef=0.01, z_coef=1e-3)
    opt = train_moe.build_optimizer(model, lr, 0.1)
    model.train()
    rng = np.random.default_rng(seed)
    step, trained, warmup = 0, 0.0, 20
    budget = minutes * 60
    while trained < budget:
        p = trained / budget
        cur = lr * (step + 1) / warmup if step < warmup else lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for g in opt.param_groups:
            g["lr"] = cur
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        b = torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int64))
        t = time.time()
        ce, aux, _, _ = train_moe.train_step(model, opt, b, args, False)
        trained += time.time() - t
        step += 1
        if step % 10 == 0:
            log(f"{tag} step {step} ({100 * trained / budget:.0f}%) loss {ce:.3f} aux {aux:.3f}")
    val_loss = eval_loss(model, val)
    return {"steps": step, "tokens": step * batch * seq, "train_seconds": round(trained, 1), "val_loss": val_loss}


def export(model, config, dst: Path) -> int:
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=True)
    hf = hf.to(torch.bfloat16)
    dst.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(dst, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL / f, dst / f)
    return sum(p.numel() for p in hf.parameters())


def make_specialist(spec: dict, data: Path, out: Path, args: argparse.Namespace) -> None:
    minutes, lr, seed = args.minutes, spec.get("lr", args.lr), args.seed
    dst = out / "specialists" / spec["name"]
    if (dst / "made.json").exists():
        if args.more:
            more(spec, data, dst, args)
        else:
            log(f"{spec['name']}: exists, skipped")
        return
    train, val = Split(data / "train.npz"), Split(data / "validation.npz")
    stream = train.stream(spec["domains"])
    vw = windows(val.stream(spec["domains"]), 257, args.val_windows)
    base, c = default_train_model()
    default_loss = eval_loss(base, vw)
    counts = routing_counts(base, stream)
    keep = [
        sorted(np.argsort(-counts[layer], kind="stable")[: spec["experts"]].tolist()) for layer in range(len(counts))
    ]
    share = [float(counts[layer][keep[layer]].sum() / counts[layer].sum()) for layer in range(len(counts))]
    model, pc = prune(base, c, keep, spec["top_k"])
    pruned_loss = eval_loss(model, vw)
    log(
        f"{spec['name']}: {len(stream)} training tokens; default model val loss {default_loss:.3f}; "
        f"kept {spec['experts']} experts/layer (they took {np.mean(share) * 100:.0f}% of the routing), "
        f"top-{spec['top_k']}: val loss {pruned_loss:.3f} before fine-tuning"
    )
    torch.manual_seed(seed)
    load_before = os.getloadavg()
    res = finetune(model, stream, vw, minutes, lr, seed, spec["name"], args.batch, args.seq)
    load_after = os.getloadavg()
    params = export(model, pc, dst)
    made = {
        "name": spec["name"],
        "domains": spec["domains"],
        "params": params,
        "experts_per_layer": spec["experts"],
        "experts_per_token": spec["top_k"],
        "kept_experts": keep,
        "routing_share_kept": [round(s, 4) for s in share],
        "domain_train_tokens": int(len(stream)),
        "val_loss_default_model": round(default_loss, 4),
        "val_loss_after_pruning": round(pruned_loss, 4),
        "val_loss_after_finetuning": round(res["val_loss"], 4),
        "finetune": {k: v for k, v in res.items() if k != "val_loss"}
        | {"lr": lr, "minutes": minutes, "seed": seed, "batch": args.batch, "seq": args.seq},
        "load_average_before_after": [round(x, 2) for x in (*load_before, *load_after)],
        "command": " ".join(["python", *sys.argv]),
        "made_by": (
            f"default model, the {spec['experts']} experts per layer its domains route to most kept "
            f"(top-{spec['top_k']}), fine-tuned {res['steps']} steps ({res['tokens']} tokens) on {'+'.join(spec['domains'])}"
        ),
    }
    (dst / "made.json").write_text(json.dumps(made, indent=2) + "\n")
    log(f"{spec['name']}: {params / 1e6:.2f}M params, val loss {res['val_loss']:.3f} -> {dst}")


def more(spec: dict, data: Path, dst: Path, args: argparse.Namespace) -> None:
    """Fine-tune a made specialist for another `--minutes` on its domains (a new warm-up and
    cosine schedule), and record the round in its made.json."""
    from transformers import MixtralForCausalLM

    made = json.loads((dst / "made.json").read_text())
    lr = spec.get("lr", args.lr)
    train, val = Split(data / "train.npz"), Split(data / "validation.npz")
    stream = train.stream(spec["domains"])
    vw = windows(val.stream(spec["domains"]), 257, args.val_windows)
    hf = MixtralForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    model = train_moe.TrainMixtral(hf.config)
    model.load_state_dict(hf.state_dict(), strict=True)
    torch.manual_seed(args.seed + len(made.get("rounds", [])) + 1)
    load_before = os.getloadavg()
    res = finetune(model, stream, vw, args.minutes, lr, args.seed + 1, spec["name"], args.batch, args.seq)
    export(model, hf.config, dst)
    made.setdefault("rounds", []).append(
        {k: v for k, v in res.items() if k != "val_loss"}
        | {"lr": lr, "minutes": args.minutes, "batch": args.batch, "seq": args.seq}
        | {
            "val_loss": round(res["val_loss"], 4),
            "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
            "command": " ".join(["python", *sys.argv]),
        }
    )
    made["val_loss_after_finetuning"] = round(res["val_loss"], 4)
    (dst / "made.json").write_text(json.dumps(made, indent=2) + "\n")
    log(f"{spec['name']}: another {res['steps']} steps, val loss {res['val_loss']:.3f} -> {dst}")


def scratch(spec: dict, data: Path, out: Path, args: argparse.Namespace, lr: float) -> None:
    minutes, seed = args.minutes, args.seed
    """The same shape as `spec` trained from a random start for the same time (for comparison)."""
    dst = out / "scratch" / f"{spec['name']}.json"
    if dst.exists():
        return
    train, val = Split(data / "train.npz"), Split(data / "validation.npz")
    stream = train.stream(spec["domains"])
    vw = windows(val.stream(spec["domains"]), 257, args.val_windows)
    _, c = default_train_model()
    c.num_local_experts, c.num_experts_per_tok = spec["experts"], spec["top_k"]
    model = train_moe.TrainMixtral(c)
    model.init_weights(seed)
    res = finetune(model, stream, vw, minutes, lr, seed, f"scratch-{spec['name']}", args.batch, args.seq)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(res | {"lr": lr, "minutes": minutes}, indent=2) + "\n")
    log(f"scratch {spec['name']}: val loss {res['val_loss']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("artifacts/corpus"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/mixture"))
    ap.add_argument("--minutes", type=float, default=16.0, help="fine-tuning time per specialist")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--val-windows", type=int, default=16, help="257-token validation windows per specialist")
    ap.add_argument("--seed", type=int, default=1234)
    # one thread: on a shared, oversubscribed machine two torch threads made a step 10x slower here
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated specialist names")
    ap.add_argument(
        "--more", action="store_true", help="fine-tune specialists already made for another --minutes (a new schedule)"
    )
    ap.add_argument("--scratch", action="store_true", help="also train the smallest shape from scratch")
    ap.add_argument(
        "--experts",
        type=int,
        default=None,
        help="keep this many experts per layer instead (top-2); writes specialists/NAME-eN, not part of the mixture",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenize(args.corpus, args.out / "data")
    only = set(args.only.split(",")) if args.only else None
    for spec in SPECIALISTS:
        if only is None or spec["name"] in only:
            if args.experts:
                spec = {
                    "name": f"{spec['name']}-e{args.experts}",
                    "domains": spec["domains"],
                    "experts": args.experts,
                    "top_k": 2,
                }
            make_specialist(spec, args.out / "data", args.out, args)
    if args.scratch:
        scratch(SPECIALISTS[-1], args.out / "data", args.out, args, 2e-3)


if __name__ == "__main__":
    main()
