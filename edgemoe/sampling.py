"""Next-token choice: greedy, or temperature with top-k / top-p."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if top_k < 0:
            raise ValueError("top_k must be >= 0 (0 means no limit)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        pool = _largest(z, self.top_k) if self.top_k else np.arange(len(z))
        w = np.exp(z[pool] - z[pool].max())
        if self.top_p < 1.0:
            # The nucleus: the likeliest tokens whose mass reaches top_p, ties at its edge
            # taken by token id. Sorting the probabilities alone gives its size; no token
            # order is needed to sample from it (an argsort of the vocabulary costs more
            # than the rest of a small model's decode step).
            ws = np.sort(w)[::-1]
            keep = int(np.searchsorted(np.cumsum(ws / w.sum()), self.top_p) + 1)
            sel = _largest(w, keep)
            pool, w = pool[sel], w[sel]
        c = np.cumsum(w)
        i = int(np.searchsorted(c, self.rng.random() * c[-1], side="right"))
        return int(pool[min(i, len(pool) - 1)])


def _largest(v: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest entries of v, ties at the cut taken by smallest index; in index order."""
    if m >= len(v):
        return np.arange(len(v))
    cut = np.partition(v, len(v) - m)[len(v) - m]  # the m-th largest value
    above = np.flatnonzero(v > cut)
    at = np.flatnonzero(v == cut)[: m - len(above)]
    return np.sort(np.concatenate([above, at]))
