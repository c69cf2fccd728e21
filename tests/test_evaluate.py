"""Perplexity (edgemoe/evaluate.py) against transformers' own loss, windows, and the eval verb."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import reference_model

import edgemoe
from edgemoe.cli.eval import main
from edgemoe.converters.convert import convert
from edgemoe.planning.evaluate import encode_documents, perplexity, windows


@pytest.fixture(scope="module")
def tiny16(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("mixtral")
    dst = tmp_path_factory.mktemp("eval") / "model"
    convert(src, dst, bits=16, progress=False)
    return src, dst


def reference_ppl(ref, ids: list[int], window: int, stride: int | None) -> float:
    """transformers' strided perplexity: labels -100 on context, the model shifts them."""
    stride = stride or window
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = ref(x, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * n
        n_scored += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_scored)


@pytest.mark.parametrize("window,stride", [(32, None), (40, 16)])
def test_perplexity_matches_transformers(tiny16, window, stride):
    src, dst = tiny16
    ref = reference_model(src)
    ids = np.random.default_rng(3).integers(3, ref.config.vocab_size, size=150).tolist()
    r = perplexity(edgemoe.load(dst), ids, window=window, stride=stride)
    want = reference_ppl(ref, ids, window, stride)
    assert abs(r["ppl"] / want - 1) < 1e-3, (r["ppl"], want)
    assert r["tokens"] == sum(s for _, _, s in windows(len(ids), window, stride))
    assert r["tokens_per_s"] > 0 and r["tokens_in"] >= r["tokens"]


def test_windows_score_every_token_once():
    for n, w, s in [(100, 10, None), (100, 10, 3), (7, 10, None), (64, 16, 16), (65, 16, 5)]:
        spans = list(windows(n, w, s))
        covered = sorted(t for b, e, k in spans for t in range(e - k, e))
        if s is None or s == w:  # non-overlapping: the first token of every window is context only
            assert len(covered) == n - len(spans)
        else:  # strided: every token but the very first is scored, each exactly once
            assert covered == list(range(1, n)), (n, w, s)
        assert all(e - b <= w and k <= e - b - 1 for b, e, k in spans)


def test_documents_start_with_bos(tiny16):
    m = edgemoe.load(tiny16[1])
    ids = encode_documents(m, "The robot\n\x1e\nThe sea\n")
    assert ids[0] == m.bos_id and (ids == m.bos_id).sum() == 2
    assert encode_documents(m, "The robot\n\x1e\nThe sea\n", max_tokens=3).size == 3


def test_eval_verb(tiny16, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The robot walked to the harbour.\n\x1e\nThe quick brown fox jumps over the lazy dog.\n" * 4)
    assert main([str(tiny16[1]), "--text", str(text), "--window", "16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ppl"] > 1 and r["tokens"] > 0 and r["expert_bytes"] > 0
    assert main([str(tiny16[1]), "--text", str(text), "--window", "16"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
