"""Next-token choice: greedy, or temperature with top-k / top-p (native/dense.h draws it)."""

from __future__ import annotations

import numpy as np

from .. import _core


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
        return _core.sample(logits, self.temperature, self.top_k, self.top_p, self.rng.random())
