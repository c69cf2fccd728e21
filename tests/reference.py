"""Numpy references the native kernels and ops are tested against (oracles, not runtime code)."""

from __future__ import annotations

import numpy as np

from edgemoe.format import quant


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest per row, largest first (lower index first on a tie): (ids int32 [T, k], values [T, k])."""
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(probs, ids, axis=-1)


def route_softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts, the top k, optionally renormalized to sum 1."""
    ids, w = top_k(softmax(logits), k)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, np.ascontiguousarray(w, dtype=np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """Causal grouped-query attention: q [T, heads, hd] at positions start..start+T-1 against
    k, v [S, kv_heads, hd] with S = start+T -> [T, heads*hd]."""
    T, heads, hd = q.shape
    S, kv_heads, _ = k.shape
    rep = heads // kv_heads
    qg = q.reshape(T, kv_heads, rep, hd).transpose(1, 2, 0, 3)  # [kv, rep, T, hd]
    scores = np.matmul(qg, k.transpose(1, 2, 0)[:, None]) * (hd**-0.5)  # [kv, rep, T, S]
    qpos = np.arange(start, start + T)[:, None]
    kpos = np.arange(S)[None, :]
    masked = kpos > qpos
    if window is not None:
        masked |= kpos <= qpos - window
    if masked.any():
        scores = np.where(masked, np.float32(-np.inf), scores)
    probs = softmax(scores)
    out = np.matmul(probs, v.transpose(1, 0, 2)[:, None])  # [kv, rep, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, heads * hd)


def expert_forward(x: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """SwiGLU of one expert blob: down(silu(gate x) * up x), x [T, hidden] -> [T, hidden]."""
    gate, up, down = quant.expert_matrices(blob)
    x = np.asarray(x, dtype=np.float32)
    h = silu(x @ gate.T) * (x @ up.T)  # [T, I]
    return (h @ down.T).astype(np.float32)
