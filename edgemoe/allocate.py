"""Per-expert bitwidths from measured importance (EdgeMoE's expert-wise bitwidth
adaptation): `edgemoe convert SRC -o DST --bits auto --tolerance 2%` or `--expert-bytes 35%`.

    manifest = convert_auto("hf-ckpt", "model-auto", calib="calib.txt", tolerance=0.02)

The cost model. importance.json measures, per expert, the calibration loss
increase dL_low when that expert alone drops to the low bitwidth (2 bits), and
the expert's output error E_b (on its own routed inputs, gate-weighted) at 2, 3,
4 and 8 bits. For a bitwidth that was not measured, dL_b = dL_low * E_b / E_low:
for small perturbations the loss rises with the square of the output
perturbation, and E_b is that square's expectation on the tokens the expert
actually sees (for uniform rounding noise E_b / E_2 is about (3 / (2^b - 1))^2:
0.18 at 3 bits, 0.04 at 4, 1e-4 at 8). Increases add up across experts (the
same first-order assumption EdgeMoE makes); the verification below measures
what the assumption misses.

The choice. Per expert, the options (bitwidth, blob bytes, dL) are reduced to
their lower convex hull from the highest bitwidth down, so every step down
saves bytes at a loss-per-byte that never decreases. All steps of all experts
are taken in order of loss per byte saved: the first n steps give an
allocation for every n, from all-high (n = 0) to all-low. --tolerance takes the
longest prefix whose summed dL fits log(1 + tolerance); --expert-bytes the
shortest whose bytes fit. The most important experts (largest loss per byte)
are demoted last.

Verification (--tolerance). The candidate is written and its perplexity
measured on the calibration text; if it is above the tolerance, steps are
taken back (the last steps: the most important demoted experts get their bits
back) with the estimate rescaled by measured / estimated, and measured again;
if it is well below, more steps are taken the same way. The model that is kept
has met the tolerance as measured.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import quant
from .errors import EdgeMoEError
from .importance import IMPORTANCE_FILE, file_digest, load_importance, profile_importance, save_importance

CHOICES = (8, 4, 3, 2)
ALL_BITS = (16, 8, 4, 3, 2)


def blob_nbytes(hidden: int, intermediate: int, bits: int, group_size: int = 64, symmetric: bool = False,
                float_dtype: str = "bf16") -> int:
    """Exact byte length of one expert blob (gate/up [I, H], down [H, I]) at `bits`, as the converter writes it."""
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    if bits == 16:
        mats = [quant.float_matrix(np.zeros(s, np.float32), float_dtype) for s in shapes]
    else:
        mats = [quant.quantize_matrix(np.zeros(s, np.float32), bits, group_size, symmetric) for s in shapes]
    return int(quant.pack_expert_blob(0, 0, *mats).nbytes)


MEASURES = ("kl", "loss_increase")


def estimate_loss(doc: dict[str, Any], choices: Sequence[int], measure: str = "kl") -> dict[int, np.ndarray]:
    """dL per bitwidth [moe layers, experts]: measured where importance.json has it (clipped at 0),
    else the nearest measured bitwidth's dL scaled by the output-error ratio; 0 at 16 bits.
    measure: "kl" (the expected increase, low noise) or "loss_increase" (the measured NLL increase)."""
    if measure not in MEASURES:
        raise EdgeMoEError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if measure not in doc:
        raise EdgeMoEError(f"the importance profile has no '{measure}' table: profile the model again")
    measured = {int(b): np.maximum(np.asarray(v, np.float64), 0.0) for b, v in doc[measure].items()}
    err = {int(b): np.asarray(v, np.float64) for b, v in doc["output_error"].items()}
    out = {}
    for b in choices:
        if b == 16:
            out[b] = np.zeros_like(next(iter(measured.values())))
        elif b in measured:
            out[b] = measured[b]
        else:
            if b not in err:
                raise EdgeMoEError(f"importance.json has no output error at {b} bits to estimate its loss from")
            b0 = min(measured, key=lambda m: (abs(m - b), m))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(err[b0] > 0, err[b] / err[b0], 0.0)
            out[b] = measured[b0] * ratio
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    """Expert e of MoE layer m goes from `src` to `dst` bits."""
    m: int
    e: int
    src: int
    dst: int
    saved: int          # bytes
    added: float        # estimated nats per token
    order: tuple        # sort key: loss per byte, then output error per byte, then position


class Allocation:
    """The greedy order of bitwidth steps over all experts; prefix n is one allocation."""

    def __init__(self, loss: dict[int, np.ndarray], sizes: dict[int, int], error: dict[int, np.ndarray] | None = None):
        self.choices = sorted(loss, reverse=True)
        self.top = self.choices[0]
        self.sizes = sizes
        self.shape = loss[self.top].shape
        M, E = self.shape
        steps = []
        for m in range(M):
            for e in range(E):
                cur, k = self.top, 0
                while True:  # lower convex hull of (bytes, loss), walked from the top bitwidth down
                    cands = [b for b in self.choices if sizes[b] < sizes[cur]]
                    if not cands:
                        break
                    slope = {b: (loss[b][m, e] - loss[cur][m, e]) / (sizes[cur] - sizes[b]) for b in cands}
                    nxt = min(cands, key=lambda b: (slope[b], -sizes[b]))
                    tie = 0.0
                    if error is not None and nxt in error and cur in error:
                        tie = (error[nxt][m, e] - error[cur][m, e]) / (sizes[cur] - sizes[nxt])
                    elif error is not None and nxt in error:
                        tie = error[nxt][m, e] / (sizes[cur] - sizes[nxt])
                    steps.append(Step(m, e, cur, nxt, sizes[cur] - sizes[nxt], float(loss[nxt][m, e] - loss[cur][m, e]),
                                      (float(slope[nxt]), float(tie), k, m, e)))
                    cur, k = nxt, k + 1
        self.steps = sorted(steps, key=lambda s: s.order)
        # estimated loss of each prefix, counting what the top bitwidth itself costs (0 at 16 bits)
        self.cum_loss = float(loss[self.top].sum()) + np.concatenate([[0.0], np.cumsum([s.added for s in self.steps])])
        self.cum_saved = np.concatenate([[0], np.cumsum([s.saved for s in self.steps])]).astype(np.int64)
        self.top_bytes = M * E * sizes[self.top]

    def __len__(self) -> int:
        return len(self.steps)

    def bits(self, n: int) -> np.ndarray:
        """Bitwidths [moe layers, experts] after the first n steps."""
        out = np.full(self.shape, self.top, np.int64)
        for s in self.steps[:n]:
            out[s.m, s.e] = s.dst
        return out

    def loss(self, n: int) -> float:
        return float(self.cum_loss[n])

    def nbytes(self, n: int) -> int:
        return int(self.top_bytes - self.cum_saved[n])

    def prefix_for_loss(self, budget: float) -> int:
        """The most steps whose estimated loss stays within budget."""
        ok = np.flatnonzero(self.cum_loss <= budget + 1e-15)
        return int(ok[-1]) if ok.size else 0

    def prefix_for_bytes(self, target: int) -> int | None:
        """The fewest steps whose bytes fit target (None: not even every expert at its lowest bitwidth)."""
        ok = np.flatnonzero(self.top_bytes - self.cum_saved <= target)
        return int(ok[0]) if ok.size else None


def allocation_from_importance(doc: dict[str, Any], hidden: int, intermediate: int, choices: Sequence[int] = CHOICES,
                               group_size: int = 64, symmetric: bool = False, measure: str = "kl") -> Allocation:
    choices = sorted({int(b) for b in choices}, reverse=True)
    bad = [b for b in choices if b not in ALL_BITS]
    if bad or not choices:
        raise EdgeMoEError(f"bit choices must come from {', '.join(map(str, ALL_BITS))}, got {choices}")
    sizes = {b: blob_nbytes(hidden, intermediate, b, group_size, symmetric) for b in choices}
    error = {int(b): np.asarray(v, np.float64) for b, v in doc.get("output_error", {}).items()}
    return Allocation(estimate_loss(doc, choices, measure), sizes, error)


def bits_map(alloc: Allocation, n: int, moe_layers: Sequence[int]) -> dict[tuple[int, int], int]:
    b = alloc.bits(n)
    return {(int(layer), e): int(b[m, e]) for m, layer in enumerate(moe_layers) for e in range(b.shape[1])}


def parse_fraction(value: str | float | None) -> float | None:
    """'2%' -> 0.02, '0.02' -> 0.02, 2 -> 0.02 (a number above 1 is read as percent)."""
    if value is None:
        return None
    s = str(value).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise EdgeMoEError(f"cannot read {value!r} as a fraction: write 2% or 0.02") from None
    if not s.endswith("%") and v > 1:
        v /= 100
    if not 0 < v:
        raise EdgeMoEError(f"a tolerance or byte share must be positive, got {value!r}")
    return v


def _baseline_usable(doc: dict[str, Any], calib: str | Path | None, window: int, max_tokens: int | None) -> bool:
    """True when importance.json's calibration loss is the 16-bit model's on this very text and windows."""
    c, ref = doc.get("calibration", {}), doc.get("reference", {})
    return (calib is not None and ref.get("expert_bits") == [16] and ref.get("backbone_bits") == 16
            and c.get("window") == window and c.get("max_tokens") == max_tokens
            and c.get("sha256") == file_digest(calib))


def convert_auto(src: str | Path, dst: str | Path, calib: str | Path | None = None, tolerance: float | None = None,
                 expert_bytes: float | None = None, importance: str | Path | None = None,
                 choices: Sequence[int] = CHOICES, group_size: int = 64, symmetric: bool = False,
                 backbone_bits: int | None = None, low_bits: int = 2, window: int = 256,
                 max_tokens: int | None = 8192, max_rounds: int = 6, measure: str = "kl",
                 fallback_bits: int | None = None, overwrite: bool = False, progress: bool = True,
                 log: Any = None) -> dict[str, Any]:
    """Convert `src` with a bitwidth per expert chosen from its importance; returns the manifest.

    tolerance: allowed calibration perplexity increase over the 16-bit model (0.02 = 2%),
    verified by measurement. expert_bytes: total expert bytes as a share of the 16-bit
    experts' (0.35 = 35%), the lowest estimated loss that fits. Exactly one of them.
    importance: an importance.json (file or model directory) measured on this
    checkpoint; without one, a temporary 16-bit conversion is profiled on `calib`.
    fallback_bits: also write low-bit fallback copies of the chosen model (converters.convert.add_fallback).
    """
    from .converters.convert import _check_destination, _check_fallback_bits, _move_into_place, add_fallback, convert
    from .converters.hf import Checkpoint, plan_conversion
    from .evaluate import perplexity
    from .manifest import load_manifest, write_manifest
    from .model import load

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    if (tolerance is None) == (expert_bytes is None):
        raise EdgeMoEError("--bits auto needs exactly one target: --tolerance (e.g. 2%) or --expert-bytes (e.g. 35%)")
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, overwrite)
    _check_fallback_bits(fallback_bits)
    plan = plan_conversion(Checkpoint(src))
    doc = load_importance(importance) if importance is not None else None
    if calib is None and (doc is None or tolerance is not None):
        raise EdgeMoEError("--bits auto needs calibration text: pass --calib FILE" +
                           ("" if doc is None else " (the tolerance is verified by measuring perplexity on it)"))
    if doc is not None and (doc["moe_layers"] != list(plan.moe_layers) or doc["num_experts"] != plan.num_experts):
        raise EdgeMoEError(f"{importance} profiles MoE layers {doc['moe_layers']} x {doc['num_experts']} experts, but "
                           f"{src} has {list(plan.moe_layers)} x {plan.num_experts}: profile this checkpoint instead")
    if doc is not None and (doc.get("group_size") != group_size or bool(doc.get("symmetric")) != bool(symmetric)):
        say(f"note: {importance} was measured with group size {doc.get('group_size')}, symmetric "
            f"{doc.get('symmetric')}; converting with group size {group_size}, symmetric {symmetric}")

    t0 = time.monotonic()
    work = dst.parent / f".{dst.name}.auto-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        ref_nll = None
        need_ref = doc is None or (tolerance is not None and not _baseline_usable(doc, calib, window, max_tokens))
        if need_ref:
            ref = work / "ref16"
            say("converting a 16-bit reference ...")
            convert(src, ref, bits=16, backbone_bits=16, progress=progress)
            if doc is None:
                say(f"profiling expert importance on {calib} ...")
                doc = profile_importance(ref, calib, low_bits, group_size=group_size, symmetric=symmetric,
                                         window=window, max_tokens=max_tokens, save=False, log=log)
                ref_nll = doc["calibration"]["nll"]
            else:
                ref_nll = perplexity(load(ref), Path(calib), window=window, max_tokens=max_tokens)["nll"]
            shutil.rmtree(ref)
        elif _baseline_usable(doc, calib, window, max_tokens):
            ref_nll = doc["calibration"]["nll"]

        alloc = allocation_from_importance(doc, plan.hidden, plan.intermediate, choices, group_size, symmetric,
                                           measure)
        bytes16 = len(plan.moe_layers) * plan.num_experts * blob_nbytes(plan.hidden, plan.intermediate, 16)
        rounds: list[dict[str, Any]] = []

        def candidate(n: int) -> tuple[Path, float | None]:
            d = work / f"candidate-{len(rounds)}"
            convert(src, d, bits="auto", bits_map=bits_map(alloc, n, plan.moe_layers), group_size=group_size,
                    symmetric=symmetric, backbone_bits=backbone_bits, progress=False)
            nll = None
            if calib is not None:
                nll = perplexity(load(d), Path(calib), window=window, max_tokens=max_tokens)["nll"]
            r = {"steps": n, "expert_bytes": alloc.nbytes(n), "estimated_nll_increase": alloc.loss(n),
                 "nll": nll}
            if ref_nll is not None and nll is not None:
                r["ppl_increase"] = math.exp(nll - ref_nll) - 1
            rounds.append(r)
            inc = f", calibration ppl {100 * r['ppl_increase']:+.2f}%" if "ppl_increase" in r else ""
            say(f"candidate {len(rounds)}: {n}/{len(alloc)} steps, experts {100 * alloc.nbytes(n) / bytes16:.1f}% of "
                f"16-bit, estimated {100 * math.expm1(alloc.loss(n)):+.2f}%{inc}")
            return d, nll

        if tolerance is not None:
            target = math.log1p(tolerance)
            n = alloc.prefix_for_loss(target)
            lo, hi, best = -1, len(alloc) + 1, None
            for _ in range(max_rounds):
                d, nll = candidate(n)
                inc = nll - ref_nll
                if inc <= target:
                    if best is not None:
                        shutil.rmtree(best[0])
                    lo, best = n, (d, len(rounds) - 1)
                    if inc >= 0.8 * target or n == len(alloc):
                        break
                else:
                    hi = n
                    shutil.rmtree(d)
                est = alloc.loss(n)
                want = est * target / inc if inc > 1e-12 and est > 0 else (est + target) * 2
                nxt = alloc.prefix_for_loss(want)
                if not lo < nxt < hi:  # the rescaled estimate points outside what is known: bisect
                    nxt = (lo + hi) // 2
                if not lo < nxt < hi:
                    break
                n = nxt
            if best is None:
                closest = min(rounds, key=lambda r: r["steps"])
                raise EdgeMoEError(
                    f"no allocation met the {100 * tolerance:g}% tolerance in {len(rounds)} tries (the one with "
                    f"the fewest low-bit experts gave {100 * closest['ppl_increase']:+.2f}%): raise --tolerance, "
                    f"keep the backbone at 16 bits (--backbone-bits 16), or allow 16-bit experts (--bits-choices)")
            chosen, chosen_round = best
        else:
            target_bytes = int(expert_bytes * bytes16)
            n = alloc.prefix_for_bytes(target_bytes)
            if n is None:
                low = alloc.nbytes(len(alloc))
                raise EdgeMoEError(f"even every expert at {min(alloc.choices)} bits takes {100 * low / bytes16:.1f}% "
                                   f"of the 16-bit expert bytes, above {100 * expert_bytes:g}%: raise --expert-bytes")
            chosen, _ = candidate(n)
            chosen_round = len(rounds) - 1

        r = rounds[chosen_round]
        if fallback_bits is not None:
            add_fallback(src, chosen, fallback_bits, progress=progress)
        manifest = load_manifest(chosen)
        counts = {str(b): int(c) for b, c in zip(*np.unique(alloc.bits(r["steps"]), return_counts=True))}
        record = {
            "mode": "tolerance" if tolerance is not None else "expert_bytes",
            "tolerance": tolerance, "expert_bytes": expert_bytes, "choices": alloc.choices, "measure": measure,
            "low_bits": sorted(int(b) for b in doc["loss_increase"]), "experts_per_bits": counts,
            "expert_bytes_ratio": r["expert_bytes"] / bytes16, "steps": r["steps"], "total_steps": len(alloc),
            "estimated_nll_increase": r["estimated_nll_increase"],
            "calibration": None if calib is None else {
                "file": str(calib), "window": window, "max_tokens": max_tokens, "nll_16bit": ref_nll,
                "nll": r["nll"], "ppl_increase": r.get("ppl_increase")},
            "rounds": rounds,
            "importance": IMPORTANCE_FILE,
            "seconds": round(time.monotonic() - t0, 1),
        }
        manifest["quantization"]["allocation"] = record
        write_manifest(chosen, manifest)
        save_importance(chosen, doc)
        _move_into_place(chosen, dst)
        return load_manifest(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_allocation(manifest: dict[str, Any]) -> str:
    """One paragraph on what --bits auto chose."""
    a = manifest["quantization"].get("allocation")
    if not a:
        return ""
    per = ", ".join(f"{n} at {b} bits" for b, n in sorted(a["experts_per_bits"].items(), key=lambda kv: -int(kv[0])))
    line = f"bits auto ({a['mode'].replace('_', ' ')}): {per}; experts {100 * a['expert_bytes_ratio']:.1f}% of 16-bit"
    c = a.get("calibration")
    if c and c.get("ppl_increase") is not None:
        line += f"; calibration perplexity {100 * c['ppl_increase']:+.2f}% vs 16-bit"
    return line + f" ({len(a['rounds'])} candidate(s), {a['seconds']:.0f}s)"


if __name__ == "__main__":
    sys.exit("use `edgemoe convert SRC -o DST --bits auto ...`")
