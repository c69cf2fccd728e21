"""Tokenized corpus on disk: {split}.bin (uint16 token ids, every document as <s> ... </s>) + meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class TokenData:
    def __init__(self, root: Path):
        self.root = Path(root)
        meta = json.loads((self.root / "meta.json").read_text())
        self.vocab_size, self.bos, self.eos = meta["vocab_size"], meta["bos_id"], meta["eos_id"]
        self.train = self.split("train")
        self.n_train = len(self.train)

    def split(self, name: str) -> np.ndarray:
        return np.memmap(self.root / f"{name}.bin", dtype=np.uint16, mode="r")

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """`batch` random windows of `length` tokens from the train split (documents packed back to back)."""
        starts = rng.integers(0, self.n_train - length, size=batch)
        return np.stack([self.train[s : s + length] for s in starts]).astype(np.int64)

    def eval_windows(self, name: str, length: int, limit: int | None = None) -> np.ndarray:
        """Consecutive non-overlapping windows of a held-out split; `limit` spreads them evenly over it."""
        toks = self.split(name)
        n = len(toks) // length
        idx = np.arange(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).astype(np.int64)
        return np.stack([toks[i * length : (i + 1) * length] for i in idx]).astype(np.int64)
