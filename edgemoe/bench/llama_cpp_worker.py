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
from collections.abc import Callable, Iterator
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


def context_tokens(spec: dict[str, Any]) -> int:
    """Positions a run's KV cache must hold: the prompt and the new tokens."""
    return len(spec["prompt"]) + spec["new_tokens"]


def llama_params(spec: dict[str, Any]) -> dict[str, Any]:
    """llama_cpp.Llama's keywords for a run: its defaults but the model, the threads, the seed
    and a context that holds the whole run (the default of 512 positions leaves a 512-token
    prompt no room to decode)."""
    return dict(
        model_path=spec["model"],
        n_ctx=context_tokens(spec),
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        seed=spec["seed"],
        verbose=False,
    )


def _prefill_seconds(first_token: Callable[[], Any]) -> float:
    """Seconds to the first token of a second run of the prompt in the same process: the
    prefill with whatever weights the first run left in memory, plus one sample."""
    t0 = time.perf_counter()
    first_token()
    return time.perf_counter() - t0


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    n, prompt = spec["new_tokens"], spec["prompt"]
    if spec["engine"] == "llama.cpp":
        import llama_cpp  # only in a llama.cpp run, and optional (the bench extra)

        llm = llama_cpp.Llama(**llama_params(spec))
        load_s = time.perf_counter() - t0

        def tokens() -> Iterator[int]:
            # generate() never stops on its own, EOS included
            return llm.generate(
                prompt,
                temp=SAMPLING["temperature"],
                top_p=SAMPLING["top_p"],
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                reset=True,
            )

        out = _timed(itertools.islice(tokens(), n))
        llm.reset()  # forget the evaluated tokens: generate() would reuse the prompt's KV entries

        def first_token() -> Any:
            return next(tokens())
    else:
        from edgemoe.runtime.engine import load  # only in an edgemoe run: a llama.cpp run must not carry them

        m = load(spec["model"], memory_budget=spec["budget"], threads=spec["threads"], **spec["options"])
        load_s = time.perf_counter() - t0
        m.eos_ids = set()  # always the full count, as llama.cpp's generate()

        def tokens_of(count: int) -> Iterator[int]:
            return m.generate(
                prompt,
                max_new_tokens=count,
                temperature=SAMPLING["temperature"],
                top_p=SAMPLING["top_p"],
                seed=spec["seed"],
                stream=True,
            )

        out = _timed(tokens_of(n))
        s = m.stats()
        out.update(cache_hit_rate=s["cache_hit_rate"], expert_bytes_read=s["bytes_read"])

        def first_token() -> Any:
            return next(tokens_of(1))

    read = proc_read_bytes() - read0  # the run's reads, not the second prompt's
    prefill_s = _prefill_seconds(first_token)
    return dict(
        out,
        load_seconds=load_s,
        # what a user waits for the first token: edgemoe reads experts during it, llama.cpp at load
        first_token_seconds=load_s + out["ttft_seconds"],
        prefill_seconds=prefill_s,
        prefill_tokens_per_s=len(prompt) / prefill_s,
        read_bytes=read,
        peak_rss_bytes=_peak_rss(),
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: edgemoe bench --peers llama.cpp (see edgemoe bench -h)")
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
