#!/usr/bin/env python3
"""Train edgemoe's default model: a small Mixtral (MixtralForCausalLM) on the tools/corpus corpus.

transformers' own Mixtral forward loops over experts with one_hot masks and trains at
1-2k tokens/s on 2 cores. This file has its own forward with the same parameters
(names and shapes of MixtralForCausalLM's state dict) and the same math, but the
experts run as grouped matmuls on tokens sorted by expert. `--check` proves the
logits equal MixtralForCausalLM's on a batch.

    python tools/train/train_moe.py --check
    python tools/train/train_moe.py --bench
    python tools/train/train_moe.py --train --steps N --out artifacts/train   # resumes if a checkpoint exists
    python tools/train/train_moe.py --export artifacts/train/last.pt --to edgemoe/default_model
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import TokenData  # noqa: E402

# The shipped shape. Override with --shape for benchmarks.
SHAPES = {
    # name: hidden, intermediate (per expert), layers, heads, kv heads
    "s256": dict(
        hidden_size=256, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2
    ),
    "s256l6": dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2
    ),
    "s320": dict(
        hidden_size=320, intermediate_size=320, num_hidden_layers=8, num_attention_heads=5, num_key_value_heads=5
    ),
    "s384": dict(
        hidden_size=384, intermediate_size=256, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2
    ),
}


def make_config(shape: str, vocab_size: int, bos: int, eos: int, seq_len: int, aux_coef: float):
    from transformers import MixtralConfig

    s = SHAPES[shape]
    return MixtralConfig(
        vocab_size=vocab_size,
        **s,
        head_dim=s["hidden_size"] // s["num_attention_heads"],
        num_local_experts=16,
        num_experts_per_tok=2,
        hidden_act="silu",
        max_position_embeddings=max(1024, seq_len),
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=aux_coef,
        output_router_logits=False,
        router_jitter_noise=0.0,
        attention_dropout=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        initializer_range=0.02,
    )


# --- the training model: same state-dict names and shapes as MixtralForCausalLM ------------


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.num_local_experts, c.hidden_size))


class Experts(nn.Module):
    def __init__(self, c):
        super().__init__()
        E, H, I = c.num_local_experts, c.hidden_size, c.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))  # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(E, H, I))


class SparseMoe(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k, self.E = c.num_experts_per_tok, c.num_local_experts
        self.gate = Router(c)
        self.experts = Experts(c)

    def forward(self, x):
        """x [N, H] -> (y [N, H], router_logits [N, E], topk_idx [N, k])"""
        N, H = x.shape
        router_logits = F.linear(x, self.gate.weight)  # [N, E]
        probs = torch.softmax(router_logits.float(), dim=-1)
        topv, topi = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        topv = topv / topv.sum(-1, keepdim=True)
        # group the N*k (token, expert) assignments by expert
        flat_e = topi.reshape(-1)  # [N*k]
        order = torch.argsort(flat_e, stable=True)
        tok = order // self.top_k  # token of each sorted row
        w = topv.reshape(-1)[order].to(x.dtype)  # [N*k]
        counts = torch.bincount(flat_e, minlength=self.E).tolist()
        xs = x.index_select(0, tok)  # [N*k, H], expert-contiguous
        # unbind (not [e] indexing): its backward is one stack, not E full-size zero+add
        w_gu, w_down = self.experts.gate_up_proj.unbind(0), self.experts.down_proj.unbind(0)
        outs = []
        for e, xe in enumerate(torch.split(xs, counts)):
            if xe.shape[0] == 0:
                continue
            g, u = F.linear(xe, w_gu[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(g) * u, w_down[e]))
        ys = torch.cat(outs) * w[:, None]
        y = torch.zeros_like(x).index_add_(0, tok, ys)
        return y, router_logits, topi


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = SparseMoe(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        B, T, H = x.shape
        y, logits, topi = self.mlp(self.post_attention_layernorm(x).reshape(B * T, H))
        return x + y.view(B, T, H), logits, topi


class Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TrainMixtral(nn.Module):
    """Mixtral with grouped expert matmuls; state_dict() keys match MixtralForCausalLM's."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv = 1.0 / (
            c.rope_parameters["rope_theta"] ** (torch.arange(0, c.head_dim, 2, dtype=torch.float) / c.head_dim)
        )
        self.register_buffer("inv_freq", inv, persistent=False)

    def init_weights(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        n_layers = self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            else:
                # GPT-2 style: projections back into the residual stream scaled by depth
                s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj")) else std
                with torch.no_grad():
                    p.normal_(0.0, s, generator=g)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, dtype=torch.float)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # [T, hd]
        x = self.model.embed_tokens(ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        router_logits, topis = [], []
        for layer in self.model.layers:
            x, rl, ti = layer(x, cos, sin)
            router_logits.append(rl)
            topis.append(ti)
        x = self.model.norm(x)
        return self.lm_head(x), router_logits, topis


def balance_loss(router_logits: list[torch.Tensor], topis: list[torch.Tensor], E: int, k: int):
    """Switch-style load balancing per layer, averaged: E * sum_e f_e * P_e (1.0 when uniform)."""
    losses = []
    for rl, ti in zip(router_logits, topis):
        probs = torch.softmax(rl.float(), dim=-1)
        f = torch.bincount(ti.reshape(-1), minlength=E).float() / ti.numel()
        losses.append(E * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def z_loss(router_logits: list[torch.Tensor]):
    return torch.stack([torch.logsumexp(rl.float(), -1).pow(2).mean() for rl in router_logits]).mean()


# --- check against transformers ------------------------------------------------------------


def check(args):
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    c = make_config(args.shape, 512, 1, 2, 64, 0.01)
    ours = TrainMixtral(c)
    ours.init_weights(0)
    ref = MixtralForCausalLM(c).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # strict: every name matches
    ids = torch.randint(0, 512, (3, 64))
    with torch.no_grad():
        a, rl, _ = ours(ids)
        out = ref(ids, output_router_logits=True)
    diff = (a - out.logits).abs().max().item()
    rdiff = max((x - y).abs().max().item() for x, y in zip(rl, out.router_logits))
    print(
        f"check: max |logits diff| = {diff:.3g}, max |router logits diff| = {rdiff:.3g} "
        f"(logit scale {out.logits.abs().max().item():.3g}); state dict keys identical"
    )
    assert diff < 1e-4 and rdiff < 1e-5, "training forward differs from MixtralForCausalLM"
    # gradients flow to every parameter
    ours.zero_grad()
    logits, rl, ti = ours(ids)
    (F.cross_entropy(logits.reshape(-1, 512), ids.reshape(-1)) + 0.01 * balance_loss(rl, ti, 16, 2)).backward()
    nograd = [n for n, p in ours.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not nograd, f"no gradient for {nograd}"
    print("check: OK")


# --- training --------------------------------------------------------------------------------


def count_params(c):
    m = TrainMixtral(c)
    total = sum(p.numel() for p in m.parameters())
    experts = sum(p.numel() for n, p in m.named_parameters() if "experts" in n)
    active = total - experts + experts * c.num_experts_per_tok // c.num_local_experts
    return total, experts, active


def train_step(model, opt, batch, args, autocast):
    ids, tgt = batch[:, :-1], batch[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, rl, ti = model(ids)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    aux = balance_loss(rl, ti, model.config.num_local_experts, model.config.num_experts_per_tok)
    z = z_loss(rl)
    loss = ce + args.aux_coef * aux + args.z_coef * z
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), aux.item(), z.item(), gn.item()


@torch.no_grad()
def evaluate(model, windows, batch_size, E):
    model.eval()
    nll, n = 0.0, 0
    usage = torch.zeros(model.config.num_hidden_layers, E)
    for i in range(0, len(windows), batch_size):
        b = torch.from_numpy(windows[i : i + batch_size].astype(np.int64))
        logits, _, ti = model(b[:, :-1])
        nll += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += b[:, 1:].numel()
        for l, t in enumerate(ti):
            usage[l] += torch.bincount(t.reshape(-1), minlength=E).float()
    model.train()
    p = usage / usage.sum(1, keepdim=True)
    ent = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(E)  # 1.0 = uniform
    return nll / n, ent.tolist()


def build_optimizer(model, lr, wd):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def log(fh, msg):
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    if fh:
        fh.write(line + "\n")
        fh.flush()


def train(args):
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = TokenData(Path(args.data))
    c = make_config(args.shape, data.vocab_size, data.bos, data.eos, args.seq_len, args.aux_coef)
    model = TrainMixtral(c)
    model.init_weights(args.seed)
    opt = build_optimizer(model, args.lr, args.wd)
    step, trained_s = 0, 0.0
    ckpt_path = out / "last.pt"
    fh = open(out / "train.log", "a")
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        trained_s = ck.get("trained_seconds", 0.0)
        # keep the schedule of the run being resumed
        args.steps, args.time_budget_min = ck["args"]["steps"], ck["args"].get("time_budget_min")
        log(fh, f"resumed from {ckpt_path} at step {step}")
    total, experts, active = count_params(c)
    log(
        fh,
        f"shape {args.shape}: {json.dumps(SHAPES[args.shape])} vocab {c.vocab_size} experts 16 top-2; "
        f"params total {total / 1e6:.2f}M (experts {experts / 1e6:.2f}M) active/token {active / 1e6:.2f}M",
    )
    log(fh, f"args {json.dumps(vars(args))}")
    if args.time_budget_min:
        log(
            fh,
            f"train tokens {data.n_train / 1e6:.2f}M; tokens/step {args.batch * args.seq_len}; "
            f"schedule by time: {args.time_budget_min} min of training (evals excluded)",
        )
    else:
        log(
            fh,
            f"train tokens {data.n_train / 1e6:.2f}M; tokens/step {args.batch * args.seq_len}; "
            f"steps {args.steps} -> {args.steps * args.batch * args.seq_len / 1e6:.1f}M tokens",
        )
    val = data.eval_windows("validation", args.seq_len + 1, args.val_windows)
    rng_base = args.seed * 1_000_003
    last_ck = time.time()
    t0, tok_done = time.time(), 0
    ce_acc = aux_acc = 0.0
    n_acc = 0

    def progress():
        # fraction of the schedule done: by training seconds when a time budget is set, else by steps
        if args.time_budget_min:
            return trained_s / (args.time_budget_min * 60)
        return step / args.steps

    done = progress() >= 1.0
    while not done:
        # cosine over progress(); warmup in steps either way
        p = progress()
        lr = (
            args.lr * (step + 1) / args.warmup
            if step < args.warmup
            else args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.from_numpy(data.sample(np.random.default_rng(rng_base + step), args.batch, args.seq_len + 1))
        ts = time.time()
        ce, aux, z, gn = train_step(model, opt, batch, args, args.bf16)
        trained_s += time.time() - ts
        step += 1
        done = progress() >= 1.0
        tok_done += args.batch * args.seq_len
        ce_acc += ce
        aux_acc += aux
        n_acc += 1
        if step % args.log_every == 0:
            el = time.time() - t0
            log(
                fh,
                f"step {step} ({progress() * 100:.1f}%) lr {lr:.2e} loss {ce_acc / n_acc:.4f} aux {aux_acc / n_acc:.4f} "
                f"z {z:.2f} gnorm {gn:.2f} tok/s {tok_done / el:.0f}",
            )
            ce_acc = aux_acc = 0.0
            n_acc = 0
        if step % args.eval_every == 0 or done:
            vl, ent = evaluate(model, val, args.batch, c.num_local_experts)
            log(
                fh,
                f"eval step {step} val_loss {vl:.4f} val_ppl {math.exp(vl):.2f} "
                f"usage_entropy/layer {' '.join(f'{e:.3f}' for e in ent)}",
            )
        if time.time() - last_ck > args.ckpt_minutes * 60 or done:
            tmp = out / "last.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "args": vars(args),
                    "trained_seconds": trained_s,
                    "config": c.to_dict(),
                },
                tmp,
            )
            os.replace(tmp, ckpt_path)
            last_ck = time.time()
            log(fh, f"checkpoint step {step} -> {ckpt_path}")
    log(fh, "done")


def bench(args):
    torch.set_num_threads(args.threads)
    for shape in args.bench_shapes.split(","):
        c = make_config(shape, 8192, 1, 2, args.seq_len, 0.01)
        model = TrainMixtral(c)
        model.init_weights(0)
        opt = build_optimizer(model, 1e-3, 0.1)
        total, experts, active = count_params(c)
        for bf16 in [False, True] if args.bench_bf16 else [args.bf16]:
            batch = torch.randint(0, 8192, (args.batch, args.seq_len + 1))
            train_step(model, opt, batch, args, bf16)
            t = time.time()
            n = args.bench_steps
            for _ in range(n):
                train_step(model, opt, batch, args, bf16)
            dt = (time.time() - t) / n
            print(
                f"{shape} total {total / 1e6:.1f}M active {active / 1e6:.2f}M bf16={bf16} batch {args.batch}x{args.seq_len}: "
                f"{dt:.2f}s/step {args.batch * args.seq_len / dt:.0f} tok/s",
                flush=True,
            )


def export(args):
    """Load a training checkpoint into MixtralForCausalLM and save it (bf16) with the tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    ck = torch.load(args.export, weights_only=False)
    c = MixtralConfig.from_dict(ck["config"])
    model = MixtralForCausalLM(c)
    model.load_state_dict(ck["model"], strict=True)
    model = model.to(torch.bfloat16)
    dst = Path(args.to)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(args.data) / f).exists():
            shutil.copy(Path(args.data) / f, dst / f)
    print(f"exported step {ck['step']} to {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--export", default=None)
    ap.add_argument("--to", default="edgemoe/default_model")
    ap.add_argument("--data", default="artifacts/tokenizer", help="tokenizer + tokenized corpus dir")
    ap.add_argument("--out", default="artifacts/train")
    ap.add_argument("--shape", default="s256", choices=sorted(SHAPES))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="schedule (cosine) and stop by training time instead of --steps",
    )
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--ckpt-minutes", type=float, default=10)
    ap.add_argument("--bench-shapes", default="s256,s256l6,s384")
    ap.add_argument("--bench-steps", type=int, default=3)
    ap.add_argument("--bench-bf16", action="store_true")
    args = ap.parse_args()
    if args.check:
        check(args)
    if args.bench:
        bench(args)
    if args.train:
        train(args)
    if args.export:
        export(args)


if __name__ == "__main__":
    main()
