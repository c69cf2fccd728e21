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


def rope_pairs(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, factor: float) -> np.ndarray:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... as complex numbers (DeepSeek's layout),
    cos and sin scaled by `factor`: x [T, heads, d] at `positions` [T]."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, d/2]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * (factor * np.exp(1j * angles))[:, None, :]
    out = np.empty(x.shape, np.float64)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def latent_attention(a, x: np.ndarray, inv_freq: np.ndarray, factor: float, eps: float) -> np.ndarray:
    """Multi-head latent attention written out as the DeepSeek-V2 paper states it, without the
    absorption: every head's keys [k_b[h] c, k_rope] and values v_b[h] c are expanded, then
    causal attention with keys and values of different widths. a: a blocks.LatentAttention
    with interleaved RoPE pairs; x [T, hidden] at positions 0..T-1 -> [T, hidden]."""
    T, H, n, r = x.shape[0], a.heads, a.nope, a.rope_dim
    q = a.q(x) if a.q is not None else a.q_b(rms_norm(a.q_a(x), a.q_a_norm, eps).astype(np.float32))
    q = q.reshape(T, H, n + r).astype(np.float64)
    latent = a.kv_a(x).astype(np.float64)
    c = rms_norm(latent[:, : a.rank], a.kv_a_norm, eps)  # [T, rank]
    pos = np.arange(T)
    q_rope = rope_pairs(q[..., n:], pos, inv_freq, factor)
    k_rope = rope_pairs(latent[:, None, a.rank :], pos, inv_freq, factor)  # [T, 1, r]
    k_nope = np.einsum("hnc,tc->thn", a.k_b, c)  # [T, H, n]
    v = np.einsum("hvc,tc->thv", a.v_b, c)  # [T, H, v_dim]
    scores = (np.einsum("thd,shd->hts", q[..., :n], k_nope) + np.einsum("thd,sd->hts", q_rope, k_rope[:, 0])) * a.scale
    scores = np.where(np.arange(T)[None, :] > np.arange(T)[:, None], -np.inf, scores)
    out = np.einsum("hts,shv->thv", softmax(scores), v).reshape(T, -1)
    return a.o(out.astype(np.float32))
