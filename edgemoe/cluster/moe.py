"""One model's experts across the devices of a Ray cluster (docs/cluster.md).

The coordinator (the process that loaded the model) keeps the backbone and runs every
layer. `ClusterMoE` replaces the model's routed-expert computation (DecoderLM.moe_override):
at each MoE layer it sends each device holding some of the call's experts one call with all
their rows, computes its own experts through the cache meanwhile (moe_forward_slots), and
sums every slot with moe_forward's arithmetic (combine_slots), so the tokens are the ones a
single device gives. Which device computes which expert is a placement plan (placement.py:
plan_placement over the devices' measured figures, or a plan given), followed call by call
by its Dispatcher. A device that errs, dies or misses the deadline has its slots computed
locally for that call and is marked down: its experts go to their other replicas or the
coordinator's flash at once, and a thread plans again for the devices left. A device that
joins the cluster is seen by a watcher thread and gets experts at the next plan.

    m = edgemoe.load(path, cluster="auto")      # or attach(model, "HOST:PORT")
    m.stats()["cluster"]                        # calls, bytes, failures, the plan and its history
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..devices import load_link, load_profile
from ..errors import ClusterError, PlacementError
from ..format.manifest import blob_tables
from ..format.quant import input_rounds_to_int8
from ..runtime.engine import Model
from ..units import format_bytes, parse_bytes
from .channel import PING, Channel, receive
from .connect import RESOURCE, Node, connect, device_nodes
from .placement import CoordinatorSpec, DeviceSpec, Dispatcher, Plan, format_plan, model_inputs, plan_placement
from .server import (
    DEVICE_SECONDS,
    FORM_ROUNDED,
    ExpertServer,
    call_form,
    expert_rate,
    pack_call,
    rows_round_to_int8,
)

Pair = tuple[int, int]  # (layer, expert)
Assignment = dict[str, list[Pair]]  # device name -> the experts it holds

DEFAULT_TIMEOUT_S = 0.5  # a device that has not answered a layer's call by then is down
SETUP_TIMEOUT_S = 120.0  # starting a device's server, checking its flash, sending its experts
SEND_BATCH_BYTES = 64 << 20  # blobs per call to a device while placing
DEVICE_RAM_SHARE = 0.5  # without device_memory: this share of a device's available RAM holds experts
WATCH_S = 1.0  # how often the watcher asks Ray which devices are alive
RETRY_S = 2.0  # a device down whose node is alive is tried again after this, then twice as long each time
RETRY_MAX_S = 60.0
STEADY_S = 60.0  # a device up this long has its wait before the next retry back at retry_s
PINGS = 5  # round trips timed per device for its plan figures (the median is taken)
BANDWIDTH_PROBE_BYTES = 256 << 10
PATHS = ("socket", "ray")  # a layer's call: over the device's own TCP channel, or as a Ray actor call
DEFAULT_PATH = "socket"  # measured the cheaper (docs/cluster.md, Data path)


@dataclasses.dataclass(frozen=True)
class PlanFigures:
    """Where a plan's figures come from. Each None is measured on the live cluster: a device's
    round trip (PINGS timed calls) and bandwidth (a BANDWIDTH_PROBE_BYTES call), its expert
    compute (ExpertServer.probe); the coordinator's flash (its emulated device, else timed
    reads of its store) and compute. A name takes them from a profile instead: link from
    devices/links.json, device and coordinator from devices/profiles (what `edgemoe cluster
    plan` uses). search_seconds: the optimiser's time at each plan."""

    link: str | None = None
    device: str | None = None
    coordinator: str | None = None
    search_seconds: float = 1.0


@dataclasses.dataclass
class Route:
    """The plan calls follow: its Dispatcher (the devices down masked out) and, per device of
    the plan, the index of its Device."""

    plan: Plan
    dispatcher: Dispatcher
    index: np.ndarray  # [plan devices] -> ClusterMoE.devices index


def model_fingerprint(manifest: dict[str, Any]) -> str:
    """Names a model's experts (their table: offsets, lengths, bits, checksums): a device's
    copies are kept under it and reused only by the same experts."""
    ex = manifest["experts"]
    blob = json.dumps([ex["file_bytes"], ex["blobs"]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cause(e: BaseException) -> BaseException:
    """The exception a device raised, out of Ray's wrapper (which carries it as .cause)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


SMALL_CALL_SLOTS = 64  # up to this many (token, slot) pairs a layer's calls are grouped in plain Python


def group_slots(
    ids: np.ndarray, where: np.ndarray
) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A layer's calls, one per device (ascending): (device, slots, experts, counts, tokens,
    rows) where slots (t * k + j) are the device's, grouped by expert in ascending order and in
    slot order within one; experts[g] takes counts[g] of them; tokens are the rows of x sent
    (each token once, ascending) and rows[i] the one slots[i] reads. where [T, k]: the device
    of each slot, -1 for none. Decode's handful of slots is grouped in plain Python (numpy's
    per-call overhead is most of a layer's packing); larger calls with numpy; the same result."""
    T, K = ids.shape
    if T * K > SMALL_CALL_SLOTS:
        flat_ids, flat_where = ids.reshape(-1), where.reshape(-1)
        out = []
        for index in np.unique(flat_where[flat_where >= 0]).tolist():
            slots = np.flatnonzero(flat_where == index)  # t * k + j, in slot order
            slots = slots[np.argsort(flat_ids[slots], kind="stable")]  # grouped by expert, slot order within
            experts, counts = np.unique(flat_ids[slots], return_counts=True)
            tokens, rows = np.unique(slots // K, return_inverse=True)  # each token's row sent once
            out.append((index, slots, experts, counts, tokens, rows))
        return out
    by_device: dict[int, list[tuple[int, int]]] = {}
    for slot, (e, w) in enumerate(zip(ids.reshape(-1).tolist(), where.reshape(-1).tolist())):
        if w >= 0:
            by_device.setdefault(w, []).append((e, slot))
    out = []
    for index in sorted(by_device):
        pairs = sorted(by_device[index])  # by expert, then slot
        groups: list[int] = []  # experts in ascending order
        sizes: list[int] = []  # how many slots each takes
        for e, _ in pairs:
            if groups and groups[-1] == e:
                sizes[-1] += 1
            else:
                groups.append(e)
                sizes.append(1)
        order = [slot for _, slot in pairs]
        sent = sorted({slot // K for slot in order})
        at = {t: i for i, t in enumerate(sent)}
        out.append(
            (
                index,
                np.array(order, np.int64),
                np.array(groups, ids.dtype),
                np.array(sizes, np.int64),
                np.array(sent, np.int64),
                np.array([at[slot // K] for slot in order], np.int64),
            )
        )
    return out


@dataclasses.dataclass
class Device:
    """A device as the coordinator sees it: its server (a Ray actor), state and counters."""

    node: Node
    handle: Any  # the ExpertServer actor
    index: int  # in ClusterMoE.devices, and in the owner table
    channel: Channel | None = None  # the socket path's connection to its server
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    up: bool = True
    error: str | None = None
    pairs: list[Pair] = dataclasses.field(default_factory=list)  # what it serves now
    calls: int = 0
    rounded_calls: int = 0  # calls whose rows travelled rounded to int8 (server.round_rows)
    rows_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failures: int = 0
    blobs_sent: int = 0
    blob_bytes_sent: int = 0
    blobs_from_flash: int = 0
    recoveries: int = 0  # times it came back after being down
    device_seconds: float = 0.0  # what its answers say it spent on them, unpacking to packing
    since: float = dataclasses.field(default_factory=time.monotonic)  # up (or down) since
    retry_wait: float = 0.0  # before its next retry when down (0: the first, retry_s)
    retry_at: float = 0.0  # when it is tried again, if down

    COUNTERS = (
        "calls",
        "rounded_calls",
        "rows_sent",
        "bytes_sent",
        "bytes_received",
        "failures",
        "blobs_sent",
        "device_seconds",
        "blob_bytes_sent",
        "blobs_from_flash",
        "recoveries",
    )

    @property
    def name(self) -> str:
        return self.node.name


class ClusterMoE:
    """A model's routed experts across the devices of a Ray cluster; installed as
    `model.net.moe_override` by attach(). Called like DecoderLM.moe: (layer, x [T, hidden],
    ids [T, k], weights [T, k]) -> [T, hidden]."""

    def __init__(
        self,
        model: Model,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device_memory: int | str | None = None,
        owns_ray: bool = False,
        plan: Plan | None = None,
        figures: PlanFigures | None = None,
        watch_s: float = WATCH_S,
        retry_s: float = RETRY_S,
        path: str = DEFAULT_PATH,
    ):
        if path not in PATHS:
            raise ValueError(f"the cluster's data path is one of {', '.join(PATHS)}, got {path!r}")
        if not timeout_s > 0:
            raise ValueError(f"the cluster timeout is a time in seconds > 0, got {timeout_s}")
        if not retry_s > 0:
            raise ValueError(f"the wait before a device down is tried again is a time in seconds > 0, got {retry_s}")
        self.model = model
        self.address = address
        self.path = path
        self.timeout_s = float(timeout_s)
        self.device_memory = parse_bytes(device_memory)
        self.owns_ray = owns_ray
        self.figures = figures or PlanFigures()
        self.watch_s = float(watch_s)
        self.retry_s = float(retry_s)
        _, self.lengths, self.crcs, _ = blob_tables(model.manifest)
        # Which experts take x rounded to int8 (input_rounds_to_int8, learnt from the blobs as
        # they are placed): a call whose experts all round it so for their row counts on that
        # device (rows_round_to_int8) carries it so, a quarter of the bytes, the same numbers.
        self.int8_input = np.zeros(self.lengths.shape, bool)
        self.round_inputs = True  # False: x always travels as float32
        self.sizes, self.routing, self.moe_layers = model_inputs(model.path, require_routing=False)
        self.moe_index = np.full(self.lengths.shape[0], -1, np.int64)
        self.moe_index[self.moe_layers] = np.arange(len(self.moe_layers))
        self.given_plan = plan
        if plan is not None:
            _check_plan(plan, self.sizes, self.moe_layers)
        self.fingerprint = model_fingerprint(model.manifest)
        self.first_layer = min(self.moe_layers)
        self.devices: list[Device] = []
        self.route: Route | None = None  # None: every expert here
        self.plan_events: list[dict[str, Any]] = []
        self._measured: dict[str, dict[str, float]] = {}  # node id -> its plan figures
        self._coordinator_link: float | None = None  # bits/s all devices' payloads share (measured)
        self._coordinator: CoordinatorSpec | None = None
        self._lock = threading.Lock()
        self._replan_reasons: list[str] = []
        self._retry: set[str] = set()  # node ids of devices down whose retry is due
        self._replanner: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._closed = False
        self._server: Any = None
        self.wait_seconds = 0.0
        self.max_wait_seconds = 0.0  # the longest one call waited on devices
        self.max_deadline_seconds = 0.0  # the longest deadline a call was given
        self.reset_stats()

    # -- devices -----------------------------------------------------------------
    def _start_server(self, node: Node) -> Any:
        import ray  # optional dependency (the `cluster` extra)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._server is None:
            self._server = ray.remote(ExpertServer)
        return self._server.options(
            num_cpus=0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(self.fingerprint, node.name, node.cpus)

    @staticmethod
    def _stop(d: Device) -> None:
        import ray  # optional dependency

        if d.channel is not None:
            d.channel.close()
        try:
            ray.kill(d.handle)
        except Exception:  # a server already gone is what we want
            pass

    def _room(self, d: Device) -> int:
        room = (
            self.device_memory
            if self.device_memory is not None
            else int(DEVICE_RAM_SHARE * int(d.info.get("available_bytes", 0)))
        )
        smallest = int(self.sizes[self.sizes > 0].min()) if (self.sizes > 0).any() else 0
        return room if room >= smallest else 0  # room for no expert: it holds none

    def _set_route(self, plan: Plan, devices: list[Device]) -> None:
        """Calls follow `plan` from now on, the devices down left out (hold self._lock)."""
        self.route = Route(plan, Dispatcher(plan, [d.up for d in devices]), np.array([d.index for d in devices]))

    def _down(self, d: Device, why: str) -> None:
        """Mark d down: its experts go to their other holders or are computed here from now on,
        and a plan for the devices left is wanted."""
        with self._lock:
            if not d.up:
                return
            d.up, d.error = False, why
            d.failures += 1
            now = time.monotonic()
            steady = now - d.since >= STEADY_S
            d.retry_wait = self.retry_s if steady or not d.retry_wait else min(2 * d.retry_wait, RETRY_MAX_S)
            d.since, d.retry_at = now, now + d.retry_wait
            if self.route is not None:
                self._set_route(self.route.plan, [self.devices[i] for i in self.route.index])
            self._replan_reasons.append(f"{d.name} down: {why}")

    def _get(self, refs: list[Any], devices: list[Device], raise_damaged: bool) -> list[Any]:
        """ray.get of one setup call per device, each within SETUP_TIMEOUT_S; a device whose
        call fails is marked down (its result None). A device's checksum failure (ClusterError)
        is raised when raise_damaged, else it marks the device down."""
        import ray  # optional dependency

        out: list[Any] = []
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        for d, ref in zip(devices, refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
                continue
            except ClusterError as e:
                if raise_damaged:
                    raise ClusterError(str(_cause(e))) from None
                why = str(_cause(e))
            except ray.exceptions.GetTimeoutError:
                why = f"no answer within {SETUP_TIMEOUT_S:.0f} s while being set up"
            except ray.exceptions.RayError as e:
                why = f"{type(_cause(e)).__name__}: {_cause(e)}"
            self._down(d, why)
            out.append(None)
        return out

    def _add_devices(self, nodes: list[Node], raise_damaged: bool) -> None:
        """Start a server on each node (a device already up on it is kept), learn about it and
        measure what its plan needs."""
        fresh, replaced = [], []
        for node in nodes:
            old = next((d for d in self.devices if d.node.id == node.id), None)
            if old is not None and old.up:
                continue
            d = Device(node, self._start_server(node), old.index if old else len(self.devices))
            if old is None:
                self.devices.append(d)
            else:  # a new server on a device that was down: its counters and its backoff go on
                for f in Device.COUNTERS:
                    setattr(d, f, getattr(old, f))
                d.retry_wait, d.error = old.retry_wait, old.error
                replaced.append(d)
                with self._lock:
                    self.devices[old.index] = d
                self._stop(old)  # a server that was only late may still hold its experts
            fresh.append(d)
        for d, info in zip(fresh, self._get([d.handle.info.remote() for d in fresh], fresh, raise_damaged)):
            if info is not None:
                d.info = info
        if self.path == "socket":
            self._connect([d for d in fresh if d.up], raise_damaged)
        for d in replaced:
            if d.up:  # back: its old error stays in the plan events, its failures in the counters
                d.recoveries += 1
                d.error = None
        self._measure([d for d in fresh if d.up and d.node.id not in self._measured], raise_damaged)

    def _connect(self, devices: list[Device], raise_damaged: bool) -> None:
        """The socket path: each server listens on its node's address (asked through Ray),
        and this process connects to it; a device that cannot be reached is down."""
        where = self._get([d.handle.open_channel.remote(d.node.address) for d in devices], devices, raise_damaged)
        for d, hp in zip(devices, where):
            if hp is None:
                continue
            d.info["serve_priority_error"] = hp[2]
            try:
                d.channel = Channel(hp[0], int(hp[1]), SETUP_TIMEOUT_S)
            except OSError as e:
                self._down(d, f"cannot connect to its channel at {hp[0]}:{hp[1]}: {e}")

    def _ping(self, d: Device, payload: np.ndarray | None) -> None:
        """One round trip to d's server by the data path calls take (a payload: sent, not
        returned)."""
        import ray  # optional dependency

        if d.channel is not None:
            body = b"" if payload is None else payload.tobytes()
            d.channel.call(body, time.monotonic() + SETUP_TIMEOUT_S, PING)
        else:
            ray.get(d.handle.ping.remote(payload), timeout=SETUP_TIMEOUT_S)

    # -- the plan's figures --------------------------------------------------------
    def _probe_blob(self) -> tuple[int, int, np.ndarray]:
        """(layer, expert, blob): the largest expert of the first MoE layer, read from the store."""
        m = 0
        e = int(np.argmax(self.sizes[m]))
        layer = self.moe_layers[m]
        return layer, e, self.model.store.read(layer, e)

    def _measure(self, devices: list[Device], raise_damaged: bool) -> None:
        """Each device's compute (ExpertServer.probe on one expert), round trip and bandwidth,
        unless the figures name profiles for them."""
        import ray  # optional dependency

        if not devices:
            return
        f = self.figures
        link = load_link(f.link) if f.link else None
        profile = load_profile(f.device) if f.device else None
        hidden = int(self.model.manifest["config"]["hidden_size"])
        rates: list[Any] = [None] * len(devices)
        if profile is None:  # one device at a time: devices sharing cores (the test bed) would slow each other
            _, _, blob = self._probe_blob()
            ref = ray.put(blob)
            rates = [self._get([d.handle.probe.remote(ref, hidden)], [d], raise_damaged)[0] for d in devices]
        payload = np.zeros(BANDWIDTH_PROBE_BYTES, np.uint8)
        for d, rate in zip(devices, rates):
            if not d.up:
                continue
            try:
                rtts = []
                for _ in range(PINGS):
                    t0 = time.perf_counter()
                    self._ping(d, None)
                    rtts.append(time.perf_counter() - t0)
                rtt = float(np.median(rtts))
                bits = link.bits_per_s if link else 0.0
                if link is None:
                    t0 = time.perf_counter()
                    self._ping(d, payload)
                    bits = 8 * payload.nbytes / max(time.perf_counter() - t0 - rtt, 1e-6)
            except (ray.exceptions.RayError, OSError, ClusterError) as e:
                self._down(d, f"{type(_cause(e)).__name__}: {_cause(e)}")
                continue
            self._measured[d.node.id] = {
                "rtt_s": link.rtt_s if link else rtt,
                "link_bits_per_s": float(bits),
                "compute_bytes_per_s": float(profile.int4_bytes_per_s if profile else rate),
                "measured_rtt_s": rtt,
            }
        if link is None:
            self._measure_coordinator_link(payload)

    def _measure_coordinator_link(self, payload: np.ndarray) -> None:
        """The rate of the link every device's payloads cross at the coordinator: the payload
        sent to all devices measured so far at once, over the time beyond the slowest round
        trip. Devices that share one medium with the coordinator (Wi-Fi) take about one
        device's rate together; behind a switch, or in the test bed whose links are each a
        node's, they take the sum. None with fewer than two devices (nothing shares)."""
        import ray  # optional dependency

        ups = [d for d in self.devices if d.up and d.node.id in self._measured]
        self._coordinator_link = None
        if len(ups) < 2:
            return
        t0 = time.perf_counter()
        end = time.monotonic() + SETUP_TIMEOUT_S
        channels = [d.channel for d in ups if d.channel is not None]
        if self.path == "socket" and len(channels) == len(ups):
            body = payload.tobytes()
            for ch in channels:
                try:
                    ch.send(body, end, PING)
                except OSError:  # the channel is closed: receive() answers it with why
                    pass
            answers: list[Any] = list(receive(channels, end))
        else:
            answers = []
            for ref in [d.handle.ping.remote(payload) for d in ups]:
                try:
                    answers.append(ray.get(ref, timeout=max(end - time.monotonic(), 0.0)))
                except Exception as e:  # the device's error, or its death
                    answers.append(e)
        elapsed = time.perf_counter() - t0
        for d, answer in zip(ups, answers):
            if answer is None or isinstance(answer, BaseException):
                self._down(d, "no answer to the shared link's probe" if answer is None else f"{_cause(answer)}")
        if all(d.up for d in ups):
            rtt = max(self._measured[d.node.id]["measured_rtt_s"] for d in ups)
            self._coordinator_link = 8 * payload.nbytes * len(ups) / max(elapsed - rtt, 1e-6)

    def coordinator_spec(self) -> CoordinatorSpec:
        """The coordinator as the planner sees it: its cache budget (all experts when it has
        none), flash and compute; measured once."""
        if self._coordinator is not None:
            return self._coordinator
        total = int(self.sizes.sum())
        cache = int(self.model.budget) or total
        if self.figures.coordinator:
            p = load_profile(self.figures.coordinator)
            spec = CoordinatorSpec(cache, float(p.read_bytes_per_s), p.read_latency_s, float(p.int4_bytes_per_s))
        else:
            store = self.model.store
            layer, e, blob = self._probe_blob()
            if store.read_bytes_per_s > 0:  # its storage is emulated: the plan takes the emulated figures
                flash, latency = float(store.read_bytes_per_s), float(store.read_latency_s)
            else:
                t0 = time.perf_counter()
                for _ in range(4):
                    store.read(layer, e)  # O_DIRECT where the filesystem allows it
                flash, latency = 4 * blob.size / max(time.perf_counter() - t0, 1e-9), 0.0
            hidden = int(self.model.manifest["config"]["hidden_size"])
            spec = CoordinatorSpec(cache, flash, latency, expert_rate(blob, hidden))
        self._coordinator = spec
        return spec

    def device_spec(self, d: Device) -> DeviceSpec:
        f = self._measured[d.node.id]
        return DeviceSpec(d.name, self._room(d), f["compute_bytes_per_s"], f["rtt_s"], f["link_bits_per_s"])

    def make_plan(self) -> Plan:
        """plan_placement over the devices up (and measured), the coordinator and the model's
        routing statistics (uniform without routing.json)."""
        up = [d for d in self.devices if d.up and d.node.id in self._measured]
        try:
            return plan_placement(
                [self.device_spec(d) for d in up],
                dataclasses.replace(self.coordinator_spec(), link_bits_per_s=self._coordinator_link),
                self.sizes,
                self.routing,
                self.moe_layers,
                search_seconds=self.figures.search_seconds,
            )
        except PlacementError as e:
            raise ClusterError(f"cannot place the experts on the cluster at {self.address}: {e}") from None

    # -- placing ---------------------------------------------------------------------
    def _pairs(self, held: np.ndarray) -> list[Pair]:
        """[M, E] mask -> (layer, expert) pairs."""
        return [(self.moe_layers[m], int(e)) for m, e in zip(*np.nonzero(held))]

    def _mask(self, pairs: list[Pair]) -> np.ndarray:
        out = np.zeros(self.sizes.shape, bool)
        for layer, e in pairs:
            out[self.moe_index[layer], e] = True
        return out

    def _place(self, plan: dict[str, list[Pair]], raise_damaged: bool) -> None:
        """Make each device of the plan serve exactly its pairs: it reads what it has on its
        flash, the coordinator sends the rest (read and checked by its ExpertStore)."""
        devices = [d for d in self.devices if d.up and d.name in plan]
        tables = [
            [(layer, e, int(self.lengths[layer, e]), int(self.crcs[layer, e])) for layer, e in plan[d.name]]
            for d in devices
        ]
        answers = self._get([d.handle.hold.remote(t) for d, t in zip(devices, tables)], devices, raise_damaged)
        sending: list[Device] = []
        refs: list[Any] = []
        for d, answer in zip(devices, answers):
            if answer is None:
                continue
            d.blobs_from_flash += int(answer["from_flash"])
            for layer, e in answer.get("int8_input", []):  # what it holds already: it read the blobs
                self.int8_input[layer, e] = True
            batch: list[tuple[int, int, int, np.ndarray]] = []
            batch_bytes = 0
            for layer, e in answer["missing"]:
                blob = self.model.store.read(layer, e)
                self.int8_input[layer, e] = input_rounds_to_int8(blob)
                batch.append((layer, e, int(self.crcs[layer, e]), blob))
                batch_bytes += blob.size
                d.blobs_sent += 1
                d.blob_bytes_sent += blob.size
                if batch_bytes >= SEND_BATCH_BYTES:
                    sending.append(d)
                    refs.append(d.handle.put.remote(batch))
                    batch, batch_bytes = [], 0
            if batch:
                sending.append(d)
                refs.append(d.handle.put.remote(batch))
        self._get(refs, sending, raise_damaged)
        for d in devices:
            if d.up:
                d.pairs = list(plan[d.name])

    def install(self, plan: Plan, reason: str, raise_damaged: bool = False) -> None:
        """Move to `plan` (its devices named as self.devices are) without a call ever meeting
        a device that lacks an expert it was sent: first calls follow what the old and the new
        placement share, then every device is made to serve exactly its new experts (sending
        what it lacks), then calls follow the new plan. A device's memory holds at most the
        larger of its old and new sets meanwhile."""
        t0 = time.monotonic()
        by_name = {d.name: d for d in self.devices}
        devices = [by_name[s.name] for s in plan.devices]
        with self._lock:
            shared = plan.held.copy()
            for i, d in enumerate(devices):
                shared[i] &= self._mask(d.pairs)
            self._set_route(dataclasses.replace(plan, held=shared), devices)
        self._place({d.name: self._pairs(plan.held[i]) for i, d in enumerate(devices)}, raise_damaged)
        for d in self.devices:
            if d.up and d.name not in {s.name for s in plan.devices} and d.pairs:
                self._place({d.name: []}, raise_damaged)  # a device the plan leaves out frees its RAM
        with self._lock:
            self._set_route(plan, devices)
        for m, e in zip(*np.nonzero(plan.local)):  # the coordinator's share of the plan, read now
            self.model.cache.load(self.moe_layers[m], int(e))
        self.plan_events.append(
            {
                "reason": reason,
                "devices": [d.name for d in devices if d.up],
                "expected_token_ms": 1e3 * plan.expected_token_s,
                "seconds": time.monotonic() - t0,
            }
        )

    def start(self, raise_damaged: bool = True) -> None:
        """(Re)discover the devices and place the experts over them: a device joined since
        gets a server, a device that was down whose node is alive gets a new one (which reads
        its experts from its flash). The first start follows the plan given, if any; every
        other start plans for the devices up."""
        self._wait_replan()
        nodes = device_nodes()
        if not nodes:
            raise ClusterError(
                f"the Ray cluster at {self.address} has no live node offering the '{RESOURCE}' resource, so "
                f"there is no device to serve experts: join each device with "
                f"`ray start --address=HEAD_IP:6379 --resources='{{\"{RESOURCE}\": 1}}'`"
            )
        first = self.route is None
        self._add_devices(nodes, raise_damaged)
        if not any(d.up for d in self.devices):
            errors = "; ".join(f"{d.name}: {d.error}" for d in self.devices)
            raise ClusterError(f"no device of the cluster at {self.address} could serve experts ({errors})")
        if first and self.given_plan is not None:
            plan, reason = self._name_plan(self.given_plan), "the plan given"
        else:
            plan, reason = self.make_plan(), "start" if first else "refresh"
        with self._lock:
            self._replan_reasons.clear()
        self.install(plan, reason, raise_damaged)
        if self._watcher is None and self.watch_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="edgemoe-cluster-watch", daemon=True)
            self._watcher.start()

    refresh = start

    def _name_plan(self, plan: Plan) -> Plan:
        """A plan made for profiles (`edgemoe cluster plan --json`): its devices, in order, are
        the live devices in order of their node ids."""
        up = [d for d in self.devices if d.up]
        if len(up) < len(plan.devices):
            raise ClusterError(
                f"the plan places experts on {len(plan.devices)} devices and the cluster at {self.address} has "
                f"{len(up)} up: join more devices, or plan for these (`edgemoe cluster plan --devices ...`)"
            )
        specs = [dataclasses.replace(s, name=d.name) for s, d in zip(plan.devices, up)]
        return dataclasses.replace(plan, devices=specs)

    # -- planning again after a failure or a join ---------------------------------------
    def _watch(self) -> None:
        """On a thread: every watch_s, the devices Ray knows: a device whose node is gone is
        marked down at once (not at its next call), a node never seen asks for a plan."""
        while not self._closed:
            time.sleep(self.watch_s)
            if self._closed:
                return
            try:
                alive = {n.id: n for n in device_nodes()}
            except Exception:  # Ray shutting down under us: nothing to watch
                continue
            known = {d.node.id for d in self.devices}
            now = time.monotonic()
            for d in list(self.devices):
                if d.up and d.node.id not in alive:
                    self._down(d, "its node left the cluster")
                elif not d.up and d.node.id in alive and now >= d.retry_at > 0:
                    d.retry_at = 0.0  # asked once; _down sets the next if this try fails
                    with self._lock:
                        self._retry.add(d.node.id)
                        self._replan_reasons.append(f"{d.name} tried again after {d.retry_wait:.0f} s down")
            joined = [n for i, n in alive.items() if i not in known]
            if joined:
                with self._lock:
                    self._replan_reasons.extend(f"{n.name} joined" for n in joined)
            self._maybe_replan()

    def _maybe_replan(self) -> None:
        with self._lock:
            if not self._replan_reasons or self._replanner is not None or self._closed:
                return
            self._replanner = threading.Thread(target=self._replan, name="edgemoe-cluster-replan", daemon=True)
        self._replanner.start()

    def _replan(self) -> None:
        """On a thread: start servers on nodes that joined, plan for the devices up, and install
        the plan. Meanwhile calls go on with the plan they have (a device down masked out)."""
        try:
            while True:
                with self._lock:
                    if not self._replan_reasons or self._closed:
                        return
                    reason = "; ".join(self._replan_reasons)
                    self._replan_reasons.clear()
                    retry, self._retry = self._retry, set()
                known = {d.node.id for d in self.devices}
                nodes = [n for n in device_nodes() if n.id not in known or n.id in retry]
                self._add_devices(nodes, raise_damaged=False)
                if any(d.up for d in self.devices):
                    self.install(self.make_plan(), reason)
        except Exception as e:  # a thread has nobody to raise to: say so, generation goes on
            warnings.warn(f"placing experts again ({reason}) stopped: {e}", stacklevel=1)
        finally:
            with self._lock:
                self._replanner = None

    def _wait_replan(self) -> None:
        t = self._replanner
        if t is not None:
            t.join()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until no plan is wanted or being installed (tests, benchmarks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self._maybe_replan()
            self._wait_replan()
            with self._lock:
                if not self._replan_reasons and self._replanner is None:
                    return
            time.sleep(0.01)
        raise ClusterError(f"placing experts again did not finish within {timeout_s:.0f} s")

    # -- the layer -----------------------------------------------------------------
    def _allowance(self, d: Device, link_bytes: int, work_bytes: int) -> float:
        """Seconds a call to d may take beyond the base deadline: its bytes over the device's
        measured link and its expert work at the device's measured compute, so a long prompt
        over a slow link is not taken for a dead device (decode's calls add almost nothing)."""
        f = self._measured.get(d.node.id)
        if not f:
            return 0.0
        return 8 * link_bytes / max(f["link_bits_per_s"], 1.0) + work_bytes / max(f["compute_bytes_per_s"], 1.0)

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum [T, hidden] for x [T, hidden], ids/weights [T, k]."""
        self._maybe_replan()
        route = self.route  # one plan for the whole call (a new plan swaps in a new route)
        T, K = ids.shape
        H = x.shape[1]
        if layer == self.first_layer:
            self.tokens += T
        if route is None:
            return _core.moe_forward(self.model.cache, layer, x, ids, weights)
        # who computes each expert of the call: one holder per expert for all its rows, so a
        # device computes an expert's rows in one batch, as moe_forward does
        used = np.unique(ids)
        holder = route.dispatcher.choose(int(self.moe_index[layer]), used)
        on_device = holder < route.dispatcher.D
        table = np.full(self.lengths.shape[1], -1, np.int64)
        table[used[on_device]] = route.index[holder[on_device]]
        where = table[ids]  # [T, k]: the device computing each slot, -1: here
        remote = where >= 0
        self.remote_slots += int(remote.sum())
        self.local_slots += int(T * K - remote.sum())
        if not remote.any():
            return _core.moe_forward(self.model.cache, layer, x, ids, weights)

        t0 = time.monotonic()
        calls = []
        allowed = 0.0  # the slowest device's time for its payload and work, beyond the base deadline
        for index, slots, experts, counts, tokens, rows in group_slots(ids, where):
            d = self.devices[index]
            rounded = (
                self.round_inputs
                and bool(self.int8_input[layer, experts].all())
                and all(
                    rows_round_to_int8(
                        n, d.info.get("rounds_int8_input", False), d.info.get("rounds_int8_prefill", False)
                    )
                    for n in counts.tolist()
                )
            )
            call = pack_call(layer, x[tokens], experts, counts, rows, rounded)
            calls.append((d, slots, call))
            work = int(np.dot(counts, self.lengths[layer, experts]))  # expert bytes streamed once per row
            allowed = max(allowed, self._allowance(d, len(call) + 4 * len(slots) * H, work))
            d.calls += 1
            d.rounded_calls += call_form(call) == FORM_ROUNDED
            d.rows_sent += len(tokens)
            d.bytes_sent += len(call)
        self.remote_calls += 1
        deadline = self.timeout_s + allowed
        self.max_deadline_seconds = max(self.max_deadline_seconds, deadline)
        end = t0 + deadline
        pending = self._submit(calls, end)
        t_sent = time.monotonic()
        self.send_seconds += t_sent - t0

        ys = _core.moe_forward_slots(self.model.cache, layer, x, ids, mask=~remote, weights=weights)
        t1 = time.monotonic()
        self.local_seconds += t1 - t_sent
        answers = self._collect(pending, end)
        _core.wake_threads()  # the next layer's matmuls need them: they wake while the answers are read
        t_got = time.monotonic()
        waited = t_got - t1
        self.wait_seconds += waited
        self.max_wait_seconds = max(self.max_wait_seconds, waited)
        flat_ys = ys.reshape(T * K, H)
        redo = np.zeros(T * K, bool)
        slowest = 0.0  # the longest a device said it spent on its call
        for (d, slots, _), out in zip(calls, answers):
            why = f"no answer within {1e3 * deadline:.0f} ms"
            if out is not None:
                try:
                    if isinstance(out, BaseException):
                        raise out
                    if len(out) != DEVICE_SECONDS.size + 4 * len(slots) * H:
                        raise ClusterError(f"answered {len(out)} bytes for {len(slots)} rows of hidden size {H}")
                    (spent,) = DEVICE_SECONDS.unpack_from(out)
                    flat_ys[slots] = np.frombuffer(out, "<f4", offset=DEVICE_SECONDS.size).reshape(len(slots), H)
                    d.bytes_received += len(out)
                    d.device_seconds += spent
                    slowest = max(slowest, spent)
                    continue
                except Exception as e:  # anything a device or the link can do: its slots are computed here
                    why = f"{type(_cause(e)).__name__}: {_cause(e)}"
            self._down(d, why)
            redo[slots] = True
        self.slowest_device_seconds += slowest
        self.hop_seconds += max(0.0, t_got - t_sent - slowest)
        if redo.any():
            self.recomputed_slots += int(redo.sum())
            again = _core.moe_forward_slots(self.model.cache, layer, x, ids, mask=redo.reshape(T, K), weights=weights)
            flat_ys[redo] = again.reshape(T * K, H)[redo]
        summed = _core.combine_slots(ys, weights)
        self.remote_layer_seconds += time.monotonic() - t0
        return summed

    def _submit(self, calls: list[tuple[Device, np.ndarray, bytes]], end: float) -> list[Any]:
        """Send each device its call: over its channel (the socket path; a send that fails is
        its answer) or as a Ray actor call (its ObjectRef)."""
        pending: list[Any] = []
        for d, _, call in calls:
            if self.path == "ray":
                pending.append(d.handle.forward.remote(call))
                continue
            try:
                if d.channel is None:
                    raise ConnectionError("it has no channel")
                d.channel.send(call, end)
                pending.append(d.channel)
            except Exception as e:  # sending failed: the device failed this call
                pending.append(e)
        return pending

    def _collect(self, pending: list[Any], end: float) -> list[bytes | BaseException | None]:
        """The answers to _submit's calls by `end` (time.monotonic): bytes, the exception a
        call failed with, or None for no answer in time."""
        out: list[bytes | BaseException | None] = [p if isinstance(p, BaseException) else None for p in pending]
        if self.path == "socket":
            live = [i for i, p in enumerate(pending) if isinstance(p, Channel)]
            for i, answer in zip(live, receive([pending[i] for i in live], end)):
                out[i] = answer
            return out
        import ray  # optional dependency

        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, end - time.monotonic()))
        done = set(ready)
        for i, ref in enumerate(pending):
            if ref in done:
                try:
                    out[i] = ray.get(ref)
                except Exception as e:  # the device's error, or its death
                    out[i] = e
        return out

    # -- accounting ----------------------------------------------------------------
    def assignment(self) -> Assignment:
        """What each device serves now, by the plan calls follow (devices down serve nothing)."""
        route = self.route
        out: Assignment = {d.name: [] for d in self.devices}
        if route is not None:
            for i, index in enumerate(route.index):
                d = self.devices[index]
                if d.up:
                    out[d.name] = self._pairs(route.plan.held[i])
        return out

    def stats(self) -> dict[str, Any]:
        """{"cluster": ...}: the totals, one dict per device, and the assignment (Model.stats
        merges it into its own)."""
        tokens = self.tokens
        assignment = self.assignment()
        devices = {}
        for d in self.devices:
            devices[d.name] = {
                "node": d.node.id,
                "address": d.node.address,
                "state": "up" if d.up else "down",
                "error": d.error,
                "experts": len(assignment[d.name]),
                "expert_bytes": int(sum(int(self.lengths[layer, e]) for layer, e in assignment[d.name])),
                "calls": d.calls,
                "rounded_calls": d.rounded_calls,
                "rows_sent": d.rows_sent,
                "bytes_sent": d.bytes_sent,
                "bytes_received": d.bytes_received,
                "round_trips_per_token": d.calls / tokens if tokens else 0.0,
                "failures": d.failures,
                "recoveries": d.recoveries,
                "retry_in_s": max(0.0, d.retry_at - time.monotonic()) if not d.up and d.retry_at else None,
                "retry_wait_s": d.retry_wait,  # the backoff after its last failure (doubles while it keeps failing)
                "blobs_sent": d.blobs_sent,
                "blob_bytes_sent": d.blob_bytes_sent,
                "blobs_from_flash": d.blobs_from_flash,
                "device_ms_per_call": 1e3 * d.device_seconds / d.calls if d.calls else 0.0,
                "simd": d.info.get("simd"),
                "threads": d.info.get("threads"),
                "serve_priority": d.info.get("serve_priority"),
                "serve_priority_error": d.info.get("serve_priority_error"),
            }
        return {
            "cluster": {
                "address": self.address,
                "path": self.path,
                "timeout_ms": 1e3 * self.timeout_s,
                "tokens": tokens,
                "round_trips_per_token": self.remote_calls / tokens if tokens else 0.0,
                "remote_layers": self.remote_calls,
                "local_slots": self.local_slots,
                "remote_slots": self.remote_slots,
                "recomputed_slots": self.recomputed_slots,
                "wait_seconds": self.wait_seconds,
                "send_seconds": self.send_seconds,
                "local_seconds": self.local_seconds,
                "remote_layer_seconds": self.remote_layer_seconds,
                "slowest_device_seconds": self.slowest_device_seconds,
                "hop_seconds": self.hop_seconds,
                "max_wait_seconds": self.max_wait_seconds,
                "max_deadline_ms": 1e3 * self.max_deadline_seconds,
                "devices": devices,
                "assignment": {name: [list(p) for p in pairs] for name, pairs in assignment.items()},
                "plan": self.route.plan.to_json() if self.route is not None else None,
                "plans": list(self.plan_events),
            }
        }

    def reset_stats(self) -> None:
        self.tokens = self.remote_calls = 0
        self.local_slots = self.remote_slots = self.recomputed_slots = 0
        self.wait_seconds = self.max_wait_seconds = self.max_deadline_seconds = 0.0
        self.send_seconds = self.local_seconds = self.remote_layer_seconds = 0.0
        self.hop_seconds = self.slowest_device_seconds = 0.0
        for d in self.devices:
            for f in Device.COUNTERS:
                setattr(d, f, 0)

    def close(self) -> None:
        """Stop the device servers, give the model back its own experts, and leave the cluster
        if attach joined it."""
        import ray  # optional dependency

        with self._lock:
            self._closed = True
        self._wait_replan()
        if self.model.net.moe_override is self:
            self.model.net.moe_override = None
        if ray.is_initialized():
            for d in self.devices:
                self._stop(d)
            if self.owns_ray:
                ray.shutdown()


def load_plan(plan: Plan | str | os.PathLike[str] | dict[str, Any]) -> Plan:
    """A placement plan: as is, from its JSON (Plan.to_json) or from a file of it (`edgemoe
    cluster plan --json FILE`)."""
    if isinstance(plan, Plan):
        return plan
    try:
        doc = plan if isinstance(plan, dict) else json.loads(Path(plan).read_text())
        return Plan.from_json(doc)
    except (OSError, ValueError, KeyError, TypeError, PlacementError) as e:
        raise ClusterError(
            f"cannot read the placement plan {plan if not isinstance(plan, dict) else '(given as JSON)'}: {e}; "
            "write one with `edgemoe cluster plan MODEL --devices ... --json FILE`"
        ) from None


def _check_plan(plan: Plan, sizes: np.ndarray, moe_layers: list[int]) -> None:
    if plan.sizes.shape != sizes.shape or not np.array_equal(plan.sizes, sizes) or plan.moe_layers != moe_layers:
        raise ClusterError(
            f"the placement plan was made for another model (its experts {plan.sizes.shape} and sizes differ from "
            f"this model's {sizes.shape}): plan again with `edgemoe cluster plan MODEL --json FILE`"
        )


def attach(
    model: Model,
    address: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device_memory: int | str | None = None,
    plan: Plan | str | os.PathLike[str] | None = None,
    figures: PlanFigures | None = None,
    watch_s: float = WATCH_S,
    retry_s: float = RETRY_S,
    path: str = DEFAULT_PATH,
) -> ClusterMoE:
    """Serve `model`'s experts from the devices of the Ray cluster at `address` ("auto",
    "HOST:PORT" or "ray://HOST:PORT"): start a server on each node offering the `edgemoe`
    resource, plan where the experts go (plan_placement over the devices' figures, measured
    or from profiles: `figures`; up to device_memory bytes each, default half a device's
    available RAM), or follow `plan` (a Plan or its JSON file, its devices taken in order),
    send each device the blobs its flash lacks, and install the result as the model's MoE
    computation. timeout_s: how long a layer waits for a device before computing its
    experts here and marking it down (plus the time the call's bytes take over the device's
    link and its rows at the device's compute, both measured). watch_s: how often devices
    that joined or left are looked for (0: never). retry_s: a device down whose node is still
    in the cluster gets a new server after this long, then after twice as long each time it
    fails again (up to a minute; back to retry_s once it has stayed up a minute). path: how a
    layer's call travels, "socket" (each server's own TCP channel, set up through Ray) or
    "ray" (an actor call per device and layer). Raises ClusterError naming the fix when the cluster does not
    answer, has no device, a device's copy is damaged or the plan does not fit."""
    given = load_plan(plan) if plan is not None else None
    owns = connect(address)
    try:
        cm = ClusterMoE(
            model,
            address,
            timeout_s=timeout_s,
            device_memory=device_memory,
            owns_ray=owns,
            plan=given,
            figures=figures,
            watch_s=watch_s,
            retry_s=retry_s,
            path=path,
        )
    except BaseException:
        if owns:
            import ray  # optional dependency

            ray.shutdown()
        raise
    try:
        cm.start()
    except BaseException:
        cm.close()
        raise
    model.net.moe_override = cm
    return cm


def detach(model: Model) -> None:
    """Undo attach: the model computes every expert itself again."""
    cm = model.net.moe_override
    if isinstance(cm, ClusterMoE):
        cm.close()


def format_cluster_stats(s: dict[str, Any]) -> str:
    """A readable summary of Model.stats()["cluster"] (what `edgemoe run --stats` prints)."""
    c = s["cluster"]
    lines = [
        f"cluster       {c['address']}: {c['remote_slots']} slots on devices, {c['local_slots']} here, "
        f"{c['recomputed_slots']} recomputed here after a failure; {c['round_trips_per_token']:.2f} round trips "
        f"per token, {c['wait_seconds']:.3f} s waiting (deadline {c['timeout_ms']:.0f} ms)"
    ]
    for name, d in c["devices"].items():
        lines.append(
            f"  {name:<22} {d['state']:<4} {d['experts']} experts ({format_bytes(d['expert_bytes'])}), "
            f"{d['calls']} calls ({d.get('rounded_calls', 0)} with rows rounded to int8), {d['rows_sent']} rows, "
            f"sent {format_bytes(d['bytes_sent'])}, received "
            f"{format_bytes(d['bytes_received'])}; blobs {d['blobs_sent']} sent ({format_bytes(d['blob_bytes_sent'])}),"
            f" {d['blobs_from_flash']} from its flash"
            + (f"; serving at ordinary priority ({d['serve_priority_error']})" if d.get("serve_priority_error") else "")
            + (f"; {d['error']}" if d["error"] else "")
        )
    for event in c.get("plans", []):
        lines.append(
            f"  plan ({event['reason']}): {len(event['devices'])} devices, expected MoE time per token "
            f"{event['expected_token_ms']:.3f} ms, placed in {event['seconds']:.2f} s"
        )
    if c.get("plan"):
        lines.append(format_plan(Plan.from_json(c["plan"])))
    return "\n".join(lines)
