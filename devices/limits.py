"""Real resource limits for tests and benchmarks: cgroup v1 memory caps, blkio
read throttling (to emulate a device's storage), and page-cache eviction.

Only cgroups this module creates are touched, and each is removed on close.
Needs root and cgroup v1 controllers mounted at /sys/fs/cgroup/{memory,blkio}.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_v1_available(controller: str = "memory") -> tuple[bool, str]:
    """(usable, reason): whether we can create a cgroup v1 group under `controller`."""
    base = CGROUP_ROOT / controller
    if not (base / "cgroup.procs").exists():
        return False, f"cgroup v1 '{controller}' controller is not mounted at {base}"
    if os.geteuid() != 0:
        return False, "creating cgroups needs root"
    probe = base / f"edgemoe-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return False, f"cannot create a cgroup under {base}: {e.strerror}"
    return True, "ok"


def block_device_of(path: str | os.PathLike[str]) -> str:
    """'major:minor' of the whole disk holding `path` (blkio throttles whole devices)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dev / "partition").exists():  # a partition: throttle its parent disk
        parent = sys_dev.resolve().parent
        return (parent / "dev").read_text().strip()
    return f"{major}:{minor}"


def drop_page_cache(*paths: str | os.PathLike[str]) -> None:
    """Evict files from the page cache (posix_fadvise DONTNEED) so the next read hits storage."""
    for p in paths:
        p = Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd) if os.access(f, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_memory_bytes: int  # memory.max_usage_in_bytes of the run's own cgroup (RSS + page cache)
    oom_killed: bool
    read_bytes: int  # bytes the process read from storage (/proc/PID/io read_bytes, children included)


class Cgroup:
    """A fresh cgroup v1 memory group (and optional blkio group) of our own."""

    def __init__(
        self, memory_limit: int | None = None, read_bps: int | None = None, device_path: str | os.PathLike[str] = "/"
    ):
        tag = f"edgemoe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.memory = CGROUP_ROOT / "memory" / tag
        self.memory.mkdir()
        self.blkio: Path | None = None
        try:
            # no swap on these machines; pages over the limit must be reclaimed or the task is OOM-killed
            if memory_limit is not None:
                (self.memory / "memory.limit_in_bytes").write_text(str(int(memory_limit)))
            if read_bps is not None:
                self.blkio = CGROUP_ROOT / "blkio" / tag
                self.blkio.mkdir()
                dev = block_device_of(device_path)
                (self.blkio / "blkio.throttle.read_bps_device").write_text(f"{dev} {int(read_bps)}")
        except BaseException:
            self.close()
            raise

    def add(self, pid: int) -> None:
        (self.memory / "cgroup.procs").write_text(str(pid))
        if self.blkio is not None:
            (self.blkio / "cgroup.procs").write_text(str(pid))

    def peak_memory(self) -> int:
        return int((self.memory / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.memory / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        for group in (self.memory, self.blkio):
            if group is None or not group.exists():
                continue
            for _ in range(50):  # the kernel frees the group a moment after its last task exits
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start cmd inside this group (it joins before exec) and return at once: for a
        process that runs while something else measures it (a server under load)."""
        procs = [str(self.memory / "cgroup.procs")] + ([str(self.blkio / "cgroup.procs")] if self.blkio else [])

        def join() -> None:
            for p in procs:
                with open(p, "w") as f:
                    f.write(str(os.getpid()))

        return subprocess.Popen(list(cmd), preexec_fn=join, **kwargs)  # type: ignore[call-overload]

    def run(
        self,
        cmd: Sequence[str],
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> LimitedRun:
        """Run cmd inside this group (it joins before exec, so every allocation counts)."""
        procs = [str(self.memory / "cgroup.procs")] + ([str(self.blkio / "cgroup.procs")] if self.blkio else [])

        def join() -> None:
            pid = str(os.getpid())
            for p in procs:
                with open(p, "w") as f:
                    f.write(pid)

        read_before = _children_read_bytes()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=join, env=env, cwd=cwd
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        wall = time.perf_counter() - t0
        read_bytes = _children_read_bytes() - read_before
        return LimitedRun(
            proc.returncode,
            out,
            err,
            wall,
            self.peak_memory(),
            self.oom_kills() > 0 or proc.returncode == -9,
            read_bytes,
        )


def _children_read_bytes() -> int:
    """Storage bytes read so far by reaped children (the kernel's read_bytes, in 512-byte units)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock * 512
