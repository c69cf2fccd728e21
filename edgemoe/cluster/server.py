"""What runs on a device: the experts it serves, held in RAM and kept on its own flash.

`ExpertServer` is a plain class; the coordinator makes it a Ray actor pinned to the device's
node (moe.py). Blobs arrive once from the coordinator, are checked against the manifest's
CRC-32C, and are written under $EDGEMOE_CACHE/cluster/<model fingerprint>/ so that a server
started again on the same device reads them from its flash instead of the network.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import psutil

from .. import _core
from ..errors import ClusterError
from ..format.quant import input_rounds_to_int8, quantize_matrix
from ..runtime.paths import cache_root
from .channel import Listener

Pair = tuple[int, int]  # (layer, expert)
DEVICE_SECONDS = struct.Struct("<d")  # an answer opens with the seconds the device spent on the call
# Set in a device's environment (its `ray start`): the SCHED_FIFO priority its channel threads
# serve at (1-99; unset or 0: ordinary). `edgemoe cluster local` sets it for its nodes.
SERVE_PRIORITY_ENV = "EDGEMOE_SERVE_PRIORITY"


def serve_priority() -> int:
    """This device's channel priority from SERVE_PRIORITY_ENV; a value that is not one is a
    ClusterError naming it."""
    raw = os.environ.get(SERVE_PRIORITY_ENV, "").strip()
    try:
        value = int(raw or 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 99:
        raise ClusterError(
            f"{SERVE_PRIORITY_ENV}={raw!r} on this device: give a SCHED_FIFO priority from 1 to 99, "
            "or 0 (or leave it unset) to serve at ordinary priority"
        )
    return value


def available_bytes() -> int:
    """RAM this process can still take: the machine's available memory, or less when its
    cgroup v1 memory limit leaves less (a device of `edgemoe cluster local`)."""
    free = int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                group = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                limit = int((group / "memory.limit_in_bytes").read_text())
                usage = int((group / "memory.usage_in_bytes").read_text())
                free = min(free, max(0, limit - usage))
    except (OSError, ValueError):  # no cgroup v1 memory controller to be seen here
        pass
    return free


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 32 MiB where it reports none."""
    largest = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return largest or 32 << 20


def expert_rate(blob: np.ndarray, hidden: int, seconds: float = 0.05) -> float:
    """Expert weight bytes per second this process computes one token's row through, with the
    weights coming from RAM as decode's do: `blob` (one expert of hidden size `hidden`) is
    copied until the copies span twice the last-level cache (at most 16), and the runs cycle
    through them, for about `seconds` and at least three runs. One blob run again and again
    would be read from the cache and measure a device faster than it is."""
    blob = np.ascontiguousarray(blob, np.uint8)
    n = int(min(16, max(1, -(-2 * last_level_cache_bytes() // max(blob.size, 1)))))
    copies = [blob] + [blob.copy() for _ in range(n - 1)]
    x = np.full((1, hidden), 0.01, np.float32)
    for c in copies:  # touched once, so the timed runs do not take page faults
        _core.expert_forward(x, c)
    runs, t0 = 0, time.perf_counter()
    while True:
        _core.expert_forward(x, copies[runs % n])
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and runs >= 3:
            return runs * blob.size / elapsed


def copies_dir(fingerprint: str) -> Path:
    """Where a device keeps its copies of one model's experts."""
    return cache_root() / "cluster" / fingerprint


class ExpertServer:
    """One device's experts: `hold` says which, `put` delivers the ones it lacks, `forward`
    computes them for the rows the coordinator sends."""

    def __init__(self, fingerprint: str, name: str, threads: int = 0):
        if threads > 0:
            _core.set_num_threads(threads)
        _core.set_thread_spin(0)  # a call per layer now and then: idle threads leave the cores at once
        self.name = name
        self.dir = copies_dir(fingerprint)
        self.blobs: dict[Pair, np.ndarray] = {}
        self._int8_input: dict[Pair, bool] = {}  # input_rounds_to_int8 of the blobs held
        self.flash_error: str | None = None  # why copies are not kept on flash, if they are not
        self.priority = serve_priority()
        self.listener: Listener | None = None

    def info(self) -> dict[str, object]:
        """What the coordinator shows about this device."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "simd": _core.simd(),
            "threads": _core.get_num_threads(),
            "available_bytes": available_bytes(),
            "copies_dir": str(self.dir),
            "flash_error": self.flash_error,
            "serve_priority": self.priority,
            "rounds_int8_input": ROUNDING_KERNELS,
            "rounds_int8_prefill": PREFILL_ROUNDING,
        }

    def open_channel(self, host: str) -> tuple[str, int, str | None]:
        """Listen on `host` (this node's address) for the coordinator's layer calls
        (channel.py): (host, port) to connect to, and why the calls are not served at the
        priority SERVE_PRIORITY_ENV gives (None: they are). Calls on it run forward on a thread
        of this process, beside Ray's."""
        if self.listener is None:
            self.listener = Listener(host, self.forward, self.priority)
        return (*self.listener.address, self.listener.priority_error)

    def ping(self, payload: np.ndarray | None = None) -> int:
        """The round trip the coordinator times (with a payload: the link's bandwidth)."""
        return 0 if payload is None else int(payload.nbytes)

    def probe(self, blob: np.ndarray, hidden: int, seconds: float = 0.05) -> float:
        """Expert weight bytes per second this device computes one token's row through (for
        the placement plan): expert_rate on `blob`, one expert of hidden size `hidden`."""
        return expert_rate(np.array(blob, np.uint8), hidden, seconds)

    def _rounds_to_int8(self, layer: int, expert: int, blob: np.ndarray) -> bool:
        pair = (layer, expert)
        known = self._int8_input.get(pair)
        if known is None:
            known = self._int8_input[pair] = input_rounds_to_int8(blob)
        return known

    def _path(self, layer: int, expert: int) -> Path:
        return self.dir / f"layer{layer}-expert{expert}.blob"

    def _damaged(self, layer: int, expert: int, where: str, fix: str) -> ClusterError:
        return ClusterError(
            f"device {self.name}: its copy of expert {expert} of layer {layer} ({where}) failed its "
            f"checksum against the manifest: {fix}"
        )

    def hold(self, wanted: list[tuple[int, int, int, int]]) -> dict[str, object]:
        """Serve exactly the experts `wanted` ((layer, expert, length, crc32c) each): those held
        already stay, those on this device's flash are read and checked, the others are
        dropped. Returns {"missing": pairs the coordinator must send, "from_flash": how many
        were read from flash, "int8_input": the pairs held whose input rounds to int8 (a one-row
        call may carry it so)}. A flash copy that fails its checksum raises ClusterError."""
        keep: dict[Pair, np.ndarray] = {}
        from_flash = 0
        for layer, expert, length, crc in wanted:
            pair = (layer, expert)
            if pair in self.blobs:
                keep[pair] = self.blobs[pair]
                continue
            path = self._path(layer, expert)
            if not path.is_file():
                continue
            blob = np.fromfile(path, np.uint8)
            if blob.size != length or _core.crc32c(blob) != crc:
                raise self._damaged(
                    layer,
                    expert,
                    str(path),
                    f"the copy on that device's flash is damaged; delete {self.dir} on that device "
                    "and load again (the coordinator then sends its experts again)",
                )
            keep[pair] = blob
            from_flash += 1
        self.blobs = keep
        self._int8_input.clear()
        missing = [(layer, expert) for layer, expert, _, _ in wanted if (layer, expert) not in keep]
        int8_input = [pair for pair, blob in keep.items() if self._rounds_to_int8(*pair, blob)]
        return {"missing": missing, "from_flash": from_flash, "int8_input": int8_input}

    def put(self, items: list[tuple[int, int, int, np.ndarray]]) -> int:
        """Take blobs sent by the coordinator ((layer, expert, crc32c, blob) each): check each,
        keep it in RAM and write it to this device's flash. Returns the bytes taken."""
        taken = 0
        for layer, expert, crc, data in items:
            blob = np.array(data, np.uint8)  # our own copy: the argument views Ray's object store
            if _core.crc32c(blob) != crc:
                raise self._damaged(
                    layer, expert, "as received", "it was damaged on the way; load again to send it once more"
                )
            self.blobs[(layer, expert)] = blob
            self._int8_input.pop((layer, expert), None)
            taken += blob.size
            self._keep_on_flash(layer, expert, blob)
        return taken

    def _keep_on_flash(self, layer: int, expert: int, blob: np.ndarray) -> None:
        """Write a copy for the next server on this device; a device without room still serves
        from RAM (the failure is shown in info)."""
        path = self._path(layer, expert)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            blob.tofile(tmp)
            os.replace(tmp, path)  # a reader never sees half a blob
        except OSError as e:
            self.flash_error = f"{path}: {e}"
            tmp.unlink(missing_ok=True)

    def forward(self, call: bytes) -> bytes:
        """One MoE layer's call (pack_call's bytes): expert outputs for rows of x, grouped by
        expert in slot order -> the seconds this took (DEVICE_SECONDS), then [sum counts,
        hidden] float32 as bytes. Each expert computes all its rows in one call, as moe_forward
        batches them, so the numbers are the coordinator's bit for bit."""
        t_a = time.perf_counter()
        layer, x, experts, counts, rows = unpack_call(call)
        rounded = call_form(call) == FORM_ROUNDED
        xs, blobs = [], []
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            blob = self.blobs.get((layer, e))
            if blob is None:
                raise ClusterError(f"device {self.name} does not hold expert {e} of layer {layer}")
            if rounded and not (
                rows_round_to_int8(n, ROUNDING_KERNELS, PREFILL_ROUNDING) and self._rounds_to_int8(layer, e, blob)
            ):
                raise ClusterError(
                    f"device {self.name} got expert {e} of layer {layer} an input rounded to int8, which its "
                    f"kernels ({_core.simd()}) do not round so for {n} rows (or it is not 4-bit): the "
                    "coordinator must send float32"
                )
            xs.append(np.ascontiguousarray(x[rows[start : start + n]]))
            blobs.append(blob)
            start += n
        body = b"".join(y.tobytes() for y in _core.experts_forward(xs, blobs))
        return DEVICE_SECONDS.pack(time.perf_counter() - t_a) + body


# A layer's call travels as one bytes object: Ray passes bytes through without pickling, where
# four numpy arguments cost it about 0.5 ms more per call to submit and as much to receive
# (docs/cluster.md, Data path). Little-endian int32 header [layer, tokens, hidden, experts,
# rows, form], then x: float32 [tokens, hidden] (FORM_FLOAT32), or int8 [tokens, hidden] and
# float32 block maxima [tokens, hidden / 32] (FORM_ROUNDED, round_rows); then experts int32,
# counts int32, rows int32.
_HEADER = np.dtype("<i4")
_HEADER_FIELDS = 6
FORM_FLOAT32, FORM_ROUNDED = 0, 1
# Whether this build's one-token decode rounds a 4-bit expert's input as round_rows does (the
# AVX2 and NEON kernels; the portable build multiplies float32 x).
ROUNDING_KERNELS = not _core.simd().startswith("portable")
# Whether its prefill does, for GEMM_MIN_TOKENS rows or more (the x86 SIMD builds' integer
# prefill; 2 to GEMM_MIN_TOKENS - 1 rows multiply float32 x everywhere).
PREFILL_ROUNDING = ROUNDING_KERNELS and _core.prefill_int8(
    quantize_matrix(np.zeros((1, 32), np.float32), 4, 32, True), 0, True
)
# The smallest block maximum round_rows rounds: 127 / amax and amax / 127 stay normal floats.
ROUND_MIN_AMAX = 1e-30


def rows_round_to_int8(rows: int, decode: bool, prefill: bool) -> bool:
    """Whether an expert given `rows` rows in one call rounds a 4-bit input to int8 on a
    device whose one-token decode (decode) and integer prefill (prefill) round so: one row,
    or GEMM_MIN_TOKENS rows or more."""
    return (rows == 1 and decode) or (rows >= _core.GEMM_MIN_TOKENS and prefill)


def round_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """x [T, hidden] float32 -> (q int8 [T, hidden], amax float32 [T, hidden / 32]): each block
    of 32 values rounded as the one-token decode kernels round a 4-bit expert's input (step
    amax / 127, nearest with ties to even), or None where that cannot be undone exactly (a
    hidden size not a multiple of 32, values that are not finite, a block too small to take
    a step). Native: a layer's call cannot spend numpy's tens of microseconds on it."""
    return _core.round_rows_x8(x, ROUND_MIN_AMAX)


def unround_rows(q: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """round_rows' (q, amax) -> x' [T, hidden] float32 that the decode kernels round to the same
    q and step as the x it came from, so a 4-bit expert's output for x' is its output for x,
    bit for bit: q * (amax / 127), and exactly +-amax where |q| is 127 (so the block's largest
    value, and with it the step, is amax again; the others are within 2^-20 of an integer
    multiple of the step, far from a rounding boundary)."""
    return _core.unround_rows_x8(q, amax)


def pack_call(
    layer: int, x: np.ndarray, experts: np.ndarray, counts: np.ndarray, rows: np.ndarray, rounded: bool = False
) -> bytes:
    """The bytes of one layer's call to a device: x [tokens, hidden] float32, experts [G] each
    taking counts[g] rows, rows [sum counts] indexing x. rounded: x travels as round_rows'
    int8 values and block maxima (a quarter of the bytes), for a call whose experts all round
    their input to int8 for their row counts on that device (4-bit experts,
    rows_round_to_int8); falls back to float32 where round_rows declines."""
    parts_x: list[np.ndarray] = [x.astype("<f4", copy=False)]
    form = FORM_FLOAT32
    if rounded:
        r = round_rows(x)
        if r is not None:
            parts_x, form = list(r), FORM_ROUNDED
    head = np.array([layer, x.shape[0], x.shape[1], experts.size, rows.size, form], _HEADER)
    parts = [head, *parts_x, experts.astype("<i4"), counts.astype("<i4"), rows.astype("<i4")]
    return b"".join(np.ascontiguousarray(a).tobytes() for a in parts)


def call_form(call: bytes) -> int:
    """The form x takes in pack_call's bytes (FORM_FLOAT32 or FORM_ROUNDED; -1: no header)."""
    return int(np.frombuffer(call, _HEADER, 1, 4 * (_HEADER_FIELDS - 1))[0]) if len(call) >= 4 * _HEADER_FIELDS else -1


def unpack_call(call: bytes) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pack_call's arguments back (x as float32, unround_rows' x' for a rounded call), as
    read-only views of `call` where they can be; a call whose length does not match its
    header is a ClusterError."""
    head = 4 * _HEADER_FIELDS
    if len(call) < head:
        raise ClusterError(f"a layer's call of {len(call)} bytes is shorter than its header")
    layer, tokens, hidden, groups, nrows, form = (int(v) for v in np.frombuffer(call, _HEADER, _HEADER_FIELDS))
    if form not in (FORM_FLOAT32, FORM_ROUNDED) or (form == FORM_ROUNDED and hidden % 32):
        raise ClusterError(f"a layer's call has an unknown form of x ({form}, hidden size {hidden})")
    x_bytes = 4 * tokens * hidden if form == FORM_FLOAT32 else tokens * hidden + 4 * tokens * (hidden // 32)
    if min(layer, tokens, hidden, groups, nrows) < 0 or len(call) != head + x_bytes + 4 * (2 * groups + nrows):
        raise ClusterError(
            f"a layer's call of {len(call)} bytes does not match its header {layer, tokens, hidden, groups, nrows}"
        )
    at = head
    if form == FORM_FLOAT32:
        x = np.frombuffer(call, "<f4", tokens * hidden, at).reshape(tokens, hidden)
    else:
        q = np.frombuffer(call, np.int8, tokens * hidden, at).reshape(tokens, hidden)
        amax = np.frombuffer(call, "<f4", tokens * (hidden // 32), at + tokens * hidden).reshape(tokens, hidden // 32)
        x = unround_rows(q, amax)
    at += x_bytes
    experts = np.frombuffer(call, "<i4", groups, at)
    counts = np.frombuffer(call, "<i4", groups, at + 4 * groups)
    rows = np.frombuffer(call, "<i4", nrows, at + 8 * groups)
    if int(counts.sum()) != nrows or (nrows and (rows.min() < 0 or rows.max() >= tokens)):
        raise ClusterError(f"a layer's call names rows outside its {tokens} tokens")
    return layer, x, experts, counts, rows
