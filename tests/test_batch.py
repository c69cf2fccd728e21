"""Batched decoding (runtime/batch.py, DecoderLM.forward_batch, the server's --batch): a
decode step of several sequences gives each one exactly the logits and tokens it gets alone
(greedy and seeded sampling, 4- and 8-bit experts, shared experts, latent attention), while
each routed expert is read once for the batch; sequences join and leave between steps; a
request cancelled inside a batch stops and the others go on unchanged."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import edgemoe
from edgemoe.converters.convert import convert
from edgemoe.runtime.batch import DecodeBatch, Sequence
from edgemoe.serve.scheduler import Job, Scheduler

PROMPTS = [[5, 9, 2, 33, 7], [11, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48], [2]]


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    out = {}
    for arch, bits in (("mixtral", 4), ("qwen2_moe", 8), ("deepseek_v2", 4)):
        dst = tmp_path_factory.mktemp("batch") / f"{arch}-{bits}"
        convert(tiny_checkpoint(arch), dst, bits=bits, progress=False)
        out[arch] = dst
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_a_batched_step_gives_each_sequence_its_own_logits(models, arch):
    m = edgemoe.load(models[arch])
    net = m.net
    feeds = [list(p) for p in PROMPTS]
    kvs = [net.new_kv_cache() for _ in feeds]
    alone = [net.new_kv_cache() for _ in feeds]
    for p, kv, kv1 in zip(feeds, kvs, alone):
        net.forward(np.array(p), kv, 0, all_logits=False)
        net.forward(np.array(p), kv1, 0, all_logits=False)
    pos = [len(p) for p in feeds]
    rng = np.random.default_rng(0)
    for _ in range(4):  # a few steps, each sequence at its own position
        ids = rng.integers(0, m.config.vocab_size, size=len(feeds))
        batched = net.forward_batch(ids, kvs, pos)
        for b in range(len(feeds)):
            one = net.forward(ids[b : b + 1], alone[b], pos[b], all_logits=False)
            np.testing.assert_array_equal(batched[b], one[0])
        pos = [p + 1 for p in pos]


def test_the_batch_reads_a_shared_expert_once(models):
    m = edgemoe.load(models["mixtral"], memory_budget="32KiB")  # two experts: a layer evicts the last one's
    net = m.net
    kvs = [net.new_kv_cache() for _ in range(3)]
    for kv in kvs:
        net.forward(np.array([7]), kv, 0, all_logits=False)
    m.cache.reset_stats()
    net.forward_batch(np.array([9, 9, 9]), kvs, [1, 1, 1])  # the same token routes the same way
    batched_loads = m.cache.stats()["loads"]
    m.cache.reset_stats()
    for kv in kvs:
        net.forward(np.array([9]), kv, 1, all_logits=False)
    alone_loads = m.cache.stats()["loads"]
    assert 0 < batched_loads < alone_loads


def _alone(m, prompt, **kw):
    return [(s.token, s.text, s.finish) for s in m.stream(prompt, **kw)]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95}])
def test_sequences_join_and_leave_with_the_tokens_they_get_alone(models, sampling):
    m = edgemoe.load(models["mixtral"], memory_budget="40KB")
    asks = [  # (prompt, max_new_tokens, seed, the step it joins at)
        (PROMPTS[0], 9, 1, 0),
        (PROMPTS[1], 4, 2, 0),
        (PROMPTS[2], 7, 3, 2),
        (PROMPTS[3], 5, 4, 5),
    ]
    want = [_alone(m, p, max_new_tokens=n, seed=s, ignore_eos=True, **sampling) for p, n, s, _ in asks]
    batch = DecodeBatch(m)
    got: list[list] = [[] for _ in asks]
    seqs: dict[int, int] = {}
    sizes = []
    for t in range(20):
        for i, (p, n, s, at) in enumerate(asks):
            if at == t:
                seq = Sequence(m, p, max_new_tokens=n, seed=s, ignore_eos=True, **sampling)
                seqs[id(seq)] = i
                step = batch.add(seq)
                got[i].append((step.token, step.text, step.finish))
        sizes.append(len(batch.live))
        for seq, step in batch.step():
            got[seqs[id(seq)]].append((step.token, step.text, step.finish))
    assert got == want
    assert max(sizes) >= 3 and not batch.live  # they overlapped, and all left


def test_stop_strings_and_eos_end_a_sequence_in_a_batch(models):
    m = edgemoe.load(models["mixtral"])
    # the tiny tokenizer has no text for most of the random model's ids: a letter per id instead
    m.decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)
    text = m.decode([t for t, _, _ in _alone(m, PROMPTS[0], max_new_tokens=8, ignore_eos=True)])
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    want = _alone(m, PROMPTS[0], max_new_tokens=8, stop=[stop])
    m.eos_ids = {want[0][0]}  # the first token alone: EOS ends the other sequence at once
    want_eos = _alone(m, PROMPTS[0], max_new_tokens=8)
    m.eos_ids = set()
    batch = DecodeBatch(m)
    a = Sequence(m, PROMPTS[0], max_new_tokens=8, stop=[stop])
    b = Sequence(m, PROMPTS[1], max_new_tokens=8, ignore_eos=True)
    got = [[(s.token, s.text, s.finish)] for s in (batch.add(a), batch.add(b))]
    while batch.live:
        for seq, s in batch.step():
            got[0 if seq is a else 1].append((s.token, s.text, s.finish))
    assert got[0] == want and got[0][-1][2] == "stop"
    assert got[1] == _alone(m, PROMPTS[1], max_new_tokens=8, ignore_eos=True)
    assert want_eos[-1][2] == "stop" and len(want_eos) == 1


def test_memory_needed_counts_a_kv_cache_per_sequence(models):
    m = edgemoe.load(models["mixtral"], memory_budget="40KB")
    one, four = m.memory_needed(512), m.memory_needed(512, sequences=4)
    assert m.stats()["kv_cache"] == "float16"  # the default: 2 bytes a value
    kv = 2 * m.config.num_hidden_layers * m.config.num_key_value_heads * m.config.head_dim * 2 * 512
    assert four - one == 3 * kv


def _collect(scheduler, jobs, cancel_after=None):
    """Submit jobs on a running event loop and gather (tokens, finish) per job; the job at
    index cancel_after[0] is cancelled after cancel_after[1] of its tokens."""

    async def main():
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.loop = loop
            j.events = asyncio.Queue()
            scheduler.submit(j)

        async def one(i, j):
            tokens = []
            while True:
                ev = await j.events.get()
                if ev[0] == "token":
                    tokens.append(ev[2])
                    if cancel_after and cancel_after[0] == i and len(tokens) == cancel_after[1]:
                        j.cancel()
                elif ev[0] == "done":
                    return tokens, ev[1]
                else:
                    raise ev[1]

        return await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))

    return asyncio.run(main())


def test_the_scheduler_batches_and_cancels_inside_a_batch(models):
    m = edgemoe.load(models["mixtral"], memory_budget="40KB")
    m.decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # every token has text: an event each
    asks = [(PROMPTS[i % 4], 10 + i, i) for i in range(5)]
    want = [
        [s.token for s in m.stream(p, max_new_tokens=n, seed=s, temperature=0.8, ignore_eos=True)] for p, n, s in asks
    ]
    s = Scheduler(m, batch=3)
    try:
        jobs = [Job(prompt=p, max_tokens=n, seed=seed, temperature=0.8, ignore_eos=True) for p, n, seed in asks]
        got = _collect(s, jobs, cancel_after=(1, 3))
        assert s.counts == {"completed": 4, "cancelled": 1, "failed": 0}
    finally:
        s.close()
    for i, (tokens, finish) in enumerate(got):
        if i == 1:  # cancelled from the event loop after its third token: stopped at the next step
            assert finish == "cancelled" and 3 <= len(tokens) < len(want[1]) and tokens == want[1][: len(tokens)]
        else:
            assert finish == "length" and tokens == want[i]
