"""One measured run of `edgemoe bench --peers` in its own process: load an engine, generate,
print the figures as one JSON line.

Standard library only at the top: llama_cpp.run_limited runs this file as a script
(`python -P llama_cpp_worker.py --worker SPEC`), so a llama.cpp run carries none of
edgemoe's imports. The bench modes read /proc/self/io through proc_read_bytes too;
_peak_rss has a twin in runtime.engine.peak_rss_bytes, which this file cannot import.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

SAMPLING = dict(temperature=0.8, top_p=0.95)  # both engines, no top-k, no min-p, no repeat penalty


def proc_read_bytes() -> int:
    """Bytes this process has read from storage so far (the kernel's own count)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _timed(tokens: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    next(tokens)
    ttft = time.perf_counter() - t0
    n = 1 + sum(1 for _ in tokens)
    decode_s = time.perf_counter() - t0 - ttft
    return {
        "ttft_seconds": ttft,
        "tokens": n,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": (n - 1) / decode_s if n > 1 else 0.0,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    n = spec["new_tokens"]
    if spec["engine"] == "llama.cpp":
        import llama_cpp  # only in a llama.cpp run, and optional (the bench extra)

        llm = llama_cpp.Llama(
            model_path=spec["model"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            seed=spec["seed"],
            verbose=False,
        )
        load_s = time.perf_counter() - t0
        gen = llm.generate(
            spec["prompt"],
            temp=SAMPLING["temperature"],
            top_p=SAMPLING["top_p"],
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        out = _timed(itertools.islice(gen, n))  # generate() never stops on its own, EOS included
    else:
        from edgemoe.runtime.engine import load  # only in an edgemoe run: a llama.cpp run must not carry them

        m = load(spec["model"], memory_budget=spec["budget"], threads=spec["threads"], **spec["options"])
        load_s = time.perf_counter() - t0
        m.eos_ids = set()  # always the full count, as llama.cpp's generate()
        out = _timed(
            m.generate(
                spec["prompt"],
                max_new_tokens=n,
                temperature=SAMPLING["temperature"],
                top_p=SAMPLING["top_p"],
                seed=spec["seed"],
                stream=True,
            )
        )
        s = m.stats()
        out.update(cache_hit_rate=s["cache_hit_rate"], expert_bytes_read=s["bytes_read"])
    return dict(out, load_seconds=load_s, read_bytes=proc_read_bytes() - read0, peak_rss_bytes=_peak_rss())


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: edgemoe bench --peers llama.cpp (see edgemoe bench -h)")
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
