"""Perplexity of a model on held-out text (what `edgemoe eval MODEL --text FILE` prints).

    m = edgemoe.load("model-dir")
    r = perplexity(m, Path("test.txt"), window=256)      # {"ppl", "nll", "tokens", "tokens_per_s", ...}

Text is split into documents at lines holding only \\x1e (tools/corpus), each
document starts with BOS, and the token stream is cut into windows scored with
`Model.logits`. stride == window (the default) gives non-overlapping windows
whose first token is context only; stride < window re-reads window - stride
tokens of context and scores only the tokens no earlier window scored
(transformers' strided perplexity, so both report the same number).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeMoEError
from ..runtime.engine import Model

DOC_SEPARATOR = "\n\x1e\n"  # a line holding only ASCII RS separates documents (tools/corpus)


def read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EdgeMoEError(f"cannot read {path} ({e.strerror}): give a UTF-8 text file") from None


def split_documents(text: str) -> list[str]:
    """The non-empty documents of a text, in order, without their surrounding newlines."""
    return [d for d in (d.strip("\n") for d in text.split(DOC_SEPARATOR)) if d]


def documents(model: Model, text: str) -> Iterator[list[int]]:
    """Each non-empty document's token ids, BOS first when the model has one."""
    for d in split_documents(text):
        yield ([int(model.bos_id)] if model.bos_id is not None else []) + list(model.encode(d))


def encode_documents(model: Model, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a text, in order: BOS, then each document's tokens (BOS again before
    every document after a \\x1e line). max_tokens keeps the first that many."""
    out: list[int] = []
    text_tokens = 0
    for ids in documents(model, text):
        out.extend(ids)
        text_tokens += len(ids) - (model.bos_id is not None)
        if max_tokens and len(out) >= max_tokens:
            break
    if not text_tokens:
        raise EdgeMoEError("the text holds no tokens: give a non-empty UTF-8 text file")
    return np.asarray(out[:max_tokens] if max_tokens else out, np.int64)


def decoder_only(model: Model, what: str) -> None:
    """Refuse an encoder-decoder by name: `what` scores a decoder's next-token predictions."""
    if model.encoder_decoder:
        raise EdgeMoEError(
            f"{what} scores next-token predictions of a decoder-only model; this {model.architecture} "
            f"model is an encoder-decoder, which edgemoe does not score yet: convert it with fixed --bits"
        )


def token_ids(model: Model, text_or_ids: Any, max_tokens: int | None = None) -> np.ndarray:
    """A str is text, a path (Path / os.PathLike) names a text file, anything else is token ids."""
    if isinstance(text_or_ids, os.PathLike):
        return encode_documents(model, read_text(text_or_ids), max_tokens)
    if isinstance(text_or_ids, str):
        return encode_documents(model, text_or_ids, max_tokens)
    ids = np.asarray(text_or_ids, np.int64).reshape(-1)
    return ids[:max_tokens] if max_tokens else ids


def windows(n: int, window: int, stride: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) per window over n tokens: feed ids[begin:end] and score its last
    `scored` positions (position begin itself is never scored: nothing precedes it)."""
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window {window}, stride {stride}")
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            yield begin, end, scored
        prev_end = end
        if end == n:
            return


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row of logits [T, vocab] (float64 [T])."""
    z = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1, dtype=np.float64))
    return lse - z[np.arange(len(targets)), targets].astype(np.float64)


def window_nll(logits: np.ndarray, ids: np.ndarray, scored: int) -> np.ndarray:
    """NLL of the last `scored` tokens of a window from its logits [T, vocab] (row t predicts t+1)."""
    T = len(ids)
    return token_nll(logits[T - 1 - scored : T - 1], ids[T - scored :])


def token_nlls(model: Model, ids: np.ndarray, window: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """NLL of every scored token of ids (float64 [N]) and its position in ids ([N]), windows as perplexity's."""
    decoder_only(model, "scoring tokens")
    nll, pos = [], []
    for begin, end, scored in windows(len(ids), window):
        chunk = ids[begin:end]
        nll.append(window_nll(model.logits(chunk), chunk, scored))
        pos.append(np.arange(end - scored, end))
    if not nll:
        raise EdgeMoEError(f"{len(ids)} tokens are too few to score: give more text")
    return np.concatenate(nll), np.concatenate(pos)


def perplexity(
    model: Model,
    text_or_ids: Any,
    window: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Perplexity of `model` on a text (str), a text file (Path) or token ids.

    Returns ppl, nll (mean nats per scored token), tokens (scored), tokens_in (fed to
    the model, > tokens when windows overlap), windows, seconds and tokens_per_s
    (tokens fed per second of forward passes, i.e. prefill throughput).
    """
    decoder_only(model, "perplexity")
    ids = token_ids(model, text_or_ids, max_tokens)
    total, scored_tokens, fed, n_win = 0.0, 0, 0, 0
    spans = list(windows(len(ids), window, stride))
    if not spans:
        raise EdgeMoEError(f"{len(ids)} tokens are too few to score: give more text")
    seconds = 0.0
    last_report = time.monotonic()
    for begin, end, scored in spans:
        chunk = ids[begin:end]
        t0 = time.perf_counter()
        logits = model.logits(chunk)
        seconds += time.perf_counter() - t0
        total += float(window_nll(logits, chunk, scored).sum())
        scored_tokens += scored
        fed += len(chunk)
        n_win += 1
        if log is not None and time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            print(
                f"  {n_win}/{len(spans)} windows, running ppl {math.exp(total / scored_tokens):.3f}",
                file=log,
                flush=True,
            )
    nll = total / scored_tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": scored_tokens,
        "tokens_in": fed,
        "windows": n_win,
        "window": window,
        "stride": stride or window,
        "seconds": seconds,
        "tokens_per_s": fed / seconds if seconds > 0 else 0.0,
    }
