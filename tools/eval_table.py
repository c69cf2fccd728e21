"""The table of docs/benchmarks/bitwidths.md: every bitwidth setting of a checkpoint, with and
without the low-bit fallback, measured the same way.

    python tools/eval_table.py                       # the default model, its test.txt and calib.txt
    python tools/eval_table.py --src HF_CKPT --test test.txt --calib calib.txt --work /tmp/evt

Settings: 16, 8, 4, 3, 2 bits uniform, and `--bits auto` at 1%, 2% and 5% tolerance
(importance profiled once on calib.txt's first --calib-tokens and shared; each candidate
verified on the calib.txt documents after them, as `edgemoe convert` does). Every conversion also
carries 2-bit fallback copies (--fallback-bits 2; experts.bin is byte-identical to a
conversion without them), so the "+ fallback" row is the same directory loaded with
fallback=0.3. Per row:

- expert bytes: the experts file's blob bytes, and as a share of the 16-bit experts';
- test ppl: `edgemoe.evaluate.perplexity` on the whole test text, windows of 256 tokens
  (prefill; no fallback: with many tokens per call the fallback rule rarely applies);
- decode ppl @50%: the same windows fed one token at a time (decode), expert budget 50% of
  the setting's expert bytes, on the first --decode-ppl-tokens tokens; with and without
  fallback, so the fallback's cost is the difference on the same tokens;
- decode tokens/s @50%: greedy generation of --decode-tokens tokens after a prompt from the
  test text, budget 50% of the setting's expert bytes, O_DIRECT reads from this machine's
  disk (files dropped from the page cache), LRU, no prefetch; timed under the exclusive CPU
  lock (edgemoe-cpu.lock in the temporary directory), median of --repeats runs; optionally again with a device
  profile's storage emulated (--device).

Writes eval_table.json and eval_table.md into --work (and prints the markdown; for the auto
rows also their held-out calibration increase, its upper confidence bound on the mean and the
prediction bound for one text that --tolerance is held to, beside the test split's).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT / "edgemoe" / "default_model"
LOCK = os.path.join(tempfile.gettempdir(), "edgemoe-cpu.lock")
UNIFORM = (16, 8, 4, 3, 2)
TOLERANCES = (0.01, 0.02, 0.05)
SUBDIRS = {**{f"{b}-bit": f"u{b}" for b in UNIFORM}, **{f"auto {t:.0%}": f"auto{round(t * 100)}" for t in TOLERANCES}}


@contextlib.contextmanager
def cpu_lock(exclusive: bool) -> Iterator[None]:
    """The shared machine's CPU lock: exclusive for timing, shared for everything else."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- conversions ----------------------------------------------------------------------
def convert_all(
    src: Path, work: Path, calib: Path, fallback_bits: int, calib_tokens: int, measure: str
) -> dict[str, Path]:
    from edgemoe.converters.convert import convert
    from edgemoe.planning.allocate import convert_auto
    from edgemoe.planning.importance import IMPORTANCE_FILE, profile_importance

    out: dict[str, Path] = {}
    for b in UNIFORM:
        d = work / f"u{b}"
        if not (d / "manifest.json").exists():
            say(f"converting {b}-bit uniform")
            with cpu_lock(False):
                convert(
                    src,
                    d,
                    bits=b,
                    fallback_bits=fallback_bits if b > fallback_bits else None,
                    progress=False,
                    overwrite=True,
                )
        out[f"{b}-bit"] = d
    imp = work / "u16" / IMPORTANCE_FILE
    if not imp.exists():
        say(f"profiling expert importance on {calib} ({calib_tokens} tokens)")
        with cpu_lock(False):
            profile_importance(work / "u16", calib, 2, max_tokens=calib_tokens, save=True, log=sys.stderr)
    for tol in TOLERANCES:
        d = work / f"auto{round(tol * 100)}"
        if not (d / "manifest.json").exists():
            say(f"converting --bits auto --tolerance {tol:.0%} ({measure})")
            with cpu_lock(False):
                convert_auto(
                    src,
                    d,
                    calib=calib,
                    tolerance=tol,
                    importance=imp,
                    fallback_bits=fallback_bits,
                    max_tokens=calib_tokens,
                    measure=measure,
                    overwrite=True,
                    progress=False,
                    log=sys.stderr,
                )
        out[f"auto {tol:.0%}"] = d
    return out


# -- measurements ---------------------------------------------------------------------
def decode_nll(model, ids: np.ndarray, window: int) -> tuple[float, int]:
    """Summed NLL and scored tokens of non-overlapping windows fed one token at a time."""
    from edgemoe.planning.evaluate import token_nll, windows

    total, n = 0.0, 0
    for begin, end, scored in windows(len(ids), window):
        chunk = ids[begin:end]
        model.reset()
        rows = [model.net.forward(np.array([t]), model.kv, pos, all_logits=True)[0] for pos, t in enumerate(chunk[:-1])]
        logits = np.stack(rows)
        total += float(token_nll(logits[len(chunk) - 1 - scored :], chunk[len(chunk) - scored :]).sum())
        n += scored
    return total, n


def expert_bytes(model_dir: Path) -> tuple[int, int]:
    m = json.loads((model_dir / "manifest.json").read_text())
    fb = m.get("fallback")
    return (sum(b[3] for b in m["experts"]["blobs"]), sum(b[3] for b in fb["blobs"]) if fb else 0)


def decode_speed(
    model_dir: Path,
    prompt: list[int],
    n: int,
    budget: int,
    fallback: bool,
    threshold: float,
    repeats: int,
    device: str | None,
) -> dict[str, Any]:
    import edgemoe

    runs = []
    for seed in range(repeats):
        m = edgemoe.load(model_dir, memory_budget=budget, fallback=threshold if fallback else None, device=device)
        m.store.drop_page_cache()
        if m.fallback_store is not None:
            m.fallback_store.drop_page_cache()
        m.eos_ids = set()  # always n tokens
        # sampled as `edgemoe run` does (greedy decoding of a small model soon loops over a few
        # tokens and their experts, which flatters any cache)
        it = m.generate(prompt, max_new_tokens=n, stream=True, temperature=0.8, top_p=0.95, seed=seed)
        next(it)  # the prefill
        m.reset_stats()  # decode only from here
        rest = list(it)
        s = m.stats()
        steps = max(s["tokens_generated"], 1)
        runs.append(
            {
                "tokens_per_s": s["decode_tokens_per_s"],
                "hit_rate": s["cache_hit_rate"],
                "bytes_read_per_token": s["bytes_read"] / steps,
                "fallback_uses_per_token": s["fallback"]["uses"] / steps if fallback else 0.0,
                "tokens": len(rest) + 1,
            }
        )
    best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return {**best, "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def measure(name: str, d: Path, args, test_ids: np.ndarray, bytes16: int) -> dict[str, Any]:
    import edgemoe
    from edgemoe.planning.evaluate import perplexity

    eb, fb = expert_bytes(d)
    row: dict[str, Any] = {
        "setting": name,
        "dir": str(d),
        "expert_bytes": eb,
        "expert_ratio": eb / bytes16,
        "fallback_bytes": fb,
    }
    m = json.loads((d / "manifest.json").read_text())
    alloc = m["quantization"].get("allocation")
    if alloc:
        row["experts_per_bits"] = alloc["experts_per_bits"]
        c = alloc.get("calibration") or {}
        row["calibration_ppl_increase"] = c.get("ppl_increase")  # held-out calibration documents
        row["calibration_ppl_increase_bound"] = c.get("ppl_increase_bound")  # on the mean
        row["calibration_ppl_increase_prediction_bound"] = c.get("ppl_increase_prediction_bound")  # what is accepted
        row["calibration_promise_tokens"] = c.get("promise_tokens")
        row["calibration_confidence"] = c.get("candidate_confidence", c.get("confidence"))  # per candidate
        row["calibration_held_out_tokens"] = c.get("held_out_tokens")
    say(f"{name}: test perplexity")
    with cpu_lock(False):
        r = perplexity(edgemoe.load(d), test_ids, window=args.window)
    row.update(test_ppl=r["ppl"], test_nll=r["nll"], test_tokens=r["tokens"])
    budget = int(0.5 * eb)
    row["budget"] = budget
    ids = test_ids[: args.decode_ppl_tokens] if args.decode_ppl_tokens else test_ids
    variants = [False] + ([True] if fb else [])
    for fallback in variants:
        key = "fallback" if fallback else "plain"
        if args.decode_ppl_tokens != 0:
            say(f"{name}: decode perplexity at 50% budget ({key})")
            with cpu_lock(False):
                mm = edgemoe.load(d, memory_budget=budget, fallback=args.threshold if fallback else None)
                nll, n = decode_nll(mm, ids, args.window)
            st = mm.stats()
            row[f"decode_ppl_{key}"] = math.exp(nll / n)
            row["decode_ppl_tokens"] = n
            if fallback:
                row["fallback_share"] = st["fallback"]["uses"] / max(st["cache_hits"] + st["cache_misses"], 1)
                row["fallback_bytes_saved"] = st["fallback"]["bytes_saved"]
    return row


def measure_speed(name: str, d: Path, args, test_ids: np.ndarray) -> dict[str, Any]:
    """Decode speed at 50% budget, with and without fallback, under one hold of the exclusive lock."""
    eb, fb = expert_bytes(d)
    budget = int(0.5 * eb)
    prompt = test_ids[args.prompt_offset : args.prompt_offset + args.prompt_tokens].tolist()
    out: dict[str, Any] = {"budget": budget}
    with cpu_lock(True):  # one hold per setting (a few runs of a few seconds each)
        for fallback in [False] + ([True] if fb else []):
            key = "fallback" if fallback else "plain"
            say(f"{name}: decode speed at 50% budget ({key})")
            out[f"speed_{key}"] = decode_speed(
                d, prompt, args.decode_tokens, budget, fallback, args.threshold, args.repeats, None
            )
            if args.device:
                out[f"speed_{key}_{args.device}"] = decode_speed(
                    d, prompt, args.decode_tokens, budget, fallback, args.threshold, args.repeats, args.device
                )
    return out


def threshold_sweep(name: str, d: Path, args, test_ids: np.ndarray) -> list[dict[str, Any]]:
    """Decode perplexity and expert bytes read per token at 50% budget for several thresholds."""
    import edgemoe

    budget = int(0.5 * expert_bytes(d)[0])
    ids = test_ids[: args.decode_ppl_tokens]
    out = []
    for t in [0.0] + [float(x) for x in args.thresholds.split(",")]:
        say(f"{name}: threshold {t:g}")
        with cpu_lock(False):
            m = edgemoe.load(d, memory_budget=budget, fallback=t if t > 0 else None)
            nll, n = decode_nll(m, ids, args.window)
        s = m.stats()
        out.append(
            {
                "threshold": t,
                "decode_ppl": math.exp(nll / n),
                "tokens": n,
                "bytes_read_per_token": s["bytes_read"] / n,
                "hit_rate": s["cache_hit_rate"],
                "fallback_share": s["fallback"]["uses"] / max(s["cache_hits"] + s["cache_misses"], 1) if t > 0 else 0.0,
            }
        )
    return out


def sweep_markdown(name: str, rows: list[dict[str, Any]], args) -> str:
    base = rows[0]
    lines = [
        f"| {name}, threshold | decode ppl @50% | vs no fallback | expert bytes read / token | uses low-bit |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['threshold']:g} | {r['decode_ppl']:.3f} | {100 * (r['decode_ppl'] / base['decode_ppl'] - 1):+.2f}% "
            f"| {r['bytes_read_per_token'] / 1e3:.0f} KB ({100 * (r['bytes_read_per_token'] / base['bytes_read_per_token'] - 1):+.0f}%) "
            f"| {100 * r['fallback_share']:.0f}% |"
        )
    return "\n".join(lines)


# -- output ---------------------------------------------------------------------------
def markdown(rows: list[dict[str, Any]], args, ref_ppl: float) -> str:
    dev = f" | tok/s @50%, {args.device}" if args.device else ""
    lines = [
        f"| setting | expert bytes | vs 16-bit | test ppl | vs 16-bit | decode ppl @50% | tok/s @50%{dev} "
        f"| read/token, hit rate @50% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if args.device else "") + " ---: |",
    ]
    for r in rows:
        for key in ("plain", "fallback"):
            if key == "fallback" and not r["fallback_bytes"]:
                continue
            fb = key == "fallback"
            name = r["setting"] + (f" + {args.fallback_bits}-bit fallback @{args.threshold:g}" if fb else "")
            eb = f"{r['expert_bytes'] / 1e6:.2f} MB" + (f" + {r['fallback_bytes'] / 1e6:.2f}" if fb else "")
            ppl = f"{r['test_ppl']:.3f}" if not fb else "(as above)"
            inc = f"{100 * (r['test_ppl'] / ref_ppl - 1):+.2f}%" if not fb else ""
            dppl = r.get(f"decode_ppl_{key}")
            dcell = "" if dppl is None else f"{dppl:.3f}"
            if fb and dppl is not None and r.get("decode_ppl_plain"):
                dcell += f" ({100 * (dppl / r['decode_ppl_plain'] - 1):+.2f}%, {100 * r['fallback_share']:.0f}% of uses low-bit)"
            sp = r.get(f"speed_{key}")
            dv = r.get(f"speed_{key}_{args.device}")
            devcell = (f" | {dv['tokens_per_s']:.1f}" if dv else " | ") if args.device else ""
            speed = f"{sp['tokens_per_s']:.1f}" if sp else ""
            read = f"{sp['bytes_read_per_token'] / 1e3:.0f} KB, {100 * sp['hit_rate']:.0f}% hits" if sp else ""
            lines.append(
                f"| {name} | {eb} | {100 * r['expert_ratio']:.1f}% | {ppl} | {inc} | {dcell} | "
                f"{speed}{devcell} | {read} |"
            )
    return "\n".join(lines)


def auto_markdown(rows: list[dict[str, Any]], ref_ppl: float) -> str:
    """The auto rows' verification: held-out calibration point estimate, its upper confidence bound
    (on the mean) and prediction bound (for one text of promise_tokens; what --tolerance is held
    to) beside the test split."""
    lines = [
        "| setting | expert bytes | held-out calibration ppl | confidence bound (mean) | prediction bound "
        "(accepted on) | test ppl |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("calibration_ppl_increase_bound") is None:
            continue
        pred = r.get("calibration_ppl_increase_prediction_bound")
        promise = r.get("calibration_promise_tokens")
        pcell = f"{100 * pred:+.2f}% ({f'{promise}-token text' if promise else 'the mean'})" if pred is not None else ""
        lines.append(
            f"| {r['setting']} | {100 * r['expert_ratio']:.1f}% | {100 * r['calibration_ppl_increase']:+.2f}% "
            f"({r['calibration_held_out_tokens']} tokens) | {100 * r['calibration_ppl_increase_bound']:+.2f}% "
            f"({100 * r['calibration_confidence']:.3g}%) | {pcell} | {100 * (r['test_ppl'] / ref_ppl - 1):+.2f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="Hugging Face checkpoint (default: the default model)")
    p.add_argument("--test", type=Path, default=None, help="test text (default: SRC/test.txt)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: SRC/calib.txt)")
    p.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "edgemoe-eval-table",
        help="conversions and results (reused when present)",
    )
    p.add_argument("--fallback-bits", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.3, help="fallback gate-weight threshold")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument(
        "--measure",
        choices=("kl", "loss_increase"),
        default="kl",
        help="what --bits auto ranks experts by (use another --work for each)",
    )
    p.add_argument(
        "--decode-ppl-tokens",
        type=int,
        default=4096,
        help="tokens of the test text scored in decode mode at 50%% budget (0: skip; default 4096)",
    )
    p.add_argument("--decode-tokens", type=int, default=256, help="generated tokens per speed run")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prompt-offset", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="also time with this device profile's storage emulated")
    p.add_argument("--sweep", default=None, help="phase sweep: the setting whose fallback threshold is swept")
    p.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5", help="phase sweep: thresholds")
    p.add_argument(
        "--phase",
        choices=("all", "quality", "speed", "report", "sweep"),
        default="all",
        help="quality: conversions and perplexities (shared CPU lock); speed: decode timing "
        "(exclusive lock); report: the table from what --work holds",
    )
    p.add_argument("--only", default=None, help="comma-separated settings to (re)measure, e.g. '4-bit,auto 2%%'")
    args = p.parse_args(argv)
    test = args.test or args.src / "test.txt"
    calib = args.calib or args.src / "calib.txt"
    args.work.mkdir(parents=True, exist_ok=True)

    import edgemoe
    from edgemoe.planning.evaluate import encode_documents, read_text

    if args.phase in ("all", "quality"):
        dirs = convert_all(args.src, args.work, calib, args.fallback_bits, args.calib_tokens, args.measure)
    else:
        dirs = {name: args.work / sub for name, sub in SUBDIRS.items() if (args.work / sub / "manifest.json").exists()}
    test_ids = encode_documents(edgemoe.load(dirs["16-bit"]), read_text(test))
    bytes16 = expert_bytes(dirs["16-bit"])[0]
    only = set(args.only.split(",")) if args.only else None
    quality, speed = args.work / "eval_table.json", args.work / "speed.json"
    rows = {r["setting"]: r for r in json.loads(quality.read_text())["rows"]} if quality.exists() else {}
    speeds = json.loads(speed.read_text()) if speed.exists() else {}
    if args.phase in ("all", "quality"):  # shared lock, long
        for name, d in dirs.items():
            if only is None or name in only:
                rows[name] = measure(name, d, args, test_ids, bytes16)
                quality.write_text(json.dumps({"rows": list(rows.values())}, indent=1))  # progress
    if args.phase == "sweep":
        name = args.sweep or "4-bit"
        sw = threshold_sweep(name, dirs[name], args, test_ids)
        (args.work / f"sweep-{name.replace(' ', '')}.json").write_text(json.dumps(sw, indent=1))
        md = sweep_markdown(name, sw, args)
        (args.work / f"sweep-{name.replace(' ', '')}.md").write_text(md + "\n")
        print(md)
        return 0
    if args.phase in ("all", "speed"):  # exclusive lock, one hold per setting
        for name, d in dirs.items():
            if only is None or name in only:
                speeds[name] = measure_speed(name, d, args, test_ids)
                speed.write_text(json.dumps(speeds, indent=1))
    order = [n for n in SUBDIRS if n in rows]
    merged = [{**rows[n], **speeds.get(n, {})} for n in order]
    ref_ppl = rows["16-bit"]["test_ppl"]
    doc = {
        "src": str(args.src),
        "test": str(test),
        "test_tokens": int(len(test_ids)),
        "calib": str(calib),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "simd": edgemoe._core.simd(),
        "rows": merged,
    }
    (args.work / "eval_table_full.json").write_text(json.dumps(doc, indent=1))
    md = markdown(merged, args, ref_ppl) + "\n\n" + auto_markdown(merged, ref_ppl)
    (args.work / "eval_table.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
