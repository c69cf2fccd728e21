"""This machine as a device profile: RAM and cores from psutil, CPU flags from /proc/cpuinfo,
and measured bandwidths (storage with O_DIRECT, memory with a numpy copy).

m = detect_machine(probe_file=None, probe_bytes=64 << 20)   # writes, reads and removes a temp file
m.profile()                                                 # a DeviceProfile of this machine
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from . import DeviceProfile, estimate_int4_bytes_per_s

PAGE = 4096
BLOCK = 1 << 20  # one O_DIRECT read: a mid-sized expert
FLAGS_OF_INTEREST = ("avx2", "avx512f", "fma", "f16c", "neon", "asimd", "asimddp", "sve")


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> list[str]:
    """The SIMD flags this CPU reports (x86 'flags', ARM 'Features'); ARM's asimd is NEON."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    have: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            have.update(value.split())
    if "asimd" in have:
        have.add("neon")
    return [f for f in FLAGS_OF_INTEREST if f in have]


def cpu_max_hz(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> float:
    """The fastest core's clock: psutil's maximum, else its current, else /proc/cpuinfo's 'cpu MHz'."""
    freq = psutil.cpu_freq()
    if freq is not None and (freq.max or freq.current):
        return float(freq.max or freq.current) * 1e6
    try:
        mhz = [
            float(v)
            for k, _, v in (ln.partition(":") for ln in Path(cpuinfo).read_text().splitlines())
            if k.strip() == "cpu MHz"
        ]
    except (OSError, ValueError):
        mhz = []
    return max(mhz, default=0.0) * 1e6


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def measure_memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> int:
    """Bytes per second a numpy copy moves (read + write), best of `repeats`: a floor of the
    DRAM bandwidth one thread reaches."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return int(2 * src.nbytes / best)


@dataclass
class ReadProbe:
    """A measured read: bandwidth of large reads, latency of 4 KiB reads, and how it was read."""

    path: str
    bytes_read: int
    read_bytes_per_s: int
    read_latency_s: float
    direct: bool  # O_DIRECT; False when the filesystem refused it (tmpfs) and the page cache was dropped instead
    temporary: bool


def _open_direct(path: Path) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def _timed_reads(path: Path, limit: int, latency_reads: int) -> tuple[int, float, float, bool]:
    """(bytes read, seconds, median 4 KiB read latency, O_DIRECT) for the first `limit` bytes of path."""
    size = min(path.stat().st_size, limit) // PAGE * PAGE
    if size < PAGE:
        raise ValueError(f"{path} is smaller than one {PAGE}-byte page: nothing to measure")
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    fd, direct = _open_direct(path)
    lat = []
    try:
        t = time.perf_counter()
        done = 0
        while done < size:
            n = os.preadv(fd, [view[: min(BLOCK, size - done)]], done)
            if n <= 0:
                break
            done += n
        elapsed = time.perf_counter() - t
        for off in np.random.default_rng(0).integers(0, size // PAGE, latency_reads) * PAGE:
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, int(off), PAGE, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            os.preadv(fd, [view[:PAGE]], int(off))
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return done, elapsed, float(np.median(lat)) if lat else 0.0, direct


def measure_read(
    path: str | os.PathLike[str] | None = None,
    directory: str | os.PathLike[str] | None = None,
    nbytes: int = 64 << 20,
    latency_reads: int = 32,
) -> ReadProbe:
    """Storage read speed: of `path` (its first `nbytes`), or of a temporary file of `nbytes`
    written into `directory` (default: the system's temp directory), synced, read and removed.
    Reads bypass the page cache with O_DIRECT (1 MiB blocks; latency from 4 KiB reads)."""
    if path is not None:
        done, elapsed, lat, direct = _timed_reads(Path(path), nbytes, latency_reads)
        return ReadProbe(str(path), done, int(done / max(elapsed, 1e-9)), lat, direct, False)
    nbytes = max(PAGE, nbytes // PAGE * PAGE)
    fd, name = tempfile.mkstemp(prefix="edgemoe-probe-", dir=directory)
    tmp = Path(name)
    try:
        chunk = np.random.default_rng(0).integers(0, 256, min(nbytes, BLOCK), dtype=np.uint8).tobytes()
        with os.fdopen(fd, "wb") as f:
            for start in range(0, nbytes, len(chunk)):
                f.write(chunk[: nbytes - start])
            f.flush()
            os.fsync(f.fileno())
        done, elapsed, lat, direct = _timed_reads(tmp, nbytes, latency_reads)
    finally:
        tmp.unlink(missing_ok=True)
    return ReadProbe(str(tmp), done, int(done / max(elapsed, 1e-9)), lat, direct, True)


@dataclass
class MachineInfo:
    """What detect_machine found."""

    ram_total_bytes: int
    ram_available_bytes: int
    logical_cores: int
    physical_cores: int
    cpu_hz: float
    cpu_flags: list[str]
    memory_bytes_per_s: int
    read: ReadProbe | None
    notes: list[str] = field(default_factory=list)

    def int4_bytes_per_s(self) -> int:
        return estimate_int4_bytes_per_s(self.memory_bytes_per_s, self.physical_cores, self.cpu_hz)

    def profile(self) -> DeviceProfile:
        """This machine as a DeviceProfile (sources say what was measured and what estimated)."""
        r = self.read
        how = "measured by edgemoe devices --detect"
        return DeviceProfile(
            name="this-machine",
            description="this machine, detected",
            ram_bytes=self.ram_total_bytes,
            cpu_cores=self.physical_cores,
            storage_kind=("O_DIRECT" if r.direct else "page cache dropped") if r else "unknown",
            read_bytes_per_s=r.read_bytes_per_s if r else 0,
            read_latency_s=r.read_latency_s if r else 0.0,
            memory_bytes_per_s=self.memory_bytes_per_s,
            cpu_hz=self.cpu_hz,
            int4_bytes_per_s=self.int4_bytes_per_s(),
            sources={
                "ram_bytes": "psutil.virtual_memory().total",
                "cpu_cores": "psutil.cpu_count(logical=False)",
                "storage.read_bytes_per_s": how,
                "storage.read_latency_s": how,
                "memory_bytes_per_s": f"{how} (one-thread numpy copy: a floor of the DRAM bandwidth)",
                "compute.cpu_hz": "psutil.cpu_freq() or /proc/cpuinfo",
                "compute.int4_bytes_per_s": "estimate: devices.estimate_int4_bytes_per_s of the figures above",
            },
        )


def detect_machine(
    probe_file: str | os.PathLike[str] | None = None,
    probe_dir: str | os.PathLike[str] | None = None,
    probe_bytes: int = 64 << 20,
    measure_storage: bool = True,
) -> MachineInfo:
    """Describe this machine; with measure_storage, time reads of `probe_file` (e.g. a
    model's experts file) or of a temporary file written into `probe_dir` and removed."""
    vm = psutil.virtual_memory()
    notes: list[str] = []
    read = None
    if measure_storage:
        read = measure_read(probe_file, probe_dir, probe_bytes)
        if not read.direct:
            notes.append(
                f"{read.path}: the filesystem refused O_DIRECT (tmpfs?); read through the page cache after dropping it"
            )
        if read.bytes_read < 16 * BLOCK:
            notes.append(f"only {read.bytes_read} bytes were read: the bandwidth is rough")
    return MachineInfo(
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        logical_cores=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        cpu_hz=cpu_max_hz(),
        cpu_flags=cpu_flags(),
        memory_bytes_per_s=measure_memory_bandwidth(),
        read=read,
        notes=notes,
    )
