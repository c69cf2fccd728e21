"""One model, many requests: a FIFO queue served by one generation thread.

With batch=1 one generation runs at a time on the Model's own KV cache, every request
sharing the same resident experts. With batch=N > 1 the thread decodes up to N requests
together (continuous batching, runtime/batch.py): a waiting request joins between two steps
(its prompt prefilled alone), each step runs one token of every live request with each
routed expert fetched once for all of them, and a request leaves when it finishes or its
client goes away; each holds its own KV cache, counted by Model.memory_needed(sequences=N).
Tokens go back to the event loop that asked as they are made; a request whose client went
away is cancelled: dropped from the queue, or stopped before its next forward pass."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..runtime import batch as decode_batch
from ..runtime.engine import Model
from ..runtime.generation import Step

RATE_WINDOW_S = 10.0  # tokens/s over the last seconds


@dataclass
class Job:
    """One request's generation: what to generate, and where its events go.

    Events put on .events, in order: ("token", text, token_id) per token, then one
    ("done", finish_reason) or ("error", exception)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    submitted: float = 0.0
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, *event: Any) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Runs Jobs on a thread of its own, in the order submitted: one at a time (batch=1) or
    up to `batch` decoded together."""

    def __init__(self, model: Model, max_queue: int = 256, batch: int = 1):
        if batch < 1:
            raise ValueError(f"batch must be at least 1 (1: one request at a time), got {batch}")
        self.model = model
        self.max_queue = max_queue
        self.batch = batch
        self.live: list[Job] = []  # batch > 1: the requests being decoded together
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.waiting = 0
        self.running: Job | None = None
        # totals since start, for /metrics
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.busy_seconds = 0.0
        self.ttft: deque[float] = deque(maxlen=1000)  # seconds from submission to the first token
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per token made
        self.started_at = time.time()
        self.started_perf = time.perf_counter()
        run = self._run if batch == 1 else self._run_batched
        self._thread = threading.Thread(target=run, name="edgemoe-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue a job; QueueFullError when max_queue jobs already wait."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFullError(
                    f"{self.waiting} requests are waiting already (--max-queue {self.max_queue}): retry later"
                )
            self.waiting += 1
        job.id = next(self._ids)
        job.submitted = time.perf_counter()
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Stop after the job that is running; queued ones are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job._emit("done", "cancelled")
        self._queue.put(None)
        self._thread.join(timeout=30)

    def running_count(self) -> int:
        """Requests generating now."""
        return len(self.live) if self.batch > 1 else int(self.running is not None)

    def tokens_per_second(self) -> float:
        """Tokens made per second over the last RATE_WINDOW_S seconds."""
        now = time.perf_counter()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            span = min(RATE_WINDOW_S, now - self.started_perf)
            return sum(n for _, n in self._recent) / max(span, 1e-3)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
            if job.cancelled.is_set():  # its client left while it waited
                self._finish(job, "cancelled")
                continue
            self.running = job
            try:
                self._generate(job)
            except Exception as e:  # reported to this request's client; the server goes on
                job.finished = time.perf_counter()
                with self._lock:
                    self.counts["failed"] += 1
                job._emit("error", e)
            finally:
                self.running = None

    def _generate(self, job: Job) -> None:
        job.started = time.perf_counter()
        steps = self.model.stream(
            job.prompt,
            max_new_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            stop=job.stop,
            cancel=job.cancelled.is_set,
            ignore_eos=job.ignore_eos,
        )
        finish = "length"
        with self._lock:
            self.prompt_tokens += len(job.prompt)
        for step in steps:
            self._on_step(job, step)
            if step.finish:
                finish = step.finish
        self.busy_seconds += time.perf_counter() - job.started
        self._finish(job, finish)

    def _on_step(self, job: Job, step: Step) -> None:
        now = time.perf_counter()
        if step.token is not None:
            if job.first_token is None:
                job.first_token = now
                self.ttft.append(now - job.submitted)
            job.completion_tokens += 1
            with self._lock:
                self.completion_tokens += 1
                self._recent.append((now, 1))
        if step.text:
            job._emit("token", step.text, step.token)

    # -- batch > 1 ------------------------------------------------------------------
    def _run_batched(self) -> None:
        batch = decode_batch.DecodeBatch(self.model)
        seqs: dict[int, decode_batch.Sequence] = {}  # job id -> its sequence
        while True:
            # join: block for work only when nothing is being decoded
            while len(self.live) < self.batch:
                try:
                    job = self._queue.get(block=not self.live)
                except queue.Empty:
                    break
                if job is None:
                    for j in self.live:
                        self._finish(j, "cancelled")
                    return
                with self._lock:
                    self.waiting -= 1
                self._join(batch, seqs, job)
            if not self.live:
                continue
            t0 = time.perf_counter()
            try:
                steps = batch.step()
            except Exception as e:  # the step is shared: every request in it gets the error
                for j in self.live:
                    self._fail(j, e)
                self.live, batch.live = [], []
                seqs.clear()
                continue
            self.busy_seconds += time.perf_counter() - t0
            by_seq = {id(s): step for s, step in steps}
            for job in list(self.live):
                seq = seqs[job.id]
                step = by_seq[id(seq)]
                self._on_step(job, step)
                if step.finish is None and job.cancelled.is_set():  # before the next step
                    step = batch.remove(seq)
                    self._on_step(job, step)
                if step.finish is not None:
                    self.live.remove(job)
                    del seqs[job.id]
                    self._finish(job, step.finish)

    def _join(self, batch: decode_batch.DecodeBatch, seqs: dict[int, decode_batch.Sequence], job: Job) -> None:
        """Prefill a waiting job's prompt and give its first token; it joins the live ones
        unless that finished it."""
        if job.cancelled.is_set():  # its client left while it waited
            self._finish(job, "cancelled")
            return
        job.started = time.perf_counter()
        try:
            seq = decode_batch.Sequence(
                self.model,
                job.prompt,
                max_new_tokens=job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                seed=job.seed,
                stop=job.stop,
                ignore_eos=job.ignore_eos,
            )
            with self._lock:
                self.prompt_tokens += len(job.prompt)
            step = batch.add(seq)
        except Exception as e:  # this request's prompt failed: the others go on
            self._fail(job, e)
            return
        self.busy_seconds += time.perf_counter() - job.started
        self._on_step(job, step)
        if step.finish is None and job.cancelled.is_set():
            step = batch.remove(seq)
            self._on_step(job, step)
        if step.finish is not None:
            self._finish(job, step.finish)
            return
        seqs[job.id] = seq
        self.live.append(job)

    def _fail(self, job: Job, e: Exception) -> None:
        job.finished = time.perf_counter()
        with self._lock:
            self.counts["failed"] += 1
        job._emit("error", e)

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = time.perf_counter()
        job.finish_reason = reason
        with self._lock:
            self.counts["cancelled" if reason == "cancelled" else "completed"] += 1
        job._emit("done", reason)


class QueueFullError(Exception):
    """Too many requests wait already."""
