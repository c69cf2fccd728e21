"""The gate's view of a prompt: a fixed-length vector from its token ids (numpy only).

The same function makes the features when the gate is trained and when it runs, so the two
cannot drift apart; mixture.json records the parameters (`FeatureSpec.to_dict`).

Features: the prompt's first `prompt_tokens` token ids, hashed into `buckets` bins, as a
bag of tokens normalised to sum 1 and square-rooted (so that a handful of frequent tokens,
newlines and spaces, do not drown the rare ones that tell a domain apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import GateMismatchError

KIND = "hashed-unigram"
_HASH_MULT = np.uint64(2654435761)  # Knuth's multiplicative hash: spreads neighbouring ids


@dataclass(frozen=True)
class FeatureSpec:
    buckets: int = 512
    prompt_tokens: int = 64

    @property
    def dim(self) -> int:
        return self.buckets

    def to_dict(self) -> dict:
        return {"kind": KIND, "buckets": self.buckets, "prompt_tokens": self.prompt_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            kind = d.get("kind") if isinstance(d, dict) else d
            raise GateMismatchError(
                f"the gate's features are of kind {kind!r}; this edgemoe computes {KIND!r}: "
                "train and export the gate again (tools/mixture/train_gate.py)"
            )
        b, p = d.get("buckets"), d.get("prompt_tokens")
        if not (isinstance(b, int) and b > 0 and isinstance(p, int) and p > 0):
            raise GateMismatchError(
                f"the gate's features need positive integers 'buckets' and 'prompt_tokens', got {d!r}: "
                "train and export the gate again"
            )
        return cls(buckets=b, prompt_tokens=p)


def _bucket(ids: np.ndarray, buckets: int) -> np.ndarray:
    return ((ids.astype(np.uint64) * _HASH_MULT) % np.uint64(1 << 32) % np.uint64(buckets)).astype(np.int64)


def prompt_features(token_ids: Sequence[int] | np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Features of one prompt: float32 [spec.dim]. An empty prompt gives zeros."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)[: spec.prompt_tokens]
    if ids.size and ids.min() < 0:
        raise ValueError(f"token ids must be non-negative, got {int(ids.min())}")
    counts = np.bincount(_bucket(ids, spec.buckets), minlength=spec.buckets).astype(np.float64)
    total = counts.sum()
    if total > 0:
        counts /= total
    return np.sqrt(counts).astype(np.float32)


def batch_features(prompts: Sequence[Sequence[int] | np.ndarray], spec: FeatureSpec) -> np.ndarray:
    """Features of several prompts: float32 [len(prompts), spec.dim]."""
    out = np.zeros((len(prompts), spec.dim), dtype=np.float32)
    for i, p in enumerate(prompts):
        out[i] = prompt_features(p, spec)
    return out
