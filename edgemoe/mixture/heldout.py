"""heldout.npz: held-out documents with every specialist's log-probability of each true next
token, so the loss of the gated mixture of any subset is computed without running a model.

Arrays (D documents, N specialists, T scored tokens at most):
    specialists [N] str        names, in the order of the logprobs' second axis
    domain      [D] str        the corpus domain the document comes from
    tokens      [D, P+T] int32 the document's first token ids (the prompt, then the scored
                               tokens), padded with -1
    prompt_len  [D] int32      tokens the gate sees; the specialists score what follows
    n_scored    [D] int32      scored tokens (<= T)
    features    [D, F] float32 gate features of the prompt (features.prompt_features)
    logprobs    [D, N, T] float32  log p_s(token[prompt_len + t] | tokens before it); 0 past n_scored
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import MixtureSpecError

KEYS = ("specialists", "domain", "tokens", "prompt_len", "n_scored", "features", "logprobs")


@dataclass
class Heldout:
    specialists: list[str]
    domain: np.ndarray
    tokens: np.ndarray
    prompt_len: np.ndarray
    n_scored: np.ndarray
    features: np.ndarray
    logprobs: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """[D, T] true where a token is scored."""
        return np.arange(self.logprobs.shape[2])[None, :] < self.n_scored[:, None]

    def prompt(self, i: int) -> np.ndarray:
        return self.tokens[i, : self.prompt_len[i]]

    def select(self, rows: np.ndarray) -> Heldout:
        return Heldout(
            self.specialists,
            self.domain[rows],
            self.tokens[rows],
            self.prompt_len[rows],
            self.n_scored[rows],
            self.features[rows],
            self.logprobs[rows],
        )

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            specialists=np.array(self.specialists),
            domain=np.asarray(self.domain).astype(str),
            tokens=self.tokens.astype(np.int32),
            prompt_len=self.prompt_len.astype(np.int32),
            n_scored=self.n_scored.astype(np.int32),
            features=self.features.astype(np.float32),
            logprobs=self.logprobs.astype(np.float32),
        )

    @classmethod
    def load(cls, path: str | Path) -> Heldout:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in KEYS if k not in z.files]
                if missing:
                    raise MixtureSpecError(f"{path} lacks {missing}: write the held-out set again")
                h = cls(
                    [str(s) for s in z["specialists"]],
                    z["domain"].astype(str),
                    z["tokens"],
                    z["prompt_len"],
                    z["n_scored"],
                    z["features"],
                    z["logprobs"],
                )
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise MixtureSpecError(f"{path} is damaged ({e}): write the held-out set again") from e
        d, n, t = h.logprobs.shape
        if n != len(h.specialists) or len(h.domain) != d or h.features.shape[0] != d or (h.n_scored > t).any():
            raise MixtureSpecError(f"{path}: the arrays' shapes disagree: write the held-out set again")
        return h


def token_nll(logprobs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """-log sum_s w[d, s] p_s(token) per token: logprobs [D, N, T], weights [D, N] -> [D, T]."""
    with np.errstate(divide="ignore"):
        logw = np.log(weights.astype(np.float64))
    z = logw[:, :, None] + logprobs.astype(np.float64)
    m = z.max(axis=1)
    return -(m + np.log(np.exp(z - m[:, None, :]).sum(axis=1)))


def mixture_loss(h: Heldout, weights: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean next-token cross-entropy (nats) of the mixture with per-document `weights` [D, N]."""
    nll, mask = token_nll(h.logprobs, weights), h.mask
    if rows is not None:
        nll, mask = nll[rows], mask[rows]
    return float(nll[mask].mean())


def single_loss(h: Heldout, s: int, rows: np.ndarray | None = None) -> float:
    """Mean cross-entropy of specialist `s` alone."""
    w = np.zeros((len(h.domain), len(h.specialists)), dtype=np.float32)
    w[:, s] = 1.0
    return mixture_loss(h, w, rows)
