"""One model's experts across the devices of a Ray cluster (docs/cluster.md).

The coordinator (the process that loaded the model) keeps the backbone and runs every
layer. `ClusterMoE` replaces the model's routed-expert computation (DecoderLM.moe_override):
at each MoE layer it sends each device holding some of the call's experts one call with all
their rows, computes its own experts through the cache meanwhile (moe_forward_slots), and
sums every slot with moe_forward's arithmetic (combine_slots), so the tokens are the ones a
single device gives. A device that errs, dies or misses the deadline has its slots computed
locally for that call, is marked down, and its experts go to the devices left.

    m = edgemoe.load(path, cluster="auto")      # or attach(model, "HOST:PORT")
    m.stats()["cluster"]                        # calls, bytes, failures, the assignment
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import warnings
from typing import Any

import numpy as np

from .. import _core
from ..errors import ClusterError, EdgeMoEError
from ..format.manifest import blob_tables
from ..format.routing_file import load_usage
from ..runtime.engine import Model, warm_start_order
from ..units import format_bytes, parse_bytes
from .connect import RESOURCE, Node, connect, device_nodes
from .server import ExpertServer

Pair = tuple[int, int]  # (layer, expert)
Assignment = dict[str, list[Pair]]  # device name -> the experts it holds

DEFAULT_TIMEOUT_S = 0.5  # a device that has not answered a layer's call by then is down
SETUP_TIMEOUT_S = 120.0  # starting a device's server, checking its flash, sending its experts
SEND_BATCH_BYTES = 64 << 20  # blobs per call to a device while placing
DEVICE_RAM_SHARE = 0.5  # without device_memory: this share of a device's available RAM holds experts


def assign_experts(room: dict[str, int], sizes: np.ndarray, usage: np.ndarray | None = None) -> Assignment:
    """Which (layer, expert) pairs each device holds. room: bytes each device gives experts;
    sizes [layers, experts]: each expert's bytes (0: none, or not to place); usage: how often
    calibration routed to each (routing.json), or None.

    The most used experts first (each expert's share of its layer's uses, as warm_start_order
    ranks them; without usage, round the layers), each to the device with the most room left
    (ties by name), skipping any that no device can take; experts no device holds run on the
    coordinator. The one place a placement is decided: a planner's plan can take its place."""
    left = {name: int(room[name]) for name in sorted(room)}
    out: Assignment = {name: [] for name in left}
    for layer, expert in warm_start_order(sizes, usage):
        if not left:
            break
        name = max(left, key=lambda n: left[n])  # the first of the roomiest, by name
        size = int(sizes[layer, expert])
        if size <= left[name]:
            left[name] -= size
            out[name].append((layer, expert))
    return out


def model_fingerprint(manifest: dict[str, Any]) -> str:
    """Names a model's experts (their table: offsets, lengths, bits, checksums): a device's
    copies are kept under it and reused only by the same experts."""
    ex = manifest["experts"]
    blob = json.dumps([ex["file_bytes"], ex["blobs"]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def routing_usage(model: Model, shape: tuple[int, ...]) -> np.ndarray | None:
    """Calibration usage [layers, experts] from routing.json, or None (no profile, or one it
    cannot use: the placement then goes round the layers, as the warm start does)."""
    try:
        return load_usage(model.path, shape)
    except EdgeMoEError:
        return None


def _cause(e: BaseException) -> BaseException:
    """The exception a device raised, out of Ray's wrapper (which carries it as .cause)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


@dataclasses.dataclass
class Device:
    """A device as the coordinator sees it: its server (a Ray actor), state and counters."""

    node: Node
    handle: Any  # the ExpertServer actor
    index: int  # in ClusterMoE.devices, and in the owner table
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    up: bool = True
    error: str | None = None
    pairs: list[Pair] = dataclasses.field(default_factory=list)  # what it serves now
    calls: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failures: int = 0
    blobs_sent: int = 0
    blob_bytes_sent: int = 0
    blobs_from_flash: int = 0

    COUNTERS = (
        "calls",
        "rows_sent",
        "bytes_sent",
        "bytes_received",
        "failures",
        "blobs_sent",
        "blob_bytes_sent",
        "blobs_from_flash",
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
    ):
        if not timeout_s > 0:
            raise ValueError(f"the cluster timeout is a time in seconds > 0, got {timeout_s}")
        self.model = model
        self.address = address
        self.timeout_s = float(timeout_s)
        self.device_memory = parse_bytes(device_memory)
        self.owns_ray = owns_ray
        _, self.lengths, self.crcs, _ = blob_tables(model.manifest)
        self.usage = routing_usage(model, self.lengths.shape)
        self.fingerprint = model_fingerprint(model.manifest)
        self.first_layer = min(model.manifest["experts"]["moe_layers"])
        self.devices: list[Device] = []
        self.owner = np.full(self.lengths.shape, -1, np.int32)  # device index per (layer, expert); -1: local
        self._lock = threading.Lock()
        self._rebalance_wanted = False
        self._rebalancer: threading.Thread | None = None
        self._closed = False
        self._server: Any = None
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

        try:
            ray.kill(d.handle)
        except Exception:  # a server already gone is what we want
            pass

    def _room(self, d: Device) -> int:
        if self.device_memory is not None:
            return self.device_memory
        return int(DEVICE_RAM_SHARE * int(d.info.get("available_bytes", 0)))

    def _down(self, d: Device, why: str) -> None:
        """Mark d down: its experts are computed here from now on, and a re-assignment of them
        to the devices left is wanted."""
        with self._lock:
            if not d.up:
                return
            d.up, d.error = False, why
            d.failures += 1
            owner = self.owner.copy()
            owner[owner == d.index] = -1
            self.owner = owner
            self._rebalance_wanted = True

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
        """Start a server on each node (a device already up on it is kept) and learn about it."""
        fresh = []
        for node in nodes:
            old = next((d for d in self.devices if d.node.id == node.id), None)
            if old is not None and old.up:
                continue
            d = Device(node, self._start_server(node), old.index if old else len(self.devices))
            if old is None:
                self.devices.append(d)
            else:  # a new server on a device that was down: its counters go on
                for f in Device.COUNTERS:
                    setattr(d, f, getattr(old, f))
                self.devices[old.index] = d
                self._stop(old)  # a server that was only late may still hold its experts
            fresh.append(d)
        for d, info in zip(fresh, self._get([d.handle.info.remote() for d in fresh], fresh, raise_damaged)):
            if info is not None:
                d.info = info

    def _place(self, plan: Assignment, raise_damaged: bool) -> dict[int, list[Pair]]:
        """Make each device of the plan serve exactly its pairs: it reads what it has on its
        flash, the coordinator sends the rest (read and checked by its ExpertStore). Returns,
        per device index, the pairs now served by the devices that did not fail."""
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
            batch: list[tuple[int, int, int, np.ndarray]] = []
            batch_bytes = 0
            for layer, e in answer["missing"]:
                blob = self.model.store.read(layer, e)
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
        placed = {}
        for d in devices:
            if d.up:
                d.pairs = list(plan[d.name])
                placed[d.index] = d.pairs
        return placed

    def start(self, raise_damaged: bool = True) -> None:
        """(Re)discover the devices and place every expert over them: a device joined since
        gets a server, a device that was down whose node is alive gets a new one (which reads
        its experts from its flash). Then generation uses the new placement."""
        self._wait_rebalance()
        nodes = device_nodes()
        if not nodes:
            raise ClusterError(
                f"the Ray cluster at {self.address} has no live node offering the '{RESOURCE}' resource, so "
                f"there is no device to serve experts: join each device with "
                f"`ray start --address=HEAD_IP:6379 --resources='{{\"{RESOURCE}\": 1}}'`"
            )
        self._add_devices(nodes, raise_damaged)
        up = [d for d in self.devices if d.up]
        plan = assign_experts({d.name: self._room(d) for d in up}, self.lengths, self.usage)
        placed = self._place(plan, raise_damaged)
        owner = np.full(self.lengths.shape, -1, np.int32)
        with self._lock:
            for index, pairs in placed.items():
                if self.devices[index].up:
                    for layer, e in pairs:
                        owner[layer, e] = index
            self.owner = owner
            self._rebalance_wanted = False
        if not any(d.up for d in self.devices):
            errors = "; ".join(f"{d.name}: {d.error}" for d in self.devices)
            raise ClusterError(f"no device of the cluster at {self.address} could serve experts ({errors})")

    refresh = start

    # -- re-assignment after a failure ---------------------------------------------
    def _maybe_rebalance(self) -> None:
        with self._lock:
            if not self._rebalance_wanted or self._rebalancer is not None or self._closed:
                return
            self._rebalancer = threading.Thread(target=self._rebalance, name="edgemoe-cluster-rebalance", daemon=True)
        self._rebalancer.start()

    def _rebalance(self) -> None:
        """On a thread: give the experts no device serves to the devices up that have room
        (assign_experts over the room each has left), send them, and only then route to them.
        A device keeps what it serves meanwhile, so calls in flight never miss an expert."""
        try:
            while True:
                with self._lock:
                    if not self._rebalance_wanted or self._closed:
                        return
                    self._rebalance_wanted = False
                    up = [d for d in self.devices if d.up]
                    owner = self.owner.copy()
                sizes = np.where(owner < 0, self.lengths, 0)  # only the experts no device serves
                room = {
                    d.name: self._room(d) - int(sum(int(self.lengths[layer, e]) for layer, e in d.pairs)) for d in up
                }
                extra = assign_experts(room, sizes, self.usage)
                plan = {d.name: d.pairs + extra[d.name] for d in up if extra[d.name]}
                placed = self._place(plan, raise_damaged=False)
                with self._lock:
                    owner = self.owner.copy()
                    for index, pairs in placed.items():
                        if self.devices[index].up:
                            for layer, e in pairs:
                                owner[layer, e] = index
                    self.owner = owner
        except Exception as e:  # a thread has nobody to raise to: say so, generation goes on locally
            warnings.warn(f"re-assigning experts after a device failure stopped: {e}", stacklevel=1)
        finally:
            with self._lock:
                self._rebalancer = None

    def _wait_rebalance(self) -> None:
        t = self._rebalancer
        if t is not None:
            t.join()

    # -- the layer -----------------------------------------------------------------
    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum [T, hidden] for x [T, hidden], ids/weights [T, k]."""
        self._maybe_rebalance()
        owner = self.owner  # one table for the whole call (a re-assignment swaps in a new one)
        T, K = ids.shape
        H = x.shape[1]
        if layer == self.first_layer:
            self.tokens += T
        where = owner[layer][ids]  # [T, k]: the device computing each slot, -1: here
        remote = where >= 0
        self.remote_slots += int(remote.sum())
        self.local_slots += int(T * K - remote.sum())
        if not remote.any():
            return _core.moe_forward(self.model.cache, layer, x, ids, weights)

        import ray  # optional dependency

        t0 = time.monotonic()
        flat_ids, flat_where = ids.reshape(-1), where.reshape(-1)
        sent = []
        for index in np.unique(flat_where[flat_where >= 0]).tolist():
            d = self.devices[index]
            slots = np.flatnonzero(flat_where == index)  # t * k + j, in slot order
            slots = slots[np.argsort(flat_ids[slots], kind="stable")]  # grouped by expert, slot order within
            experts, counts = np.unique(flat_ids[slots], return_counts=True)
            tokens, rows = np.unique(slots // K, return_inverse=True)  # each token's row sent once
            payload = (
                np.ascontiguousarray(x[tokens]),
                experts.astype(np.int32),
                counts.astype(np.int32),
                rows.astype(np.int32),
            )
            sent.append((d, slots, d.handle.forward.remote(layer, *payload)))
            d.calls += 1
            d.rows_sent += len(tokens)
            d.bytes_sent += sum(a.nbytes for a in payload)
        self.remote_calls += 1

        ys = _core.moe_forward_slots(self.model.cache, layer, x, ids, mask=~remote, weights=weights)
        t1 = time.monotonic()
        ready, _ = ray.wait([r for _, _, r in sent], num_returns=len(sent), timeout=max(0.0, t0 + self.timeout_s - t1))
        self.wait_seconds += time.monotonic() - t1
        done = set(ready)
        flat_ys = ys.reshape(T * K, H)
        redo = np.zeros(T * K, bool)
        for d, slots, ref in sent:
            why = f"no answer within {1e3 * self.timeout_s:.0f} ms"
            if ref in done:
                try:
                    out = ray.get(ref)
                    if out.shape != (len(slots), H):
                        raise ClusterError(f"answered {out.shape} for {len(slots)} rows of hidden size {H}")
                    flat_ys[slots] = out
                    d.bytes_received += out.nbytes
                    continue
                except Exception as e:  # anything a device or the link can do: its slots are computed here
                    why = f"{type(_cause(e)).__name__}: {_cause(e)}"
            self._down(d, why)
            redo[slots] = True
        if redo.any():
            self.recomputed_slots += int(redo.sum())
            again = _core.moe_forward_slots(self.model.cache, layer, x, ids, mask=redo.reshape(T, K), weights=weights)
            flat_ys[redo] = again.reshape(T * K, H)[redo]
        return _core.combine_slots(ys, weights)

    # -- accounting ----------------------------------------------------------------
    def assignment(self) -> Assignment:
        """What each device serves now, by the table calls use (devices down serve nothing)."""
        owner = self.owner
        return {d.name: [(int(layer), int(e)) for layer, e in zip(*np.nonzero(owner == d.index))] for d in self.devices}

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
                "rows_sent": d.rows_sent,
                "bytes_sent": d.bytes_sent,
                "bytes_received": d.bytes_received,
                "round_trips_per_token": d.calls / tokens if tokens else 0.0,
                "failures": d.failures,
                "blobs_sent": d.blobs_sent,
                "blob_bytes_sent": d.blob_bytes_sent,
                "blobs_from_flash": d.blobs_from_flash,
                "simd": d.info.get("simd"),
                "threads": d.info.get("threads"),
            }
        return {
            "cluster": {
                "address": self.address,
                "timeout_ms": 1e3 * self.timeout_s,
                "tokens": tokens,
                "round_trips_per_token": self.remote_calls / tokens if tokens else 0.0,
                "local_slots": self.local_slots,
                "remote_slots": self.remote_slots,
                "recomputed_slots": self.recomputed_slots,
                "wait_seconds": self.wait_seconds,
                "devices": devices,
                "assignment": {name: [list(p) for p in pairs] for name, pairs in assignment.items()},
            }
        }

    def reset_stats(self) -> None:
        self.tokens = self.remote_calls = 0
        self.local_slots = self.remote_slots = self.recomputed_slots = 0
        self.wait_seconds = 0.0
        for d in self.devices:
            for f in Device.COUNTERS:
                setattr(d, f, 0)

    def close(self) -> None:
        """Stop the device servers, give the model back its own experts, and leave the cluster
        if attach joined it."""
        import ray  # optional dependency

        with self._lock:
            self._closed = True
        self._wait_rebalance()
        if self.model.net.moe_override is self:
            self.model.net.moe_override = None
        if ray.is_initialized():
            for d in self.devices:
                self._stop(d)
            if self.owns_ray:
                ray.shutdown()


def attach(
    model: Model,
    address: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device_memory: int | str | None = None,
) -> ClusterMoE:
    """Serve `model`'s experts from the devices of the Ray cluster at `address` ("auto",
    "HOST:PORT" or "ray://HOST:PORT"): start a server on each node offering the `edgemoe`
    resource, place experts on them (assign_experts: up to device_memory bytes each, default
    half a device's available RAM), send each the blobs its flash lacks, and install the
    result as the model's MoE computation. timeout_s: how long a layer waits for a device
    before computing its experts here and marking it down. Raises ClusterError naming the
    fix when the cluster does not answer, has no device, or a device's copy is damaged."""
    owns = connect(address)
    cm = ClusterMoE(model, address, timeout_s=timeout_s, device_memory=device_memory, owns_ray=owns)
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
            f"{d['calls']} calls, {d['rows_sent']} rows, sent {format_bytes(d['bytes_sent'])}, received "
            f"{format_bytes(d['bytes_received'])}; blobs {d['blobs_sent']} sent ({format_bytes(d['blob_bytes_sent'])}),"
            f" {d['blobs_from_flash']} from its flash" + (f"; {d['error']}" if d["error"] else "")
        )
    return "\n".join(lines)
