"""One model, many requests: a FIFO queue served by one generation thread.

A Model holds one KV cache and one expert cache under one budget, so one generation runs at a
time and every request shares the same resident experts; nothing a request adds (a queue
entry, its token list) grows with the model. Tokens go back to the event loop that asked as
they are made; a request whose client went away is cancelled: dropped from the queue, or
stopped before its next forward pass."""

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

from ..runtime.engine import Model

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
    """Runs Jobs one at a time on a thread of its own, in the order submitted."""

    def __init__(self, model: Model, max_queue: int = 256):
        self.model = model
        self.max_queue = max_queue
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
        self._thread = threading.Thread(target=self._run, name="edgemoe-generate", daemon=True)
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
            if step.finish:
                finish = step.finish
        self.busy_seconds += time.perf_counter() - job.started
        self._finish(job, finish)

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = time.perf_counter()
        job.finish_reason = reason
        with self._lock:
            self.counts["cancelled" if reason == "cancelled" else "completed"] += 1
        job._emit("done", reason)


class QueueFullError(Exception):
    """Too many requests wait already."""
