"""Next-token sampling: greedy, top-k, top-p (nucleus) and temperature give the
distribution their definitions give, computed here the slow way with a full sort."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.runtime.sampling import Sampler


def reference(logits, temperature, top_k, top_p):
    """token -> probability: sort (ties by token id), cut at top_k, then at the top_p mass."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return dict(zip(order.tolist(), p.tolist()))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.8, 0, 0.95), (1.0, 0, 0.5), (0.7, 8, 0.9), (1.3, 5, 1.0), (1.0, 3, 0.6), (0.5, 0, 0.3)],
)
def test_sampled_frequencies_follow_the_definition(temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(40) * 2).astype(np.float32)
    logits[::7] = logits[0]  # ties, some at the nucleus edge
    want = reference(logits, temperature, top_k, top_p)
    s, n = Sampler(temperature, top_k, top_p, seed=0), 40_000
    got = np.bincount([s(logits) for _ in range(n)], minlength=len(logits)) / n
    assert set(np.flatnonzero(got).tolist()) <= set(want), "sampled a token outside the nucleus"
    for tok in range(len(logits)):
        p = want.get(tok, 0.0)
        assert abs(got[tok] - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (tok, got[tok], p)


def test_nucleus_edge_ties_go_by_token_id():
    logits = np.array([0.0, 1.0, 0.0, 0.0, 2.0], np.float32)
    # with top_p just above the two likeliest, the nucleus adds exactly one of the tied zeros: id 0
    want = reference(logits, 1.0, 0, 0.8)
    assert sorted(want) == [0, 1, 4]
    s = Sampler(1.0, 0, 0.8, seed=0)
    assert {s(logits) for _ in range(3000)} == {0, 1, 4}


def test_greedy_seeds_and_arguments():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert Sampler()(logits) == int(np.argmax(logits))
    a, b = Sampler(0.8, 0, 0.95, seed=7), Sampler(0.8, 0, 0.95, seed=7)
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            Sampler(**bad)


def draw_reference(logits, temperature, top_k, top_p, u):
    """The token the definition gives for a uniform draw u: inverse of the nucleus' cumulative
    probabilities in token-id order; also the distance of u to the nearest boundary."""
    want = reference(logits, temperature, top_k, top_p)
    toks = sorted(want)
    c = np.cumsum([want[t] for t in toks])
    i = min(int(np.searchsorted(c, u * c[-1], side="right")), len(toks) - 1)
    return toks[i], float(np.min(np.abs(c - u * c[-1])))


@pytest.mark.parametrize(
    "scale,temperature,top_k,top_p",
    [
        (0.3, 1.0, 0, 0.95),
        (1.5, 0.8, 0, 0.95),
        (4.0, 0.8, 0, 0.9),
        (8.0, 1.0, 0, 0.5),
        (2.0, 0.7, 50, 0.9),
        (1.0, 1.0, 0, 1.0 - 1e-12),
        (3.0, 1.2, 1000, 1.0),
    ],
)
def test_large_vocabularies_draw_what_the_definition_draws(scale, temperature, top_k, top_p):
    """On 8192-token vocabularies, flat to peaked, with ties: for the same uniform draw the
    sampler returns the definition's token (the native nucleus sorts only the largest weights,
    growing the part it sorts; this checks it against the full sort)."""
    from edgemoe import _core

    rng = np.random.default_rng(int(scale * 10) + top_k)
    for trial in range(12):
        logits = (rng.standard_normal(8192) * scale).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # many ties, some at the nucleus edge
        for u in rng.random(25):
            want, margin = draw_reference(logits, temperature, top_k, top_p, u)
            got = _core.sample(logits, temperature, top_k, top_p, float(u))
            assert got == want or margin < 1e-5, (trial, u, got, want)  # float exp: ~3e-7 relative


def test_sample_rejects_bad_arguments():
    from edgemoe import _core

    x = np.zeros(4, np.float32)
    for args in ((0.0, 0, 0.9), (1.0, -1, 0.9), (1.0, 0, 0.0), (1.0, 0, 1.5)):
        with pytest.raises(ValueError):
            _core.sample(x, *args, 0.5)
    with pytest.raises(ValueError):
        _core.sample(np.zeros(0, np.float32), 1.0, 0, 0.9, 0.5)
    with pytest.raises(ValueError, match="finite"):
        _core.sample(np.array([0.0, np.nan, 1.0], np.float32), 1.0, 0, 0.9, 0.5)
    with pytest.raises(ValueError, match="finite"):
        _core.sample(np.array([0.0, np.inf, 1.0], np.float32), 1.0, 0, 0.9, 0.5)
    with pytest.raises(ValueError, match="every logit is -inf"):
        _core.sample(np.full(3, -np.inf, np.float32), 1.0, 0, 0.9, 0.5)
    with pytest.raises(ValueError, match="1-D"):
        _core.sample(np.zeros((2, 4), np.float32), 1.0, 0, 0.9, 0.5)


def test_masked_tokens_are_never_drawn():
    """A logit of -inf (a banned token) has weight 0, as the definition gives it, whatever top-k/top-p."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(300).astype(np.float32)
    masked = rng.choice(300, 150, replace=False)
    logits[masked] = -np.inf
    for top_k, top_p in ((0, 1.0), (0, 0.95), (200, 1.0), (250, 0.9)):
        s = Sampler(1.0, top_k, top_p, seed=0)
        drawn = {s(logits) for _ in range(3000)}
        assert not drawn & set(masked.tolist()), (top_k, top_p)
