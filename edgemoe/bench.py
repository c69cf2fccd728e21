"""`edgemoe bench`: decode speed, time to first token, peak RSS and bytes read for
several expert-loading modes side by side, each in a fresh process with the model's
files dropped from the page cache first.

Modes:
  ram       every expert read into RAM before timing (the ceiling)
  ondemand  a cache of one layer's routed experts, no prefetch (EdgeMoE's baseline)
  lru       LRU cache at the given budget, no prefetch
  edgemoe   the best policy and predictor at the given budget
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("ram", "ondemand", "lru", "edgemoe")
# mode -> load() keyword arguments beyond the budget; filled in as the runtime grows options
MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "ram": {},
    "ondemand": {},
    "lru": {"policy": "lru", "prefetch": None},
    "edgemoe": {"policy": "edgemoe", "prefetch": "lookahead"},
}

# The Mixtral-shaped model of issue 4: about 0.88B parameters, 0.5 GB at 4 bits.
MIXTRAL_SHAPED = dict(hidden_size=1024, num_hidden_layers=12, num_local_experts=8, num_experts_per_tok=2,
                      intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, vocab_size=8000)


# -- models -------------------------------------------------------------------------
def synth_mixtral(dst: Path, seed: int = 0, std: float = 0.02, **shape: int) -> Path:
    """Write a random-weight Mixtral checkpoint (config.json + bf16 model.safetensors) with numpy."""
    from .converters.safetensors_io import SafetensorsWriter

    cfg = dict(MIXTRAL_SHAPED, **shape)
    H, I, L, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    rng = np.random.default_rng(seed)

    def bf16(*shape: int, scale: float = std) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return (w.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16 bits

    def ones(n: int) -> np.ndarray:
        return np.full(n, 0x3F80, np.uint16)  # 1.0 in bf16

    dst.mkdir(parents=True, exist_ok=True)
    w = SafetensorsWriter()
    w.add("model.embed_tokens.weight", bf16(cfg["vocab_size"], H), "BF16")
    w.add("lm_head.weight", bf16(cfg["vocab_size"], H), "BF16")
    w.add("model.norm.weight", ones(H), "BF16")
    for i in range(L):
        p = f"model.layers.{i}."
        w.add(p + "input_layernorm.weight", ones(H), "BF16")
        w.add(p + "post_attention_layernorm.weight", ones(H), "BF16")
        w.add(p + "self_attn.q_proj.weight", bf16(H, H), "BF16")
        w.add(p + "self_attn.k_proj.weight", bf16(kv, H), "BF16")
        w.add(p + "self_attn.v_proj.weight", bf16(kv, H), "BF16")
        w.add(p + "self_attn.o_proj.weight", bf16(H, H), "BF16")
        w.add(p + "block_sparse_moe.gate.weight", bf16(E, H, scale=1.0), "BF16")
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            w.add(q + "w1.weight", bf16(I, H), "BF16")
            w.add(q + "w3.weight", bf16(I, H), "BF16")
            w.add(q + "w2.weight", bf16(H, I), "BF16")
    w.write(dst / "model.safetensors")
    config = dict(cfg, architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=1, eos_token_id=2,
                  torch_dtype="bfloat16")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def prepare(name: str, cache: Path, bits: int) -> Path:
    """A converted model directory for a bench model name or path."""
    from .converters.convert import convert

    if name == "default":
        from .default import default_model_path

        return default_model_path(bits=bits)
    if name == "mixtral-shaped":
        model = cache / f"mixtral-shaped-{bits}bit"
        if not (model / "manifest.json").exists():
            hf = cache / "mixtral-shaped-hf"
            if not (hf / "model.safetensors").exists():
                print(f"generating the random-weight Mixtral-shaped checkpoint in {hf} ...", file=sys.stderr)
                synth_mixtral(hf)
            convert(hf, model, bits=bits, overwrite=True)
        return model
    return Path(name)


# -- one measured run (in its own process) ------------------------------------------
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import edgemoe

    from .model import peak_rss_bytes

    io_before = _read_bytes()
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in spec.get("options", {}).items() if k in spec.get("supported", ())}
    m = edgemoe.load(spec["model"], memory_budget=spec["budget"] or None, **kwargs)
    load_s = time.perf_counter() - t0
    if spec["mode"] == "ram":
        m.warm()
    prompt = np.random.default_rng(spec["seed"]).integers(3, m.config.vocab_size, spec["prompt_tokens"]).tolist()
    m.eos_ids = set()  # always generate the full count
    m.reset_stats()
    t0 = time.perf_counter()
    tokens = m.generate(prompt, max_new_tokens=spec["new_tokens"], stream=True)
    next(tokens)
    ttft = time.perf_counter() - t0
    n = 1 + sum(1 for _ in tokens)
    total = time.perf_counter() - t0
    s = m.stats()
    return {
        "load_seconds": load_s,
        "ttft_seconds": ttft,
        "decode_tokens_per_s": (n - 1) / (total - ttft) if n > 1 else 0.0,
        "tokens": n,
        "peak_rss_bytes": peak_rss_bytes(),
        "storage_read_bytes": _read_bytes() - io_before,
        "expert_bytes_read": s["bytes_read"],
        "cache_hit_rate": s["cache_hit_rate"],
        "direct_io": s["direct_io"],
        "stats": s,
    }


def _read_bytes() -> int:
    """Bytes this process has read from storage so far (the kernel's own count)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _supported_options() -> list[str]:
    import inspect

    from .model import Model

    return [p for p in inspect.signature(Model.__init__).parameters if p not in ("self", "path", "memory_budget")]


# -- the comparison -----------------------------------------------------------------
def measure(model_dir: Path, mode: str, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    from edgemoe.devices.limits import drop_page_cache

    spec = {"model": str(model_dir), "mode": mode, "budget": budget, "seed": args.seed,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens,
            "options": MODE_OPTIONS[mode], "supported": _supported_options()}
    runs = []
    for _ in range(args.repeat):
        drop_page_cache(model_dir)
        r = subprocess.run([sys.executable, "-m", "edgemoe.bench", "--worker", json.dumps(spec)],
                           capture_output=True, text=True, cwd="/")  # import the installed package
        if r.returncode != 0:
            raise RuntimeError(f"bench worker failed ({mode}, budget {budget}):\n{r.stderr[-3000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = sorted(runs, key=lambda x: x["decode_tokens_per_s"])[len(runs) // 2]  # the median run
    best["decode_tokens_per_s_all"] = [x["decode_tokens_per_s"] for x in runs]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgemoe bench", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="default,mixtral-shaped",
                    help="comma list: default, mixtral-shaped, or model directories")
    ap.add_argument("--bits", type=int, default=4, help="bitwidth the bench models are converted at (default 4)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--budgets", default="25,50,75", help="expert budgets in %% of the expert bytes")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="where generated bench models go (default: the edgemoe cache)")
    ap.add_argument("--json", dest="json_out", default=None, help="write all results to this file")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from .default import cache_root
    from .model import load

    cache = Path(args.cache) if args.cache else cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        model_dir = prepare(name, cache, args.bits)
        m = load(model_dir)
        expert_bytes = m.info()["expert_bytes"]
        print(f"\n## {name}: {m.info()['layers']} layers, {m.info()['experts_per_layer']} experts, "
              f"experts {expert_bytes / 1e6:.1f} MB, backbone {m.backbone_bytes / 1e6:.1f} MB, "
              f"minimum budget {m.min_budget / 1e6:.2f} MB\n")
        print("| mode | budget | decode tok/s | TTFT s | peak RSS MB | expert MB read | hit rate |")
        print("|---|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            budgets = [0] if mode == "ram" else [m.min_budget] if mode == "ondemand" else \
                [max(m.min_budget, expert_bytes * int(p) // 100) for p in args.budgets.split(",")]
            for budget in budgets:
                r = measure(model_dir, mode, budget, args)
                label = "all" if mode == "ram" else f"{100 * budget / expert_bytes:.0f}%"
                print(f"| {mode} | {label} | {r['decode_tokens_per_s']:.1f} | {r['ttft_seconds']:.3f} | "
                      f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['expert_bytes_read'] / 1e6:.1f} | "
                      f"{100 * r['cache_hit_rate']:.1f}% |", flush=True)
                results.append(dict(r, model=name, mode=mode, budget=budget, expert_bytes=expert_bytes))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
