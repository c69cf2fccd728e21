"""Continuous batching: several generations share each decode step of one Model.

A DecodeBatch holds live Sequences, each with its own KV cache, position, sampler and text
stream. A sequence joins with its prompt prefilled alone, then every step() runs one decode
token of all live sequences through DecoderLM.forward_batch, where each MoE layer fetches
a routed expert once for all the rows that chose it. Sequences leave as they finish or are
cancelled, between steps. Each one gets the Steps Model.stream would give it alone: the same
tokens (greedy or seeded), the same stop strings, EOS and length rules.

    batch = DecodeBatch(model)
    first = batch.add(Sequence(model, ids, max_new_tokens=32, seed=1))
    while batch.live:
        for seq, step in batch.step(): ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from .generation import Step, TextStream
from .sampling import Sampler

if TYPE_CHECKING:
    from .engine import Model


class Sequence:
    """One generation in a DecodeBatch; the arguments are Model.stream's."""

    def __init__(
        self,
        model: Model,
        prompt: Seq[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Seq[str] = (),
        ignore_eos: bool = False,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 in a batch, got {max_new_tokens}")
        self.prompt = model._check_ids(prompt)
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(temperature, top_k, top_p, seed)
        self.text = TextStream(model.decode, stop)
        self.ignore_eos = ignore_eos
        self.eos_ids = model.eos_ids
        self.kv = model.net.new_kv_cache()
        self.pos = 0  # where the next token goes in kv
        self.last = -1  # the token the next step feeds
        self.generated = 0
        self.finish: str | None = None

    def _take(self, logits: np.ndarray) -> Step:
        """Sample the next token from logits [vocab] and turn it into a Step as Model.stream does."""
        token = self.sampler(logits)
        self.generated += 1
        self.last = token
        if token in self.eos_ids and not self.ignore_eos:
            return self._end(Step(token, self.text.flush(), "stop"))
        piece = self.text.push(token)
        if self.text.stopped:
            return self._end(Step(token, piece, "stop"))
        if self.generated == self.max_new_tokens:
            return self._end(Step(token, piece + self.text.flush(), "length"))
        return Step(token, piece)

    def _end(self, step: Step) -> Step:
        self.finish = step.finish
        return step

    def cancel(self) -> Step:
        """The last Step of a cancelled sequence: no token, the text held back."""
        return self._end(Step(None, self.text.flush(), "cancelled"))

    def kv_bytes(self) -> int:
        return self.kv.nbytes()


class DecodeBatch:
    """The live sequences of one Model and their shared decode steps (one thread drives it)."""

    def __init__(self, model: Model):
        self.model = model
        self.live: list[Sequence] = []

    def add(self, seq: Sequence) -> Step:
        """Prefill seq's prompt alone and give its first token's Step; the sequence stays in
        the batch unless that Step finished it."""
        m = self.model
        t0 = time.perf_counter()
        logits = m.net.forward(seq.prompt, seq.kv, 0, all_logits=False)
        m._finish_preload()
        m._counters["prefill_seconds"] += time.perf_counter() - t0
        m._counters["prompt_tokens"] += len(seq.prompt)
        seq.pos = len(seq.prompt)
        step = seq._take(logits[-1])
        if seq.finish is None:
            self.live.append(seq)
        return step

    def remove(self, seq: Sequence) -> Step:
        """Take seq out between steps (its client went away): its cancelled Step."""
        self.live.remove(seq)
        return seq.cancel()

    def step(self) -> list[tuple[Sequence, Step]]:
        """One decode token of every live sequence; finished ones leave the batch."""
        live = self.live
        if not live:
            return []
        m = self.model
        t0 = time.perf_counter()
        ids = np.array([s.last for s in live], dtype=np.int64)
        logits = m.net.forward_batch(ids, [s.kv for s in live], [s.pos for s in live])  # [B, vocab]
        m._counters["decode_seconds"] += time.perf_counter() - t0
        m._counters["tokens_generated"] += len(live)
        out = []
        for b, seq in enumerate(live):
            seq.pos += 1
            out.append((seq, seq._take(logits[b])))
        self.live = [s for s in live if s.finish is None]
        return out

    def kv_bytes(self) -> int:
        """The live sequences' KV caches."""
        return sum(s.kv_bytes() for s in self.live)
