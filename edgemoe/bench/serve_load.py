"""`edgemoe bench --serve`: a load test of `edgemoe serve`. The server runs as its own process
inside a cgroup v1 memory limit of Model.memory_needed (at the server's context) plus the
server's overhead, measured first; clients stream completions from it, one alone and then N
at once, each for a bounded time. Reported: requests sent, completed and lost, aggregate
tokens/s, expert bytes read per generated token, time to first token (p50, p99), the cgroup's
peak memory and whether anything was killed. With --batch 1,8 the same phases run once per
server mode (`edgemoe serve --batch`: 1 queues requests, N decodes up to N together), each in
its own limit (memory_needed counts a KV cache per sequence). The clients are threads of this
process, outside the cgroup."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices.limits import Cgroup, cgroup_v1_available
from ..planning.default_model import SHIPPED
from ..runtime.engine import load
from ..units import format_bytes, parse_bytes

PROMPTS_FILE = SHIPPED / "test.txt"


@dataclass
class Result:
    """What one phase of clients saw."""

    clients: int
    seconds: float = 0.0
    sent: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    tokens: int = 0
    bytes_read: int = 0  # expert bytes the server read during the phase
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.sent,
            "completed": self.completed,
            "lost": self.sent - self.completed,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "bytes_per_token": self.bytes_read / self.tokens if self.tokens else 0.0,
            "ttft_p50_s": _pct(self.ttft, 0.50),
            "ttft_p99_s": _pct(self.ttft, 0.99),
            "latency_p50_s": _pct(self.latency, 0.50),
            "errors": self.failed[:5],
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def prompts(n: int = 64, words: int = 24) -> list[str]:
    """Prompts of about `words` words cut from the default model's held-out text."""
    text = PROMPTS_FILE.read_text(encoding="utf-8").split() if PROMPTS_FILE.is_file() else ["The", "Linux", "kernel"]
    step = max(1, (len(text) - words) // n)
    return [" ".join(text[i * step : i * step + words]) for i in range(n)]


class ServerProcess:
    """`edgemoe serve` as a child process (in a cgroup when given one)."""

    def __init__(self, model: str, args: list[str], cgroup: Cgroup | None = None):
        cmd = [sys.executable, "-m", "edgemoe.cli", "serve", model, "--port", "0", *args]
        kw: dict[str, Any] = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kw["env"] = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = cgroup.popen(cmd, **kw) if cgroup else subprocess.Popen(cmd, **kw)
        self.log: list[str] = []
        assert self.proc.stderr is not None
        self.url = ""
        for line in self.proc.stderr:
            self.log.append(line)
            if " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]
                break
        if not self.url:
            self.proc.wait()
            raise RuntimeError("edgemoe serve did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def status_bytes(self, key: str) -> int:
        """A /proc/PID/status memory line (VmRSS, VmHWM) in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int | None:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_clients(url: str, clients: int, seconds: float, max_tokens: int, texts: list[str | list[int]]) -> Result:
    """`clients` threads, each sending streamed completions one after the other until
    `seconds` have passed; a request started before then is waited for and counted."""
    import httpx

    result = Result(clients)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, timeout=600) as c:
            while time.perf_counter() < deadline:
                body = {
                    "prompt": texts[i % len(texts)],
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": i,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                i += clients
                t0 = time.perf_counter()
                first, tokens, error = None, 0, None
                with lock:
                    result.sent += 1
                try:
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}: {r.read().decode()[:200]}"
                        else:
                            for line in r.iter_lines():
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                chunk = json.loads(line[6:])
                                if "error" in chunk:
                                    error = chunk["error"]["message"]
                                elif chunk.get("usage"):
                                    tokens = chunk["usage"]["completion_tokens"]
                                elif first is None and chunk["choices"][0]["text"]:
                                    first = time.perf_counter() - t0
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                with lock:
                    if error or tokens != max_tokens:
                        result.failed.append(error or f"{tokens} tokens of {max_tokens}")
                    else:
                        result.completed += 1
                        result.tokens += tokens
                        result.ttft.append(first if first is not None else time.perf_counter() - t0)
                        result.latency.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    read0 = _bytes_read(url)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    result.bytes_read = _bytes_read(url) - read0
    return result


def _bytes_read(url: str) -> int:
    """The expert bytes the server has read so far (its /api/cache view)."""
    import httpx

    return int(httpx.get(url + "/api/cache", timeout=60).json()["bytes_read"])


def bare_peak_rss(model: str, budget: int, max_tokens: int, prompt: str | list[int]) -> int:
    """Peak RSS of a plain Python process that loads the model and generates one request:
    the baseline the server's overhead is measured against."""
    code = (
        "import sys, edgemoe\n"
        "from edgemoe.runtime.engine import peak_rss_bytes\n"
        f"m = edgemoe.load({model!r}, memory_budget={budget})\n"
        f"m.generate({prompt!r}, max_new_tokens={max_tokens}, temperature=0.8, seed=0)\n"
        "print(peak_rss_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `edgemoe bench --serve` (the CLI passes its parser class, which checks values)."""
    ap = parser_class(prog="edgemoe bench --serve", description=__doc__)
    ap.add_argument("model", nargs="?", default=None, help="a converted model directory (default: the default model)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--duration", type=float, default=120, help="seconds of N clients (default 120)")
    ap.add_argument("--alone", type=float, default=None, help="seconds of one client alone (default: duration/2)")
    ap.add_argument(
        "--budget", default="50%", help="expert budget: bytes or a percentage of the expert bytes (default 50%%)"
    )
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument(
        "--limit",
        default="auto",
        help="the cgroup memory limit: auto (Model.memory_needed plus the server's measured overhead), "
        "a size, or none (default auto)",
    )
    ap.add_argument(
        "--overhead-seconds",
        type=float,
        default=5.0,
        help="the burst the server's overhead is measured under (default 5)",
    )
    ap.add_argument(
        "--batch",
        default="1",
        help="server modes to compare, comma separated: 1 queues requests, N decodes up to N together "
        "(edgemoe serve --batch; default 1)",
    )
    ap.add_argument("--json", dest="json_out", default=None, help="write the results to this file")
    return ap


def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))


def budget_bytes(value: str, expert_bytes: int, min_budget: int) -> int:
    """--budget: bytes (20MB) or a percentage of the expert bytes (50%, at least the minimum
    budget). Raises ValueError (or EdgeMoEError for a size) naming what is wrong."""
    if value.endswith("%"):
        share = float(value[:-1])
        if not 0 < share <= 100:
            raise ValueError("a percentage above 0 and at most 100")
        return max(min_budget, int(expert_bytes * share / 100))
    return parse_bytes(value) or 0


def run(args: argparse.Namespace) -> int:

    from ..planning.default_model import default_model_path

    model = args.model or str(default_model_path())
    given = args.batch  # the CLI gives a checked list; argparse alone the text
    batches = [int(b) for b in (given if isinstance(given, list) else str(given).split(",")) if str(b).strip()]
    probe = load(model, preload="none")
    expert_bytes = probe.info()["expert_bytes"]
    budget = budget_bytes(args.budget, expert_bytes, probe.min_budget)
    sized = load(model, memory_budget=budget, preload="none")
    context = min(int(sized.manifest["config"].get("max_position_embeddings") or 2048), 2048)
    needed = {b: sized.memory_needed(context, sequences=b) for b in batches}
    # a prompt takes at most half of what the completion leaves of the context; one longer
    # (a small tokenizer cuts words into many tokens) is sent as its first token ids
    longest = (context - args.max_tokens - 1) // 2
    texts: list[str | list[int]] = []
    for text in prompts():
        ids = sized.encode(text)
        texts.append(text if len(ids) <= longest else ids[:longest])
    del probe, sized
    print(
        f"model {model}: experts {format_bytes(expert_bytes)}, budget {format_bytes(budget)} "
        f"({100 * budget / expert_bytes:.0f}%), Model.memory_needed({context}) {format_bytes(needed[batches[0]])}",
        flush=True,
    )
    bare = bare_peak_rss(model, budget, args.max_tokens, texts[0])
    modes = [_run_mode(args, model, budget, context, b, needed[b], bare, texts) for b in batches]
    report = {
        "model": model,
        "expert_bytes": expert_bytes,
        "budget": budget,
        "context": context,
        "max_tokens": args.max_tokens,
        "modes": modes,
    }
    print(table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    bad = any(m["killed"] or m["alone"]["lost"] or m["concurrent"]["lost"] for m in modes)
    return 1 if bad else 0


def _run_mode(
    args: argparse.Namespace,
    model: str,
    budget: int,
    context: int,
    batch: int,
    needed: int,
    bare: int,
    texts: list[str | list[int]],
) -> dict[str, Any]:
    """One server mode (--batch): its overhead, then one client alone and N at once in its limit."""
    serve_args = ["--memory-budget", str(budget), "--context", str(context), "--batch", str(batch)]
    # the server's overhead: its peak RSS under a short burst of the same load, against a
    # plain process that loads the model and generates
    s = ServerProcess(model, serve_args)
    try:
        run_clients(s.url, args.clients, args.overhead_seconds, args.max_tokens, texts)
        served = s.status_bytes("VmHWM")
    finally:
        s.stop()
    overhead = max(0, served - bare)
    print(
        f"--batch {batch}: peak RSS: plain process {format_bytes(bare)}, server under load {format_bytes(served)}: "
        f"overhead {format_bytes(overhead)}",
        flush=True,
    )
    if args.limit == "none":
        limit = None
    elif args.limit == "auto":
        limit = needed + overhead
    else:
        limit = parse_bytes(args.limit)
    cgroup = None
    if limit is not None:
        ok, reason = cgroup_v1_available("memory")
        if not ok:
            print(f"edgemoe bench --serve: no memory limit: {reason}", file=sys.stderr)
            limit = None
        else:
            cgroup = Cgroup(memory_limit=limit)
    print(f"--batch {batch}: memory limit: {format_bytes(limit) if limit else 'none'}", flush=True)
    try:
        s = ServerProcess(model, serve_args, cgroup)
        try:
            alone = run_clients(
                s.url, 1, args.alone if args.alone is not None else args.duration / 2, args.max_tokens, texts
            )
            print(f"--batch {batch}: 1 client: {alone.row()}", flush=True)
            many = run_clients(s.url, args.clients, args.duration, args.max_tokens, texts)
            print(f"--batch {batch}: {args.clients} clients: {many.row()}", flush=True)
            alive = s.proc.poll() is None
            rss_peak = s.status_bytes("VmHWM") if alive else 0
        finally:
            code = s.stop()
        peak = cgroup.peak_memory() if cgroup else rss_peak
        killed = (cgroup.oom_kills() > 0 if cgroup else False) or not alive
    finally:
        if cgroup:
            cgroup.close()
    return {
        "batch": batch,
        "memory_needed": needed,
        "server_overhead": overhead,
        "limit": limit,
        "peak_memory": peak,
        "server_peak_rss": rss_peak,
        "killed": killed,
        "exit": code,
        "alone": alone.row(),
        "concurrent": many.row(),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        "| server | clients | seconds | requests | completed | lost | tokens | aggregate tok/s | expert bytes/token "
        "| TTFT p50 | TTFT p99 | latency p50 | limit | peak memory | killed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in r["modes"]:
        mode = "queue" if m["batch"] == 1 else f"batch {m['batch']}"
        limit = format_bytes(m["limit"]) if m["limit"] else "none"
        for row in (m["alone"], m["concurrent"]):
            lines.append(
                f"| {mode} | {row['clients']} | {row['seconds']:.0f} | {row['requests']} | {row['completed']} | "
                f"{row['lost']} | {row['tokens']} | {row['tokens_per_s']:.1f} | "
                f"{format_bytes(int(row['bytes_per_token']))} | {1e3 * row['ttft_p50_s']:.0f} ms | "
                f"{1e3 * row['ttft_p99_s']:.0f} ms | {1e3 * row['latency_p50_s']:.0f} ms | {limit} | "
                f"{format_bytes(m['peak_memory'])} | {'yes' if m['killed'] else 'no'} |"
            )
    lines.append("")
    for m in r["modes"]:
        ratio = m["concurrent"]["tokens_per_s"] / m["alone"]["tokens_per_s"] if m["alone"]["tokens_per_s"] else 0.0
        lines.append(
            f"--batch {m['batch']}: aggregate tok/s with {m['concurrent']['clients']} clients / one alone {ratio:.2f}x; "
            f"limit = Model.memory_needed({r['context']}, sequences={m['batch']}) {format_bytes(m['memory_needed'])} "
            f"+ server overhead {format_bytes(m['server_overhead'])}; server peak RSS {format_bytes(m['server_peak_rss'])}"
        )
    return "\n".join(lines)
