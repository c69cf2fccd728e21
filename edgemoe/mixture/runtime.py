"""The fine level: one request served by the top-k of the enabled specialists.

For every request the gate weighs the specialists on the prompt; the top-k of the enabled ones
by weight serve it, their weights renormalised. At every step each of them gives its
next-token distribution, the distributions are mixed with those weights, a token is sampled
from the mixture and fed to each. Each specialist is a whole edgemoe model in a
`SpecialistServer`: a Ray actor pinned to its device's node (the nodes that offer the
`edgemoe` resource, found as the expert servers find theirs: cluster.connect), or a thread of
this process without Ray. A specialist that fails or does not answer within the timeout is
dropped: the weights are renormalised over the others and the request finishes; its Answer
says which specialist was dropped, at which token and why.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..cluster.channel import FORWARD, OK, REPLY, REQUEST, Listener, recv_frame, send_frame, shut
from ..cluster.connect import Node, connect, device_nodes
from ..converters.convert import convert
from ..devices import DeviceProfile, LinkProfile, load_link, load_profile
from ..errors import ClusterError, MixtureError
from ..format.manifest import blob_tables, load_manifest
from ..runtime import engine
from ..runtime.paths import cache_root
from ..runtime.sampling import Sampler
from ..runtime.tokenizer import Tokenizer
from .gate import Gate
from .select import WAIT_WINDOW, Choice, Costs, HeldoutLoss, costs_from_profiles, select, upper_quantile
from .spec import MixtureSpec

DEFAULT_TIMEOUT_S = 30.0  # how long a step waits for a specialist before dropping it
DEFAULT_CLASS = "default"
SETUP_TIMEOUT_S = 60.0  # connecting to a specialist's channel
METHODS = ("start", "step", "logits")  # what the coordinator calls per token, over the channel
SECONDS = struct.Struct("<d")  # an answer: the device's seconds, then float32 log-probabilities


def model_dir(path: Path) -> Path:
    """An edgemoe model directory for a specialist: the path itself when converted, else its
    conversion (8 bits) in the cache, made on first use."""
    if (path / "manifest.json").is_file():
        return path
    if not (path / "config.json").is_file():
        raise MixtureError(f"specialist directory {path} is neither an edgemoe model directory nor a checkpoint")
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = cache_root() / "mixture" / f"{path.name}-{h.hexdigest()[:12]}"
    if not (dst / "manifest.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        convert(path, dst, bits=8, progress=False, overwrite=True)
    return dst


def active_bytes(path: Path) -> float:
    """Weight bytes one decode token streams through: the backbone and top_k of each layer's
    experts (their mean size), from the model directory's manifest."""
    m = load_manifest(path)
    _, lengths, _, _ = blob_tables(m)
    ex = m["experts"]
    backbone = (path / m["backbone"]["file"]).stat().st_size
    return float(backbone + lengths.sum() * ex["top_k"] / max(1, ex["num_experts"]))


def mixture_costs(
    spec: MixtureSpec,
    devices: Sequence[str | DeviceProfile] | dict[str, Any],
    link: str | LinkProfile | None = None,
) -> Costs:
    """The cost model of a mixture's specialists (mixture.json's order) on device profiles,
    each reached over `link` (default: its profile's link)."""
    profiles = _profiles(spec.names, devices)
    assert profiles is not None
    dirs = [model_dir(s.path) for s in spec.specialists]
    vocab = int(load_manifest(dirs[0])["config"]["vocab_size"])
    link_p = load_link(link) if isinstance(link, str) else link
    links = [link_p] * len(profiles) if link_p is not None else None
    return costs_from_profiles(spec.names, [active_bytes(d) for d in dirs], profiles, vocab, links)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)


class SpecialistServer:
    """One specialist: a whole model answering next-token log-probabilities for one request at
    a time. The coordinator makes it a Ray actor pinned to its device, or runs it here.
    `pace_s`: the least seconds a token takes (emulates a slower device on the test bed)."""

    def __init__(self, path: str, name: str, threads: int = 0, pace_s: float = 0.0):
        self.name = name
        self.model = engine.load(path, threads=threads or None)
        self.pace_s = float(pace_s)
        self.pos = 0

    def info(self) -> dict[str, Any]:
        i = self.model.info()
        active = i["backbone_bytes"] + i["expert_bytes"] * i["top_k"] / max(1, i["experts_per_layer"])
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "vocab_size": i["vocab_size"],
            "active_bytes": float(active),
            "eos_ids": sorted(self.model.eos_ids),
        }

    def _timed(self, ids: np.ndarray, pos: int, all_logits: bool = False) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        logits = self.model.net.forward(ids, self.model.kv, pos, all_logits=all_logits)
        out = log_softmax(logits if all_logits else logits[-1])
        dt = time.perf_counter() - t0
        if dt < self.pace_s:
            time.sleep(self.pace_s - dt)
            dt = self.pace_s
        return out, dt

    def start(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """A fresh request: the prompt's next-token log-probabilities [vocab] and the seconds taken."""
        self.model.reset()
        arr = np.asarray(ids, dtype=np.int64)
        out = self._timed(arr, 0)
        self.pos = arr.size
        return out

    def step(self, token: int) -> tuple[np.ndarray, float]:
        """Feed the sampled token: the next log-probabilities and the seconds taken."""
        out = self._timed(np.array([int(token)], np.int64), self.pos)
        self.pos += 1
        return out

    def logits(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """Log-probabilities [len(ids), vocab] of a fresh sequence."""
        self.model.reset()
        return self._timed(np.asarray(ids, dtype=np.int64), 0, all_logits=True)

    def set_pace(self, seconds: float) -> None:
        """The least seconds each token takes from now on (a device slowing down, emulated)."""
        self.pace_s = float(seconds)

    def open_channel(self, host: str) -> tuple[str, int]:
        """Listen on `host` (this node's address) for the coordinator's per-token calls
        (cluster/channel.py's frames; `frame` answers each): (host, port) to connect to. The
        calls of one connection run in order on one thread of this process, beside Ray's."""
        if getattr(self, "listener", None) is None:
            self.listener = Listener(host, self.frame)
        return self.listener.address

    def frame(self, payload: bytes) -> bytes:
        """One call as the channel carries it: a method byte (METHODS) and int64 token ids; the
        answer: the device's seconds (float64) and the float32 log-probabilities."""
        if not payload or payload[0] >= len(METHODS):
            raise ValueError("not a specialist call")
        ids = np.frombuffer(payload, np.int64, offset=8)
        method = METHODS[payload[0]]
        lp, dt = self.step(int(ids[0])) if method == "step" else getattr(self, method)(ids)
        return SECONDS.pack(dt) + np.ascontiguousarray(lp, np.float32).tobytes()


class Gone(Exception):
    """A specialist did not answer: its process or node died, or it timed out."""


class Member:
    """A specialist as the coordinator calls it: `call` starts a method and returns a ticket,
    `done` says (without waiting) whether its answer is in, `result` takes it. `bind` gives
    the member a function to call when an answer lands, so that the coordinator can wait for
    several specialists at once and stop at a deadline."""

    name: str
    where: str
    wake: Callable[[], None] = staticmethod(lambda: None)

    def bind(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def done(self, ticket: Any) -> bool:
        raise NotImplementedError

    def result(self, ticket: Any, timeout_s: float) -> Any:
        raise NotImplementedError

    def forget(self, ticket: Any) -> None:
        """A call whose answer will not be taken (a late specialist's, when the request ends)."""

    def stop(self) -> None:
        pass


class LocalMember(Member):
    """A specialist in a thread of this process (the native core releases the GIL while it computes)."""

    def __init__(self, name: str, path: str, threads: int = 0, pace_s: float = 0.0):
        self.name, self.where = name, "this process"
        self.server = SpecialistServer(path, name, threads, pace_s)
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"specialist-{name}")

    def call(self, method: str, *args: Any) -> cf.Future[Any]:
        fut = self.pool.submit(getattr(self.server, method), *args)
        fut.add_done_callback(lambda _: self.wake())
        return fut

    def done(self, ticket: cf.Future[Any]) -> bool:
        return ticket.done()

    def result(self, fut: cf.Future[Any], timeout_s: float) -> Any:
        try:
            return fut.result(timeout=timeout_s)
        except cf.TimeoutError:
            raise Gone(f"no answer within {timeout_s:g} s") from None
        except Exception as e:  # the specialist failed: it is dropped, the request goes on
            raise Gone(f"{type(e).__name__}: {e}") from None

    def forget(self, ticket: cf.Future[Any]) -> None:
        ticket.cancel()  # not started yet: never computed

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Link:
    """The coordinator's TCP connection to a specialist's channel: calls go out as frames,
    several may be outstanding (the specialist answers them in order), and a thread reads the
    answers as they come. A closed connection or a garbled answer fails every call not yet
    answered (the specialist is then dropped)."""

    def __init__(self, host: str, port: int, wake: Callable[[], None]):
        self.sock = socket.create_connection((host, port), timeout=SETUP_TIMEOUT_S)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wake = wake
        self.seq = 0
        self.answers: dict[int, tuple[np.ndarray, float] | str] = {}
        self.rows: dict[int, int] = {}  # outstanding call -> rows its answer has
        self.unwanted: set[int] = set()  # outstanding calls whose answers are to be thrown away
        self.broken: str | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="edgemoe-specialist-link", daemon=True).start()

    def send(self, method: str, ids: np.ndarray) -> int:
        arr = np.ascontiguousarray(ids, np.int64).reshape(-1)
        with self.lock:
            if self.broken:
                raise Gone(self.broken)
            self.seq += 1
            seq = self.seq
            self.rows[seq] = arr.size if method == "logits" else 0
            body = bytes([METHODS.index(method)]) + bytes(7) + arr.tobytes()
            try:
                send_frame(self.sock, REQUEST.pack(seq, FORWARD, len(body)), body)
            except OSError as e:
                self._break(f"sending failed: {type(e).__name__}: {e}")
                raise Gone(self.broken or "") from None
        return seq

    def _read(self) -> None:
        try:
            while True:
                frame = recv_frame(self.sock, REPLY)
                if frame is None:
                    raise ConnectionError("the specialist closed the connection")
                seq, status, body = frame
                with self.lock:
                    rows = self.rows.pop(seq, None)
                    if rows is None:
                        raise ConnectionError(f"an answer to a call never made ({seq})")
                    if seq in self.unwanted:
                        self.unwanted.discard(seq)
                        continue
                    if status != OK:
                        self.answers[seq] = body.decode(errors="replace")
                    else:
                        lp = np.frombuffer(body, np.float32, offset=SECONDS.size)
                        self.answers[seq] = (lp.reshape(rows, -1) if rows else lp, SECONDS.unpack_from(body)[0])
                self.wake()
        except (OSError, ValueError) as e:
            with self.lock:
                self._break(f"{type(e).__name__}: {e}")
            self.wake()

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        shut(self.sock)

    def done(self, seq: int) -> bool:
        return seq in self.answers or self.broken is not None

    def forget(self, seq: int) -> None:
        with self.lock:
            if self.answers.pop(seq, None) is None and seq in self.rows:
                self.unwanted.add(seq)

    def take(self, seq: int) -> tuple[np.ndarray, float]:
        with self.lock:
            answer = self.answers.pop(seq, None)
            if answer is None:
                raise Gone(self.broken or "no answer")
        if isinstance(answer, str):
            raise Gone(answer)
        return answer

    def close(self) -> None:
        with self.lock:
            self._break("closed")
        self.sock.close()


class RayMember(Member):
    """A specialist as a Ray actor pinned to one node. Ray places, starts and watches it; the
    per-token calls (start, step, logits) then go over the actor's own TCP channel (`Link`),
    with no Ray task, object or scheduler per token; other calls are Ray calls. Until
    `connect` (load(transport="ray")) the per-token calls are Ray actor calls too: the path
    the channel is measured against (tools/mixture/fan_out.py)."""

    def __init__(self, name: str, path: str, node: Node, actor_class: Any, pace_s: float = 0.0):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.name, self.node, self.where = name, node, node.name
        self.link: Link | None = None
        self.handle = actor_class.options(
            num_cpus=0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(path, name, node.cpus, pace_s)

    def connect(self, timeout_s: float) -> None:
        """Open the actor's channel and connect to it (after the actor answered `info`)."""
        host, port = self.result(self.handle.open_channel.remote(self.node.address), timeout_s)
        self.link = Link(host, int(port), lambda: self.wake())

    def call(self, method: str, *args: Any) -> Any:
        if method in METHODS and self.link is not None:
            return self.link.send(method, args[0] if method != "step" else np.array([args[0]], np.int64))
        ref = getattr(self.handle, method).remote(*args)
        if method not in METHODS:
            return ref
        fut = ref.future()  # a per-token Ray call: the coordinator is woken when it lands
        fut.add_done_callback(lambda _: self.wake())
        return fut

    def forget(self, ticket: Any) -> None:
        if isinstance(ticket, int) and self.link is not None:
            self.link.forget(ticket)

    def done(self, ticket: Any) -> bool:
        if isinstance(ticket, int):
            return self.link is not None and self.link.done(ticket)
        if isinstance(ticket, cf.Future):
            return ticket.done()
        import ray

        ready, _ = ray.wait([ticket], timeout=0)
        return bool(ready)

    def result(self, fut: Any, timeout_s: float) -> Any:
        if isinstance(fut, int):
            assert self.link is not None
            deadline = time.perf_counter() + timeout_s
            while not self.link.done(fut):  # the coordinator waits on `done`; this is for the rare direct call
                if time.perf_counter() >= deadline:
                    raise Gone(f"no answer within {timeout_s:g} s")
                time.sleep(0.0005)
            return self.link.take(fut)
        import ray

        try:
            return fut.result(timeout=timeout_s) if isinstance(fut, cf.Future) else ray.get(fut, timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, cf.TimeoutError):
            raise Gone(f"no answer within {timeout_s:g} s") from None
        except ray.exceptions.RayError as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
            raise Gone(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None

    def stop(self) -> None:
        import ray

        if self.link is not None:
            self.link.close()
        try:
            ray.kill(self.handle)
        except Exception:  # already gone is what we want
            pass


@dataclasses.dataclass
class Answer:
    """One request's result and what happened to it."""

    tokens: list[int]
    text: str | None
    specialists: list[str]  # the top-k that served it, best first
    weights: list[float]  # their renormalised gate weights at the start
    dropped: list[dict[str, Any]]  # {"name", "at_token", "why"} of each specialist dropped mid-request
    finish: str  # "stop" (EOS) or "length"
    seconds_per_token: list[float]  # each generated token's wall time (the first includes the prompt)
    request_class: str = DEFAULT_CLASS
    # per specialist, the tokens whose step's deadline its distribution missed: those tokens
    # were mixed from the others (weights renormalised over them); it was still fed each token
    late: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    latency_budget_s: float | None = None  # the step deadline's budget, if the class has one

    @property
    def note(self) -> str:
        """What a user is told when specialists were dropped or left out of steps ("" when none was)."""
        parts = []
        if self.late:
            parts += [
                f"specialist {n} missed the {self.latency_budget_s * 1e3:.3g} ms step deadline at "
                f"{len(t)} of {len(self.tokens)} tokens (mixed without it there)"
                for n, t in self.late.items()
                if self.latency_budget_s is not None
            ]
        if self.dropped:
            left = [s for s in self.specialists if s not in {d["name"] for d in self.dropped}]
            parts += [f"specialist {d['name']} was dropped at token {d['at_token']} ({d['why']})" for d in self.dropped]
            return "; ".join(parts) + f"; the answer was finished by {', '.join(left)} with renormalised weights"
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "note": self.note}


@dataclasses.dataclass
class _Record:
    tokens: int = 0
    device_seconds: float = 0.0
    wait_seconds: float = 0.0
    requests: int = 0
    failures: int = 0
    late: int = 0  # steps whose deadline its answer missed
    decode_tokens: int = 0  # tokens computed after a request's prompt (the unit of the energy budget)
    decode_device_seconds: float = 0.0
    up: bool = True
    error: str | None = None


class Mixture:
    """A mixture of specialists, used as one model: generate, logits, stats, plan."""

    def __init__(
        self,
        spec: MixtureSpec,
        gate: Gate,
        members: dict[str, Member],
        costs: Costs | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        owns_ray: bool = False,
    ):
        self.spec, self.gate, self.members = spec, gate, members
        self.names = list(gate.names)  # the gate's order: weights index by it
        self.top_k = spec.top_k
        self.costs = costs
        self.timeout_s = float(timeout_s)
        self.owns_ray = owns_ray
        first = spec.specialist(self.names[0]).path
        self._tok_dir = model_dir(first)
        self._tokenizer: Tokenizer | None = None
        infos = {n: m.result(m.call("info"), self.timeout_s) for n, m in members.items()}
        self.infos = infos
        self.vocab = int(infos[self.names[0]]["vocab_size"])
        for n, i in infos.items():
            if int(i["vocab_size"]) != self.vocab:
                raise MixtureError(
                    f"specialist {n} has a vocabulary of {i['vocab_size']} tokens, {self.names[0]} of {self.vocab}: "
                    "make every specialist with the mixture's tokenizer"
                )
        self.eos_ids = set(infos[self.names[0]]["eos_ids"])
        self.enabled: dict[str, list[str]] = {DEFAULT_CLASS: list(self.names)}
        self.budgets: dict[str, float] = {}  # per request class: the latency budget a step's deadline keeps
        self._cv = threading.Condition()
        for m in members.values():
            m.bind(self._wake)
        self.mix_seconds: collections.deque[float] = collections.deque(maxlen=WAIT_WINDOW)
        self.choices: dict[str, Choice] = {}
        self.records = {n: _Record() for n in self.names}
        self.requests = 0
        self.tokens_generated = 0
        self.seconds = 0.0
        self.dropped: list[dict[str, Any]] = []
        self.last: Answer | None = None

    # -- text ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._tok_dir)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- the coarse level ----------------------------------------------------------------------
    def heldout_loss(self) -> HeldoutLoss:
        return HeldoutLoss.load(self.spec, self.gate)

    def plan(
        self, energy_budget: float, latency_budget: float | dict[str, float], heldout: HeldoutLoss | None = None
    ) -> dict[str, Choice]:
        """Enable, per request class, the specialists `select` chooses under the energy budget
        (joules per token) and the class's latency budget (seconds per token; a number is the
        default class's). The costs are the profiles' corrected by what was measured so far."""
        if self.costs is None:
            raise MixtureError(
                "the mixture has no cost model: load it with device profiles for its specialists "
                "(load_mixture(MIX, devices=[...]) or --devices) to plan under budgets"
            )
        budgets = latency_budget if isinstance(latency_budget, dict) else {DEFAULT_CLASS: float(latency_budget)}
        h = heldout or self.heldout_loss()
        order = [self.costs.names.index(n) for n in self.names]
        energy, latency = self.costs.energy_j[order], self.costs.latency_s[order]
        out = {}
        for cls, lb in budgets.items():
            out[cls] = select(
                h.loss,
                energy,
                latency,
                energy_budget,
                lb,
                names=self.names,
                fan_out_s=self.costs.fan_out_s,
                top_k=self.top_k,
            )
        for cls, c in out.items():
            self.enabled[cls] = [self.names[i] for i in c.enabled]
            self.budgets[cls] = float(budgets[cls])
        self.choices.update(out)
        return out

    def enable(
        self, names: Sequence[str], request_class: str = DEFAULT_CLASS, latency_budget: float | None = None
    ) -> None:
        """Enable these specialists for a request class; with `latency_budget` (seconds per
        token) each step waits for their distributions until the budget, less the mixing's
        own time, runs out (see `generate`); without it each step waits for all of them."""
        unknown = [n for n in names if n not in self.names]
        if unknown or not names:
            raise MixtureError(f"cannot enable {list(names)}: the mixture's specialists are {self.names}")
        if latency_budget is not None and not latency_budget > 0:
            raise MixtureError(f"latency budget {latency_budget!r}: give seconds per token, above 0")
        self.enabled[request_class] = list(names)
        if latency_budget is None:
            self.budgets.pop(request_class, None)
        else:
            self.budgets[request_class] = float(latency_budget)

    # -- the fine level ----------------------------------------------------------------------
    def route(
        self, ids: Sequence[int] | np.ndarray, request_class: str = DEFAULT_CLASS
    ) -> tuple[list[str], np.ndarray]:
        """The top-k of the enabled specialists for a prompt, best first, and their renormalised weights."""
        if request_class not in self.enabled:
            raise MixtureError(f"no plan for request class {request_class!r}; planned: {sorted(self.enabled)}")
        live = [n for n in self.enabled[request_class] if self.records[n].up]
        if not live:
            raise MixtureError(
                f"every enabled specialist of class {request_class!r} is down "
                f"({', '.join(f'{n}: {self.records[n].error}' for n in self.enabled[request_class])}): plan again"
            )
        w = self.gate.weights(np.asarray(ids), enabled=live)
        order = [i for i in np.argsort(-w, kind="stable") if self.names[i] in live][: self.top_k]
        chosen = np.array([w[i] for i in order], np.float64)
        chosen = chosen / chosen.sum() if chosen.sum() > 0 else np.full(len(order), 1.0 / len(order))
        return [self.names[i] for i in order], chosen

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def mix_estimate(self) -> float:
        """What a step takes beyond its specialists' answers (mixing, sampling, sending the
        token): the 95th percentile of recent steps; a step's deadline leaves it this much."""
        return upper_quantile(self.mix_seconds) if self.mix_seconds else 0.0

    def _drop(self, name: str, why: str, weights: dict[str, float], at_token: int, answer: Answer | None) -> None:
        r = self.records[name]
        r.up, r.error, r.failures = False, why, r.failures + 1
        event = {"name": name, "at_token": at_token, "why": why}
        self.dropped.append(event)
        if answer is not None:
            answer.dropped.append(event)
        weights.pop(name, None)
        self.members[name].stop()

    def _gather(
        self,
        latest: dict[str, tuple[Any, float]],
        weights: dict[str, float],
        at_token: int,
        answer: Answer | None,
        deadline: float | None = None,
        stale: dict[str, list[tuple[Any, float]]] | None = None,
    ) -> dict[str, np.ndarray]:
        """The log-probabilities of the specialists that answered their latest call
        (latest[name] = (ticket, time sent)). Without a deadline it waits for all; with one
        (time.perf_counter) it stops there if at least one answered, else at the first answer.
        A specialist that failed, or whose oldest unanswered call is older than the timeout,
        is dropped (removed from `weights` and `latest`, the others renormalised); one that
        has not answered by the deadline is late: left out of this step, kept for the next.
        `stale`: calls of late specialists whose answers are no longer wanted (their device
        time still counts)."""
        stale = stale if stale is not None else {}
        t_wait = time.perf_counter()
        hard = t_wait + self.timeout_s
        with self._cv:
            while True:
                ready = [n for n, (t, _) in latest.items() if self.members[n].done(t)]
                now = time.perf_counter()
                if len(ready) == len(latest) or now >= hard:
                    break
                if deadline is not None and now >= deadline and ready:
                    break
                until = hard if deadline is None or now >= deadline else min(deadline, hard)
                self._cv.wait(max(until - now, 0.0))
        now = time.perf_counter()
        out: dict[str, np.ndarray] = {}
        for name in list(latest):
            m, r = self.members[name], self.records[name]
            try:
                for old in list(stale.get(name, ())):
                    if m.done(old[0]):
                        _, dt = m.result(old[0], 0.0)
                        stale[name].remove(old)
                        r.device_seconds += dt
                        r.tokens += 1
                        r.decode_device_seconds += dt
                        r.decode_tokens += 1
                        if self.costs is not None and name in self.costs.names:
                            self.costs.measured(name, dt)
                ticket, sent = latest[name]
                if not m.done(ticket):
                    oldest = min([sent] + [t for _, t in stale.get(name, ())])
                    if now - oldest >= self.timeout_s:
                        raise Gone(f"no answer within {self.timeout_s:g} s")
                    r.late += 1
                    if answer is not None:
                        answer.late.setdefault(name, []).append(at_token)
                    continue
                lp, dt = m.result(ticket, 0.0)
            except Gone as e:
                self._drop(name, str(e), weights, at_token, answer)
                latest.pop(name)
                continue
            r.wait_seconds += now - t_wait
            r.device_seconds += dt
            r.tokens += 1
            if at_token > 0:
                r.decode_device_seconds += dt
                r.decode_tokens += 1
            if at_token > 0 and self.costs is not None and name in self.costs.names:
                self.costs.measured(name, dt)
            out[name] = lp
        if not out:
            raise MixtureError(
                "every specialist serving the request failed ("
                + "; ".join(f"{n}: {self.records[n].error}" for n in self.records if not self.records[n].up)
                + "): check the devices (`ray status`) and load the mixture again"
            )
        total = sum(weights.values())
        for n in weights:
            weights[n] = weights[n] / total
        return out

    @staticmethod
    def _mix(lps: dict[str, np.ndarray], weights: dict[str, float], exact: bool = True) -> np.ndarray:
        """log sum_i w_i p_i. exact: in log space (pairwise logaddexp, float32); else, for a
        decode step whose own time counts against its budget, as probabilities in float32
        (numpy's exp is vectorised, its logaddexp is not: about 6x faster), where a token all
        of whose probabilities are below float32's smallest normal (1e-38, never sampled) gets
        that floor's log."""
        if len(lps) == 1:
            ((n, lp),) = lps.items()
            return lp if weights[n] == 1.0 else lp + np.float32(np.log(weights[n]))
        out: np.ndarray | None = None
        for n, lp in lps.items():
            w = float(weights[n])
            if exact:
                z = lp + np.float32(np.log(w))
                out = z if out is None else np.logaddexp(out, z)
            else:
                p = np.exp(lp)
                p *= np.float32(w)
                out = p if out is None else np.add(out, p, out=out)
        assert out is not None
        if not exact:
            np.maximum(out, np.finfo(np.float32).tiny, out=out)
            np.log(out, out=out)
        return out

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = arr[(arr < 0) | (arr >= self.vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab - 1})")
        return arr

    def _generate_ids(self, ids: Sequence[int], max_new_tokens: int, sampler: Sampler, answer: Answer) -> Iterator[int]:
        arr = self._check_ids(ids)
        names, w = self.route(arr, answer.request_class)
        answer.specialists, answer.weights = names, [float(x) for x in w]
        budget = self.budgets.get(answer.request_class) if len(names) > 1 else None
        answer.latency_budget_s = budget
        weights = dict(zip(names, w.tolist()))  # renormalised when a specialist is dropped
        self.requests += 1
        for n in names:
            self.records[n].requests += 1
        t0 = time.perf_counter()
        latest = {n: (self.members[n].call("start", arr), t0) for n in names}
        stale: dict[str, list[tuple[Any, float]]] = {n: [] for n in names}
        try:
            for i in range(max_new_tokens):
                # a decode step keeps the budget: what has not answered when it runs out (less
                # the mixing's own time) is left out of this step; the prompt's step waits for all
                deadline = t0 + budget - self.mix_estimate() if budget is not None and i > 0 else None
                lps = self._gather(latest, weights, i, answer, deadline, stale)
                t_mix = time.perf_counter()
                total = sum(weights[n] for n in lps)
                token = sampler(self._mix(lps, {n: weights[n] / total for n in lps}, exact=False))
                now = time.perf_counter()
                answer.seconds_per_token.append(now - t0)
                self.seconds += now - t0
                self.tokens_generated += 1
                t0 = now
                answer.tokens.append(token)
                yield token
                if token in self.eos_ids:
                    answer.finish = "stop"
                    return
                if i == max_new_tokens - 1:
                    return
                t_send = time.perf_counter()
                for n in list(latest):
                    if n not in lps:  # late: its answer to the last call is not wanted any more
                        stale[n].append(latest[n])
                    try:
                        latest[n] = (self.members[n].call("step", token), time.perf_counter())
                    except Gone as e:
                        self._drop(n, str(e), weights, i + 1, answer)
                        latest.pop(n)
                # the step's own time: mixing and sampling, and sending the token
                self.mix_seconds.append((now - t_mix) + (time.perf_counter() - t_send))
        finally:
            for n, calls in stale.items():  # late specialists' unanswered calls
                for ticket, _ in calls + ([latest[n]] if n in latest else []):
                    self.members[n].forget(ticket)
            # the request's time per decode token (the unit of a latency budget) corrects the
            # latency the plan sees: the first token also carries the prompt. A request whose
            # steps left a specialist out measured less than its set's latency: not a sample
            decode = answer.seconds_per_token[1:]
            if decode and not answer.dropped and not answer.late and self.costs is not None:
                self.costs.request(names, float(np.mean(decode)), self.top_k)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        request_class: str = DEFAULT_CLASS,
    ) -> Iterator[int]:
        """Token ids one by one; `self.last` is the request's Answer (filled as it goes)."""
        text = isinstance(prompt, str)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        answer = Answer([], "" if text else None, [], [], [], "length", [], request_class)
        self.last = answer
        return self._generate_ids(ids, max_new_tokens, Sampler(temperature, top_k, top_p, seed), answer)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        request_class: str = DEFAULT_CLASS,
        details: bool = False,
    ) -> Any:
        """Continue a prompt as one model would: text in -> text out, token ids in -> token ids
        out; with details=True the Answer (tokens, text, the specialists that served it, the
        ones dropped mid-request and why, time per token)."""
        tokens = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, request_class))
        answer = self.last
        assert answer is not None
        if answer.text is not None:
            answer.text = self.decode([t for t in tokens if t not in self.eos_ids])
        if details:
            return answer
        return answer.text if answer.text is not None else tokens

    def logits(self, ids: Sequence[int], request_class: str = DEFAULT_CLASS) -> np.ndarray:
        """float32 log-probabilities [len(ids), vocab] of the gated mixture on a fresh sequence
        (the gate weighs the specialists on `ids`)."""
        arr = self._check_ids(ids)
        names, w = self.route(arr, request_class)
        weights = dict(zip(names, w.tolist()))
        t0 = time.perf_counter()
        latest = {n: (self.members[n].call("logits", arr), t0) for n in names}
        return self._mix(self._gather(latest, weights, 0, None), weights).astype(np.float32)

    # -- accounting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Requests, tokens and time per token of the mixture; per specialist where it runs,
        its tokens, device seconds per token, the wait for it, failures; the dropped events."""
        per = {}
        for n in self.names:
            r = self.records[n]
            per[n] = {
                "where": self.members[n].where,
                "up": r.up,
                "error": r.error,
                "requests": r.requests,
                "tokens": r.tokens,
                "device_seconds_per_token": r.device_seconds / r.tokens if r.tokens else 0.0,
                "device_seconds_per_decode_token": (
                    r.decode_device_seconds / r.decode_tokens if r.decode_tokens else 0.0
                ),
                "wait_seconds_per_token": r.wait_seconds / r.tokens if r.tokens else 0.0,
                "failures": r.failures,
                "late_steps": r.late,
            }
        return {
            "requests": self.requests,
            "tokens_generated": self.tokens_generated,
            "seconds_per_token": self.seconds / self.tokens_generated if self.tokens_generated else 0.0,
            "enabled": dict(self.enabled),
            "latency_budgets_s": dict(self.budgets),
            "mix_seconds_p95": self.mix_estimate(),
            "specialists": per,
            "dropped": list(self.dropped),
            "costs": self.costs.table() if self.costs is not None else None,
        }

    def close(self) -> None:
        for m in self.members.values():
            m.stop()
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> Mixture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _profiles(
    spec_names: list[str], devices: Sequence[str | DeviceProfile] | dict[str, Any] | None
) -> list[DeviceProfile] | None:
    if devices is None:
        return None
    if isinstance(devices, dict):
        missing = [n for n in spec_names if n not in devices]
        if missing:
            raise MixtureError(f"no device profile for specialists {missing}: give one per specialist")
        seq = [devices[n] for n in spec_names]
    else:
        seq = list(devices)
        if len(seq) == 1:
            seq = seq * len(spec_names)
        if len(seq) != len(spec_names):
            raise MixtureError(
                f"{len(seq)} device profiles for {len(spec_names)} specialists ({', '.join(spec_names)}): "
                "give one per specialist, in mixture.json's order, or one for all"
            )
    return [p if isinstance(p, DeviceProfile) else load_profile(p) for p in seq]


def load(
    mix_dir: str | os.PathLike[str],
    *,
    cluster: str | None = None,
    devices: Sequence[str | DeviceProfile] | dict[str, Any] | None = None,
    link: str | LinkProfile | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 0,
    pace_scale: float = 0.0,
    transport: str = "channel",
) -> Mixture:
    """Open a mixture directory (mixture.json, its specialists, gate.onnx, heldout.npz).

    cluster: run each specialist as a Ray actor on a node of the cluster at this address
    ("auto", "HOST:PORT", "ray://HOST:PORT"), specialist i on the i-th node offering the
    `edgemoe` resource (round robin); None runs them in threads of this process. devices: a
    device profile per specialist (mixture.json's order; one name for all) for the cost
    model `plan` uses; link: the link to every device (default: each profile's). pace_scale: each
    specialist takes at least this many times its profile's predicted time per token (slower
    devices emulated on one machine; 0: none). timeout_s: how long a step waits for a specialist before dropping it.
    transport: how the per-token calls reach Ray actors: "channel" (each actor's own TCP
    connection, the default) or "ray" (Ray actor calls, slower: kept to measure against).
    Raises MixtureError (and its kinds: another tokenizer, a gate for other specialists)."""
    if transport not in ("channel", "ray"):
        raise MixtureError(f"transport {transport!r}: use 'channel' (the default) or 'ray'")
    spec = MixtureSpec.load(Path(mix_dir))
    gate = Gate.load(spec)
    names = list(gate.names)
    paths = {s.name: str(model_dir(s.path)) for s in spec.specialists}
    costs = mixture_costs(spec, devices, link) if devices is not None else None
    pace_of = {
        n: (pace_scale * float(costs.seconds[costs.names.index(n)]) if costs is not None else 0.0) for n in names
    }
    members: dict[str, Member] = {}
    owns = False
    try:
        if cluster is None:
            for n in names:
                members[n] = LocalMember(n, paths[n], threads, pace_of[n])
        else:
            import ray

            owns = connect(cluster)
            nodes = device_nodes()
            if not nodes:
                raise ClusterError(
                    f"the cluster at {cluster} has no live node offering the 'edgemoe' resource: join each device "
                    "with `ray start --address=HEAD_IP:6379 --resources='{\"edgemoe\": 1}'`"
                )
            actor = ray.remote(SpecialistServer)
            for i, n in enumerate(spec.names):
                members[n] = RayMember(n, paths[n], nodes[i % len(nodes)], actor, pace_of[n])
            for m in members.values():
                assert isinstance(m, RayMember)
                if transport == "channel":
                    try:
                        m.connect(max(timeout_s, SETUP_TIMEOUT_S))
                    except (Gone, OSError) as e:
                        raise ClusterError(
                            f"specialist {m.name} on node {m.where} did not start or cannot be reached ({e}): "
                            "check the node (`ray status`) and load the mixture again"
                        ) from None
        return Mixture(spec, gate, members, costs, timeout_s, owns)
    except BaseException:
        for m in members.values():
            m.stop()
        if owns:
            import ray

            ray.shutdown()
        raise
