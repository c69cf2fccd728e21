"""A live `edgemoe serve` for tests: the real command in a process of its own, on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx


class Served:
    """A running `edgemoe serve`; .url is its base address, .log what it printed."""

    def __init__(self, model_dir: Path | None, *args: str, preexec_fn: Callable[[], None] | None = None):
        cmd = [sys.executable, "-m", "edgemoe.cli", "serve", *([str(model_dir)] if model_dir else []), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.proc.kill()
            raise RuntimeError("edgemoe serve did not start:\n" + "".join(self.log) + self.proc.stderr.read())
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics as {name{labels}: value}."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
