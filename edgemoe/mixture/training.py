"""Training and export of the gate, and the held-out log-probabilities it trains on (torch,
transformers and onnx are imported only here, when a gate is made; running one needs only
onnxruntime).

The gate minimises the cross-entropy of the gated mixture of the specialists' next-token
distributions: for a document with prompt features x and scored tokens y_t,
    loss = -mean_t log sum_s softmax(g(x))_s p_s(y_t | y_<t)
with the p_s fixed (precomputed log-probabilities), so training is cheap and a gate for any
subset is the same loss with the other specialists' logits masked out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgemoe.mixture.features import FeatureSpec, batch_features
from edgemoe.mixture.gate import INPUT, META_FEATURES, META_SPECIALISTS, OUTPUT
from edgemoe.mixture.heldout import Heldout

# onnxruntime 1.31 and device builds read IR <= 13; IR 10 with opset 17 loads everywhere.
IR_VERSION = 10
OPSET = 17


def gate_net(n_features: int, n_specialists: int, hidden: int = 64, seed: int = 0):
    """The gate: Linear(F, hidden) -> ReLU -> Linear(hidden, N), as a torch module."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_specialists)
    )


def mixture_nll_torch(logits, logprobs, mask, enabled=None):
    """Mean over scored tokens of -log sum_s w_s p_s: logits [B, N], logprobs [B, N, T], mask [B, T]."""
    import torch

    if enabled is not None:
        logits = logits.masked_fill(~enabled[None, :], float("-inf"))
        logprobs = logprobs.masked_fill(~enabled[None, :, None], 0.0)  # -inf + 0 stays -inf below
    logw = torch.log_softmax(logits, dim=-1)
    nll = -torch.logsumexp(logw[:, :, None] + logprobs, dim=1)  # [B, T]
    return (nll * mask).sum() / mask.sum()


def train_gate(
    h: Heldout,
    enabled: np.ndarray | None = None,
    hidden: int = 64,
    steps: int = 600,
    lr: float = 3e-3,
    weight_decay: float = 1e-3,
    seed: int = 0,
):
    """Fit a gate on `h` (full batch, AdamW). `enabled` [N] bool: train over that subset only
    (the other outputs are masked out, the same as a gate with fewer outputs)."""
    import torch

    net = gate_net(h.features.shape[1], len(h.specialists), hidden, seed)
    x = torch.from_numpy(h.features.astype(np.float32))
    lp = torch.from_numpy(h.logprobs.astype(np.float32))
    mask = torch.from_numpy(h.mask.astype(np.float32))
    en = None if enabled is None else torch.from_numpy(np.asarray(enabled, dtype=bool))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = mixture_nll_torch(net(x), lp, mask, en)
        loss.backward()
        opt.step()
    return net.eval()


def gate_logits(net, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.asarray(features, dtype=np.float32))).numpy()


def export_gate(net, path: str | Path, names: Sequence[str], features: FeatureSpec) -> Path:
    """Write the torch gate `net` as ONNX (Gemm -> Relu -> Gemm) with the names and features it
    was trained for in its metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    l1, l2 = net[0], net[2]
    w1, b1 = l1.weight.detach().numpy().astype(np.float32), l1.bias.detach().numpy().astype(np.float32)
    w2, b2 = l2.weight.detach().numpy().astype(np.float32), l2.bias.detach().numpy().astype(np.float32)
    assert w1.shape[1] == features.dim and w2.shape[0] == len(names), (w1.shape, w2.shape)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("Gemm", [INPUT, "w1", "b1"], ["h_pre"], transB=1),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], [OUTPUT], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgemoe_mixture_gate",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", features.dim])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", len(names)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgemoe")
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model, {META_SPECIALISTS: json.dumps(list(names)), META_FEATURES: json.dumps(features.to_dict())}
    )
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def score_documents(
    model, docs: Sequence[np.ndarray], prompt_tokens: int, score_tokens: int, batch: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One causal LM's log-probabilities of each document's scored tokens.

    Document i (token ids, starting with <s>) keeps its first min(prompt_tokens, len // 2)
    tokens as the prompt and scores up to `score_tokens` tokens after it. Returns
    (prompt_len [D], n_scored [D], logprobs [D, score_tokens])."""
    import torch

    d = len(docs)
    plen = np.array([min(prompt_tokens, len(t) // 2) for t in docs], dtype=np.int32)
    nsc = np.array([min(score_tokens, len(t) - p) for t, p in zip(docs, plen)], dtype=np.int32)
    out = np.zeros((d, score_tokens), dtype=np.float32)
    order = np.argsort([p + n for p, n in zip(plen, nsc)])  # similar lengths together: less padding
    with torch.no_grad():
        for b in range(0, d, batch):
            rows = order[b : b + batch]
            width = int(max(plen[r] + nsc[r] for r in rows))
            ids = torch.zeros((len(rows), width), dtype=torch.long)  # right padding: causal, never read
            for j, r in enumerate(rows):
                n = plen[r] + nsc[r]
                ids[j, :n] = torch.as_tensor(np.asarray(docs[r][:n], dtype=np.int64))
            logits = model(input_ids=ids).logits.float()
            lsm = torch.log_softmax(logits, dim=-1)
            for j, r in enumerate(rows):
                p, n = int(plen[r]), int(nsc[r])
                # the token at position p + t is predicted from position p + t - 1
                tgt = ids[j, p : p + n]
                out[r, :n] = lsm[j, p - 1 : p + n - 1].gather(-1, tgt[:, None])[:, 0].numpy()
    return plen, nsc, out


def make_heldout(
    models: dict[str, object],
    docs: Sequence[np.ndarray],
    domains: Sequence[str],
    features: FeatureSpec,
    score_tokens: int,
    batch: int = 8,
) -> Heldout:
    """Score `docs` with every model in `models` (name -> causal LM) into a Heldout."""
    docs = [np.asarray(t, dtype=np.int64) for t in docs]
    keep = [i for i, t in enumerate(docs) if len(t) >= 4]
    docs, domains = [docs[i] for i in keep], [domains[i] for i in keep]
    names = list(models)
    lps = []
    plen = nsc = None
    for name in names:
        plen, nsc, lp = score_documents(models[name], docs, features.prompt_tokens, score_tokens, batch)
        lps.append(lp)
    assert plen is not None and nsc is not None
    width = features.prompt_tokens + score_tokens
    tokens = np.full((len(docs), width), -1, dtype=np.int32)
    for i, t in enumerate(docs):
        n = int(plen[i] + nsc[i])
        tokens[i, :n] = t[:n]
    feats = batch_features([t[: plen[i]] for i, t in enumerate(docs)], features)
    return Heldout(
        names, np.array(domains).astype(str), tokens, plen, nsc, feats, np.stack(lps, axis=1).astype(np.float32)
    )
