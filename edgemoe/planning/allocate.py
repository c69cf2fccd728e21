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

Verification (--tolerance). The importance profile and the check of its result
never share text: the profile sees the calibration text's first --calib-tokens
tokens (at most half of it) and a candidate is measured only on the documents
after them (up to --verify-tokens), so experts that happened to look cheap on
the profiled text are not also judged on it (the winner's curse;
docs/benchmarks/bitwidths.md has the default model's figures). What is measured is
the per-token NLL difference, candidate minus 16-bit reference, on the held-out
tokens. Its one-sided upper confidence bound (--confidence, 90%) is a percentile
bootstrap of sum(difference) / tokens that resamples whole documents (whole
windows when fewer than 10 documents are held out), since the tokens of one
document move together. That bounds the mean increase over unlimited text like
the calibration text; a user runs one finite text, whose own increase scatters
around that mean. The tolerance is promised for such a text of --promise-tokens
tokens (N_new; default: as many as were held out, n_held), so a candidate is
accepted only if the one-sided PREDICTION bound of the increase on that text is
within the tolerance: with the new text's error independent of the held-out
one's and its variance se^2 * n_held / N_new (same block structure, block
variance scaling as 1 / tokens), point + (bound - point) * sqrt(1 + n_held / N_new),
i.e. the confidence margin times sqrt(2) by default. --promise-tokens 0 (or inf)
gives the confidence bound on the mean. A candidate above the tolerance gives
steps back (the last steps: the most important demoted experts get their bits
back) with the estimate rescaled by bound / estimated, and is measured again;
one well below (bound under 80% of it) takes more steps the same way.

The search and the confidence. Up to --max-rounds candidates (6) are measured on
the same held-out text and the most compressed one that passes is kept. Were each
tested at 90%, the kept one would be the candidate whose held-out noise happened
to be most favourable among several that pass or nearly do, and its bound would
hold less often than 90% (at the default model's 2% the search tried four nested
candidates, the last three one or two steps apart, and kept the one just under the
line). So each
candidate is tested at 1 - (1 - confidence) / max_rounds (98.3% by default;
Bonferroni): the bounds of all candidates the search may try then hold together
with at least the stated confidence, and so does the kept one's, whichever the
search keeps. --expert-bytes measures one candidate and uses the confidence as
given. The manifest records the point estimate, both bounds (at the
per-candidate level), the standard error, both confidence levels and
promise_tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..converters.convert import add_fallback, check_destination, check_fallback_bits, convert, move_into_place
from ..converters.hf import Checkpoint, plan_conversion
from ..errors import EdgeMoEError
from ..format import quant
from ..format.manifest import load_manifest, write_manifest
from ..runtime.engine import load
from .evaluate import documents, read_text, token_nlls
from .importance import IMPORTANCE_FILE, file_digest, load_importance, profile_importance, save_importance

CHOICES = (8, 4, 3, 2)
ALL_BITS = (16, 8, 4, 3, 2)
CONFIDENCE = 0.9  # one-sided, of the held-out perplexity increase
VERIFY_TOKENS = 32768  # held-out calibration tokens a candidate is measured on
MIN_DOCUMENT_BLOCKS = 10  # fewer held-out documents than this: bootstrap windows instead
RESAMPLES = 2000


def blob_nbytes(
    hidden: int, intermediate: int, bits: int, group_size: int = 64, symmetric: bool = False, float_dtype: str = "bf16"
) -> int:
    """Exact byte length of one expert blob (gate/up [I, H], down [H, I]) at `bits`, as the converter writes it."""
    return quant.expert_nbytes(hidden, intermediate, bits, group_size, symmetric, float_dtype)


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
    saved: int  # bytes
    added: float  # estimated nats per token
    order: tuple  # sort key: loss per byte, then output error per byte, then position


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
                    steps.append(
                        Step(
                            m,
                            e,
                            cur,
                            nxt,
                            sizes[cur] - sizes[nxt],
                            float(loss[nxt][m, e] - loss[cur][m, e]),
                            (float(slope[nxt]), float(tie), k, m, e),
                        )
                    )
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


def allocation_from_importance(
    doc: dict[str, Any],
    hidden: int,
    intermediate: int,
    choices: Sequence[int] = CHOICES,
    group_size: int = 64,
    symmetric: bool = False,
    measure: str = "kl",
) -> Allocation:
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


@overload
def parse_fraction(value: None, zero_ok: bool = False) -> None: ...
@overload
def parse_fraction(value: str | float, zero_ok: bool = False) -> float: ...
def parse_fraction(value: str | float | None, zero_ok: bool = False) -> float | None:
    """'2%' -> 0.02, '0.02' -> 0.02, 2 -> 0.02 (a number above 1 is read as percent); 0 only
    with zero_ok (--confidence 0: the measured value itself)."""
    if value is None:
        return None
    s = str(value).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise EdgeMoEError(f"cannot read {value!r} as a fraction: write 2% or 0.02") from None
    if not s.endswith("%") and v > 1:
        v /= 100
    if zero_ok and not 0 <= v:
        raise EdgeMoEError(f"a confidence must be 0 or more (e.g. 90%), got {value!r}")
    if not zero_ok and not 0 < v:
        raise EdgeMoEError(f"a tolerance or byte share must be positive, got {value!r}")
    return v


def parse_tokens(value: str | float | None) -> float | None:
    """--promise-tokens: '50000' -> 50000.0, '0' or 'inf' -> 0.0 (the mean), None -> None (held-out size)."""
    if value is None:
        return None
    try:
        v = float(str(value).strip())
    except ValueError:
        v = math.nan
    if not v >= 0:
        raise EdgeMoEError(f"--promise-tokens takes a token count like 50000 (0 or inf: the mean), got {value!r}")
    return 0.0 if math.isinf(v) else v


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The part of the calibration text a candidate is verified on: whole documents after
    the tokens the importance profile saw (from `begin` in the calibration token stream)."""

    ids: np.ndarray  # token ids [N]
    doc: np.ndarray  # document index per token [N], 0 for the first held-out one
    begin: int  # position of ids[0] in the calibration token stream
    seen: int  # leading calibration tokens the profile used


def held_out(docs: Sequence[Sequence[int]], seen: int, limit: int | None = None) -> HeldOut:
    """The documents of `docs` (token ids each, in order) that start at or after token `seen`
    of their concatenation, at most `limit` tokens; from token `seen` itself when no document
    starts there (one long document)."""
    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    after = np.flatnonzero(starts >= seen)
    begin = int(starts[after[0]]) if after.size else int(seen)
    stream = np.concatenate([np.asarray(d, np.int64) for d in docs]) if len(docs) else np.zeros(0, np.int64)
    ids = stream[begin : begin + limit] if limit else stream[begin:]
    doc = np.searchsorted(starts, np.arange(begin, begin + len(ids)), side="right") - 1
    return HeldOut(ids, doc - (doc[0] if len(doc) else 0), begin, int(seen))


def profiled_tokens(doc: dict[str, Any] | None, calib: str | Path, total: int, max_tokens: int | None) -> int:
    """How many leading tokens of calib an importance profile saw: the one about to be made
    (max_tokens, at most half the text), or a given one's when it was made on this very file."""
    if doc is None:
        return min(max_tokens or total, total // 2)
    c = doc.get("calibration", {})
    if c.get("sha256") != file_digest(calib):
        return 0  # profiled on other text: all of calib is held out
    return min(c.get("max_tokens") or total, total)


def bound_increase(
    diff: np.ndarray, blocks: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean per-token NLL increase, its one-sided upper confidence bound and standard error:
    a percentile bootstrap of sum(diff) / tokens that resamples whole blocks (documents or
    windows, one id per token). confidence 0: the bound is the mean."""
    _, inv = np.unique(blocks, return_inverse=True)
    d_sum = np.bincount(inv, weights=np.asarray(diff, np.float64))
    n_tok = np.bincount(inv).astype(np.float64)
    point = float(d_sum.sum() / n_tok.sum())
    B = len(d_sum)
    if B < 2:
        raise EdgeMoEError("the held-out calibration text is one block: give more calibration text")
    counts = np.random.default_rng(seed).multinomial(B, np.full(B, 1.0 / B), size=resamples)  # [resamples, B]
    boot = (counts @ d_sum) / (counts @ n_tok)
    bound = max(point, float(np.quantile(boot, confidence))) if confidence > 0 else point
    return point, bound, float(boot.std(ddof=1))


def prediction_bound(point: float, bound: float, held_tokens: int, promise_tokens: float | None) -> float:
    """Upper bound of the increase on one new text of promise_tokens tokens drawn like the held-out
    text (held_tokens of it): the confidence margin widened by sqrt(1 + held / new), since the new
    text's mean scatters around the population mean with variance se^2 * held / new, independently
    of the held-out estimate. promise_tokens 0, None or inf: the confidence bound itself."""
    if not promise_tokens or math.isinf(promise_tokens):
        return bound
    if promise_tokens < 0 or held_tokens <= 0:
        raise EdgeMoEError(
            f"promise tokens must be positive (0: the mean), got {promise_tokens} with {held_tokens} held-out tokens"
        )
    return point + (bound - point) * math.sqrt(1.0 + held_tokens / promise_tokens)


def candidate_confidence(confidence: float, tolerance: float | None, max_rounds: int) -> float:
    """The level each candidate is tested at so that the kept one's bound holds with `confidence`
    (module docstring): 1 - (1 - confidence) / max_rounds for --tolerance, which tries up to
    max_rounds candidates on the same held-out text; the confidence itself for --expert-bytes
    (one candidate) and for confidence 0 (the measured value)."""
    if tolerance is None or confidence == 0:
        return confidence
    return 1.0 - (1.0 - confidence) / max_rounds


def convert_auto(
    src: str | Path,
    dst: str | Path,
    calib: str | Path | None = None,
    tolerance: float | None = None,
    expert_bytes: float | None = None,
    importance: str | Path | None = None,
    choices: Sequence[int] = CHOICES,
    group_size: int = 64,
    symmetric: bool = False,
    backbone_bits: int | None = None,
    low_bits: int = 2,
    window: int = 256,
    max_tokens: int | None = 8192,
    max_rounds: int = 6,
    measure: str = "kl",
    confidence: float = CONFIDENCE,
    verify_tokens: int | None = VERIFY_TOKENS,
    promise_tokens: float | None = None,
    fallback_bits: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Convert `src` with a bitwidth per expert chosen from its importance; returns the manifest.

    tolerance: allowed perplexity increase over the 16-bit model (0.02 = 2%) on a text of
    `promise_tokens` tokens like `calib` (None: as many as are held out; 0 or inf: the mean over
    unlimited text): the `confidence` upper prediction bound measured on calibration documents
    the importance profile has not seen (module docstring). expert_bytes: total expert bytes as
    a share of the 16-bit experts' (0.35 = 35%), the lowest estimated loss that fits (measured
    the same way, for the record). Exactly one of them. importance: an importance.json (file or model
    directory) measured on this checkpoint; without one, a temporary 16-bit conversion is
    profiled on the first `max_tokens` tokens of `calib` (at most half of it).
    verify_tokens: held-out tokens a candidate is measured on (None: all that are left).
    fallback_bits: also write low-bit fallback copies of the chosen model (converters.convert.add_fallback).
    """

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    if not 0 <= confidence < 1:
        raise EdgeMoEError(f"confidence must be at least 0 and below 1 (e.g. 0.9), got {confidence}")
    if max_rounds < 1:
        raise EdgeMoEError(f"max_rounds (--max-rounds) must be at least 1, got {max_rounds}")
    if promise_tokens is not None and not promise_tokens >= 0:
        raise EdgeMoEError(
            f"promise tokens must be a token count (0 or inf: the mean over unlimited text), got {promise_tokens}"
        )
    if (tolerance is None) == (expert_bytes is None):
        raise EdgeMoEError("--bits auto needs exactly one target: --tolerance (e.g. 2%) or --expert-bytes (e.g. 35%)")
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    check_fallback_bits(fallback_bits)
    plan = plan_conversion(Checkpoint(src))
    doc = load_importance(importance) if importance is not None else None
    if calib is None and (doc is None or tolerance is not None):
        raise EdgeMoEError(
            "--bits auto needs calibration text: pass --calib FILE"
            + ("" if doc is None else " (the tolerance is verified by measuring perplexity on it)")
        )
    if doc is not None and (doc["moe_layers"] != list(plan.moe_layers) or doc["num_experts"] != plan.num_experts):
        raise EdgeMoEError(
            f"{importance} profiles MoE layers {doc['moe_layers']} x {doc['num_experts']} experts, but "
            f"{src} has {list(plan.moe_layers)} x {plan.num_experts}: profile this checkpoint instead"
        )
    if doc is not None and (doc.get("group_size") != group_size or bool(doc.get("symmetric")) != bool(symmetric)):
        say(
            f"note: {importance} was measured with group size {doc.get('group_size')}, symmetric "
            f"{doc.get('symmetric')}; converting with group size {group_size}, symmetric {symmetric}"
        )

    t0 = time.monotonic()
    work = dst.parent / f".{dst.name}.auto-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        held = ref_tok = blocks = block_kind = None
        promise: int | None = None  # promise_tokens as a count once the held-out text is known; None: the mean
        if calib is not None:
            ref = work / "ref16"
            say("converting a 16-bit reference ...")
            convert(src, ref, bits=16, backbone_bits=16, progress=progress)
            ref_model = load(ref)
            docs = list(documents(ref_model, read_text(calib)))
            seen = profiled_tokens(doc, calib, sum(map(len, docs)), max_tokens)
            held = held_out(docs, seen, verify_tokens)
            if len(held.ids) <= window or (doc is None and seen <= window):
                raise EdgeMoEError(
                    f"{calib}: {len(held.ids)} tokens are left to verify on after the {seen} the importance profile "
                    f"sees; profile and check need a window ({window} tokens) each of text the other does not see: "
                    f"give more calibration text, or profile on fewer tokens (--calib-tokens)"
                )
            if doc is None:
                say(f"profiling expert importance on the first {seen} tokens of {calib} ...")
                doc = profile_importance(
                    ref,
                    calib,
                    low_bits,
                    group_size=group_size,
                    symmetric=symmetric,
                    window=window,
                    max_tokens=seen,
                    save=False,
                    model=ref_model,
                    log=log,
                )
            say(
                f"verifying on {len(held.ids)} held-out tokens ({int(held.doc[-1]) + 1} documents) of {calib}, "
                f"from token {held.begin}"
            )
            ref_tok, pos = token_nlls(ref_model, held.ids, window)
            doc_of = held.doc[pos]
            block_kind = "document" if len(np.unique(doc_of)) >= MIN_DOCUMENT_BLOCKS else "window"
            blocks = doc_of if block_kind == "document" else pos // window
            del ref_model
            shutil.rmtree(ref)
            if promise_tokens is None:
                promise_tokens = len(ref_tok)
            promise = None if not promise_tokens or math.isinf(promise_tokens) else int(promise_tokens)

        level = candidate_confidence(confidence, tolerance, max_rounds)
        assert doc is not None  # loaded, or profiled on calib above
        alloc = allocation_from_importance(doc, plan.hidden, plan.intermediate, choices, group_size, symmetric, measure)
        bytes16 = len(plan.moe_layers) * plan.num_experts * blob_nbytes(plan.hidden, plan.intermediate, 16)
        rounds: list[dict[str, Any]] = []

        def candidate(n: int) -> tuple[Path, float | None]:
            d = work / f"candidate-{len(rounds)}"
            convert(
                src,
                d,
                bits="auto",
                bits_map=bits_map(alloc, n, plan.moe_layers),
                group_size=group_size,
                symmetric=symmetric,
                backbone_bits=backbone_bits,
                progress=False,
            )
            r = {"steps": n, "expert_bytes": alloc.nbytes(n), "estimated_nll_increase": alloc.loss(n)}
            inc = ""
            if held is not None:
                assert ref_tok is not None and blocks is not None  # measured with held
                nll, _ = token_nlls(load(d), held.ids, window)
                point, bound, se = bound_increase(nll - ref_tok, blocks, level)
                pred = prediction_bound(point, bound, len(ref_tok), promise)
                r.update(
                    nll=float(nll.mean()),
                    nll_increase=point,
                    nll_increase_bound=bound,
                    nll_increase_prediction_bound=pred,
                    nll_increase_stderr=se,
                    ppl_increase=math.expm1(point),
                    ppl_increase_bound=math.expm1(bound),
                    ppl_increase_prediction_bound=math.expm1(pred),
                )
                inc = (
                    f", held-out ppl {100 * r['ppl_increase']:+.2f}% ({100 * level:.3g}% bound "
                    f"{100 * r['ppl_increase_bound']:+.2f}% on the mean, "
                    f"{100 * r['ppl_increase_prediction_bound']:+.2f}% {promised(promise)})"
                )
            rounds.append(r)
            say(
                f"candidate {len(rounds)}: {n}/{len(alloc)} steps, experts {100 * alloc.nbytes(n) / bytes16:.1f}% of "
                f"16-bit, estimated {100 * math.expm1(alloc.loss(n)):+.2f}%{inc}"
            )
            return d, r.get("nll_increase_prediction_bound")

        if tolerance is not None:
            target = math.log1p(tolerance)
            n = alloc.prefix_for_loss(target)
            lo, hi, best = -1, len(alloc) + 1, None
            for _ in range(max_rounds):
                d, inc = candidate(n)
                assert inc is not None  # a tolerance needs calib, so every candidate is measured
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
                    f"the fewest low-bit experts gave {100 * closest['ppl_increase']:+.2f}% on held-out calibration "
                    f"text, {100 * level:.3g}% bound {100 * closest['ppl_increase_prediction_bound']:+.2f}% "
                    f"{promised(promise)}): raise --tolerance, lower --confidence, promise it for longer "
                    f"texts (--promise-tokens), give more calibration text, "
                    f"keep the backbone at 16 bits (--backbone-bits 16), or allow 16-bit experts (--bits-choices)"
                )
            chosen, chosen_round = best
        else:
            assert expert_bytes is not None  # exactly one of tolerance and expert_bytes (checked above)
            target_bytes = int(expert_bytes * bytes16)
            steps = alloc.prefix_for_bytes(target_bytes)
            if steps is None:
                low = alloc.nbytes(len(alloc))
                raise EdgeMoEError(
                    f"even every expert at {min(alloc.choices)} bits takes {100 * low / bytes16:.1f}% "
                    f"of the 16-bit expert bytes, above {100 * expert_bytes:g}%: raise --expert-bytes"
                )
            chosen, _ = candidate(steps)
            chosen_round = len(rounds) - 1

        r = rounds[chosen_round]
        if fallback_bits is not None:
            add_fallback(src, chosen, fallback_bits, progress=progress)
        manifest = load_manifest(chosen)
        counts = {str(b): int(c) for b, c in zip(*np.unique(alloc.bits(r["steps"]), return_counts=True))}
        calibration = None
        if held is not None:
            assert ref_tok is not None  # measured with held
            calibration = {
                "file": str(calib),
                "window": window,
                "max_tokens": max_tokens,
                "profile_tokens": held.seen,
                "held_out_begin": held.begin,
                "held_out_tokens": len(ref_tok),
                "held_out_documents": int(held.doc[-1]) + 1,
                "blocks": block_kind,
                "confidence": confidence,
                "candidate_confidence": level,
                "max_rounds": max_rounds,
                "promise_tokens": promise,
                "nll_16bit": float(ref_tok.mean()),
                "nll": r["nll"],
                "nll_increase_stderr": r["nll_increase_stderr"],
                "ppl_increase": r["ppl_increase"],
                "ppl_increase_bound": r["ppl_increase_bound"],
                "ppl_increase_prediction_bound": r["ppl_increase_prediction_bound"],
            }
        record = {
            "mode": "tolerance" if tolerance is not None else "expert_bytes",
            "tolerance": tolerance,
            "expert_bytes": expert_bytes,
            "choices": alloc.choices,
            "measure": measure,
            "low_bits": sorted(int(b) for b in doc["loss_increase"]),
            "experts_per_bits": counts,
            "expert_bytes_ratio": r["expert_bytes"] / bytes16,
            "steps": r["steps"],
            "total_steps": len(alloc),
            "estimated_nll_increase": r["estimated_nll_increase"],
            "calibration": calibration,
            "rounds": rounds,
            "importance": IMPORTANCE_FILE,
            "seconds": round(time.monotonic() - t0, 1),
        }
        manifest["quantization"]["allocation"] = record
        write_manifest(chosen, manifest)
        save_importance(chosen, doc)
        move_into_place(chosen, dst)
        return load_manifest(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def promised(promise_tokens: int | None) -> str:
    """What a prediction bound is about, for messages: 'for a 32640-token text' or 'on the mean'."""
    return f"for a {promise_tokens}-token text" if promise_tokens else "on the mean"


def format_allocation(manifest: dict[str, Any]) -> str:
    """One paragraph on what --bits auto chose."""
    a = manifest["quantization"].get("allocation")
    if not a:
        return ""
    per = ", ".join(f"{n} at {b} bits" for b, n in sorted(a["experts_per_bits"].items(), key=lambda kv: -int(kv[0])))
    line = f"bits auto ({a['mode'].replace('_', ' ')}): {per}; experts {100 * a['expert_bytes_ratio']:.1f}% of 16-bit"
    c = a.get("calibration")
    if c and c.get("ppl_increase") is not None:
        line += f"; held-out calibration perplexity {100 * c['ppl_increase']:+.2f}% vs 16-bit"
        if c.get("ppl_increase_prediction_bound") is not None:
            level = c.get("candidate_confidence", c["confidence"])
            line += (
                f" ({c['held_out_tokens']} tokens; {100 * level:.3g}% upper bound "
                f"{100 * c['ppl_increase_bound']:+.2f}% on the mean, "
                f"{100 * c['ppl_increase_prediction_bound']:+.2f}% {promised(c['promise_tokens'])})"
            )
    return line + f" ({len(a['rounds'])} candidate(s), {a['seconds']:.0f}s)"


if __name__ == "__main__":
    sys.exit("use `edgemoe convert SRC -o DST --bits auto ...`")
