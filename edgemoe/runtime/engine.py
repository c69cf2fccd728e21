"""Loading a converted model directory and running it: `load`, `Model`."""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import psutil

from .. import _core, models
from ..devices import load_profile
from ..errors import BudgetError, EdgeMoEError
from ..format.manifest import blob_tables, fallback_tables, load_manifest, page_bytes
from ..format.routing_file import ROUTING_FILE, load_usage
from ..format.safetensors import SafetensorsFile, TensorRows
from ..units import format_bytes, parse_bytes
from .chat import ChatTemplate
from .generation import Step, TextStream
from .memory import memory_terms
from .options import StreamOptions
from .prefetch import attach_prefetcher
from .sampling import Sampler
from .tokenizer import Tokenizer
from .trace import RoutingTrace, trace_routing


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux keeps that across
    fork+exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def warm_start_order(lengths: np.ndarray, usage: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The (layer, expert) pairs of a warm start, most useful first: by each expert's share of
    its layer's calibration uses (usage, [layers, experts]), so every layer gets its most used
    experts before any layer gets its less used ones. Ties, and every expert without a
    profile, go round the layers: each layer's first expert, then each layer's second, ..."""
    share = np.zeros(lengths.shape)
    if usage is not None:
        totals = usage.sum(axis=1, keepdims=True)
        share = np.divide(usage, totals, out=share, where=totals > 0)
    layer, expert = np.nonzero(lengths)
    order = np.lexsort((layer, expert, -share[layer, expert]))  # the last key sorts first
    return [(int(layer[i]), int(expert[i])) for i in order]


class Model:
    """A converted MoE model: backbone in RAM, experts streamed through the native cache."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        memory_budget: int | str | None = None,
        options: StreamOptions | None = None,
        threads: int | None = None,
    ):
        self.path = Path(path)
        self.options = o = options or StreamOptions()
        self.manifest = load_manifest(self.path)
        self.architecture = self.manifest["architecture"]
        arch = models.get(self.architecture, str(self.path))
        self.config = arch.Model.config_class.from_dict(self.manifest["config"])
        # generate() encodes the prompt and decodes an answer rather than continuing the prompt
        self.encoder_decoder: bool = arch.Model.encoder_decoder
        if threads:
            _core.set_num_threads(int(threads))

        ex = self.manifest["experts"]
        offsets, lengths, crcs, self.expert_bits = blob_tables(self.manifest)
        self.budget = parse_bytes(memory_budget) or 0
        self.min_budget = self._min_budget(lengths)
        if self.budget and self.budget < self.min_budget:
            raise BudgetError(
                f"memory budget {format_bytes(self.budget)} cannot hold one layer's routed experts: a token needs "
                f"{ex['top_k']} experts of up to {format_bytes(int(lengths.max()))} each; "
                f"set the budget to at least {format_bytes(self.min_budget)} ({self.min_budget} bytes)"
            )
        self.store = _core.ExpertStore(
            str(self.path / ex["file"]), offsets, lengths, crcs, direct=o.direct_io, verify=o.verify
        )
        # a device profile whose storage speed the store emulates (devices/profiles)
        self.device = load_profile(o.device) if o.device else None
        if self.device:
            self.store.set_throttle(self.device.read_bytes_per_s, self.device.read_latency_s)
        self.fallback_store = None  # low-bit copies read on a miss for a low gate weight (docs/format.md)
        if o.fallback is not None:
            fb_path, fb_offsets, fb_lengths, fb_crcs, _ = fallback_tables(self.path, self.manifest)
            self.fallback_store = _core.ExpertStore(
                str(fb_path), fb_offsets, fb_lengths, fb_crcs, direct=o.direct_io, verify=o.verify
            )
            if self.device:  # its own transfer schedule: reads of the two files do not share the emulated channel
                self.fallback_store.set_throttle(self.device.read_bytes_per_s, self.device.read_latency_s)
        self.cache = _core.ExpertCache(
            self.store, self.budget, policy=o.policy, io_threads=o.io_threads, fallback=self.fallback_store
        )
        if o.fallback is not None:
            self.set_fallback(o.fallback)

        # unbounded: everything is meant to be in RAM, so is the embedding table
        embeddings = ("file" if self.budget else "ram") if o.embeddings == "auto" else o.embeddings
        # plain reads into private arrays: an mmap would keep the file's pages resident as well
        backbone = SafetensorsFile(self.path / self.manifest["backbone"]["file"])
        # Under a budget the embedding table is read one row per token from the file
        # (embeddings="file"), unless the output head shares it (tied embeddings): for Mixtral
        # that is 262 MB of bf16 that a decode step reads 8 KB of. Unbounded, it is held.
        lazy = {"tok_embeddings"} if embeddings == "file" and "output" in backbone else set()
        tensors = {
            name: (TensorRows(backbone, name) if name in lazy else backbone.read(name), backbone.dtype(name))
            for name in backbone.names()
        }
        self.backbone_bytes = sum(a.nbytes for a, _ in tensors.values() if not isinstance(a, TensorRows))
        self.file_embedding_bytes = sum(backbone.nbytes(n) for n in lazy)
        self.net = arch.Model(self.config, tensors, self.cache, ex["moe_layers"])
        del tensors
        self.net.kv_dtype = np.dtype(o.kv_cache).type  # grouped-query attention's cache
        self.prefetcher = None  # predictive preloading (edgemoe/runtime/prefetch.py)
        if o.prefetch:
            self.prefetcher = attach_prefetcher(self, o.prefetch, ratio=o.prefetch_ratio, min_prob=o.prefetch_min_prob)

        self.preloading = self._preload_mode(lengths)  # "all", "warm" or ""
        self._first_token_waits = False  # preload() sets it when it queues every expert
        if self.preloading:
            self.preload(self._warm_bytes() if self.preloading == "warm" else None)

        tok = self.manifest.get("tokenizer", {})
        self.eos_ids = set(tok.get("eos_token_ids") or [])
        self.bos_id = tok.get("bos_token_id")
        self._tokenizer: Tokenizer | None = None
        self._chat_template: ChatTemplate | None = None
        self.kv = self.net.new_kv_cache()
        self._counters = {"tokens_generated": 0, "decode_seconds": 0.0, "prompt_tokens": 0, "prefill_seconds": 0.0}

    def set_fallback(self, threshold: float) -> None:
        """Low-bit fallback on a miss: an expert not resident whose gate weight is below `threshold`
        for every token of the step (prefill: all of them) is read and computed from its low-bit
        copy. 0 turns it off. Needs a model loaded with fallback=True."""
        if self.fallback_store is None and threshold:
            raise EdgeMoEError(
                f"{self.path} was loaded without its low-bit copies: load it with "
                "fallback=THRESHOLD (e.g. 0.3; 0 opens the copies without using them)"
            )
        if not 0 <= threshold <= 1:
            raise ValueError(f"the fallback threshold is a gate weight between 0 and 1, got {threshold}")
        self.cache.fallback_threshold = float(threshold)

    def preload(self, max_bytes: int | None = None) -> int:
        """Queue experts for the cache's I/O threads without waiting, read behind the first
        tokens' compute (demand reads go first; a generation's first token waits for the last
        of them when they are every expert). max_bytes None: every expert, layer by layer
        (what llama.cpp's load does by reading the whole file). Otherwise a warm start: the
        most used experts, as many as fit in max_bytes, so the first tokens do not start
        from an empty cache (see warm_start_order). Returns how many reads were queued."""
        _, lengths, _, _ = blob_tables(self.manifest)
        sizes = page_bytes(lengths)
        if max_bytes is None or max_bytes >= int(sizes.sum()):
            self._first_token_waits = True
        if max_bytes is None:
            return sum(
                int(self.cache.prefetch(int(layer), np.flatnonzero(lengths[layer]).tolist()))
                for layer in range(lengths.shape[0])
                if lengths[layer].any()
            )
        queued, used = 0, 0
        for layer, expert in warm_start_order(lengths, self._routing_usage(lengths.shape)):
            if used + sizes[layer, expert] > max_bytes:
                break
            used += int(sizes[layer, expert])
            queued += int(self.cache.prefetch(layer, [expert]))
        return queued

    def _finish_preload(self) -> None:
        """After a prompt's forward pass: when preload() queued every expert, the prompt's
        compute ran beside those reads and the first token waits for the rest, so that decode
        never stops for a read (demand reads among the queued ones cost early tokens stalls)."""
        if self._first_token_waits:
            self._first_token_waits = False
            self.cache.wait_idle()

    def _routing_usage(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Per MoE layer and expert, how often calibration text routed to it (routing.json,
        written by `edgemoe profile`), or None without a profile of this shape."""
        try:
            return load_usage(self.path, shape)
        except EdgeMoEError as e:
            # costs the warm start its order, nothing else: say so, and go on
            warnings.warn(
                f"the warm start ignores {self.path / ROUTING_FILE} ({e}) and goes round the layers: "
                f"profile the model again with `edgemoe profile {self.path}`",
                stacklevel=3,
            )
            return None

    def _preload_mode(self, lengths: np.ndarray) -> str:
        """What load queues for the I/O threads (StreamOptions.preload): "all", "warm" or ""."""
        o = self.options
        if o.io_threads <= 0 or o.preload == "none":
            return ""
        if o.preload != "auto":
            return o.preload
        if o.fallback is not None:  # low-bit copies exist to read less than everything
            return ""
        if self._preload_fits(lengths):
            return "all"
        return "warm" if self.budget else ""

    def _warm_bytes(self) -> int:
        """What a warm start fills: the budget, or without one (every expert read stays)
        half the memory available now, as "auto" preloads everything when it fits there."""
        return self.budget or int(0.5 * psutil.virtual_memory().available)

    def _preload_fits(self, lengths: np.ndarray) -> bool:
        """Preload every expert when the budget holds them all (or is unbounded) and they fit
        in half the memory available now."""
        total = int(page_bytes(lengths).sum())
        if self.budget and self.budget < total:
            return False
        return total < 0.5 * psutil.virtual_memory().available

    def _min_budget(self, lengths: np.ndarray) -> int:
        aligned = page_bytes(lengths)
        per_layer = np.sort(aligned, axis=1)[:, ::-1][:, : self.manifest["experts"]["top_k"]].sum(axis=1)
        return int(per_layer.max()) if per_layer.size else 0

    # -- tokenizer -------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's chat template, or a plain User:/Assistant: transcript for a model
        without one (runtime/chat.py); .stop holds the strings that end a reply."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_model_dir(self.path)
        return self._chat_template

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the chat template (its special tokens
        are the template's: the tokenizer adds none of its own)."""
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- inference -------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return arr

    def reset(self) -> None:
        """Forget the KV cache (the expert cache stays warm)."""
        self.kv = self.net.new_kv_cache()

    def logits(
        self, ids: Sequence[int] | np.ndarray, decoder_ids: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """float32 logits [len(ids), vocab] of a fresh sequence. An encoder-decoder encodes ids and
        gives the decoder's logits [len(decoder_ids), vocab] over decoder_ids (default: its start token)."""
        arr = self._check_ids(ids)
        self.reset()
        if not self.net.encoder_decoder:
            if decoder_ids is not None:
                raise ValueError(f"decoder_ids is for encoder-decoder models; this {self.architecture} is decoder-only")
            return self.net.forward(arr, self.kv, 0, all_logits=True)
        first = self.net.start(arr, self.kv)
        dec = first if decoder_ids is None else self._check_ids(decoder_ids)
        return self.net.forward(dec, self.kv, 0, all_logits=True)

    def encoder_output(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """An encoder-decoder's encoder output [len(ids), hidden] (after its final norm)."""
        if not self.net.encoder_decoder:
            raise ValueError(f"this {self.architecture} model is decoder-only: it has no encoder")
        return self.net.encode(self._check_ids(ids))

    # What generate returns, by the prompt's type and stream (stream=True given by keyword;
    # passed by position it gets the union of the last overload).
    @overload
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stream: Literal[False] = ...,
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        *,
        stream: Literal[True],
    ) -> Iterator[str]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stream: Literal[False] = ...,
    ) -> list[int]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        *,
        stream: Literal[True],
    ) -> Iterator[int]: ...
    @overload
    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stream: bool = ...,
    ) -> str | list[int] | Iterator[str] | Iterator[int]: ...
    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | list[int] | Iterator[str] | Iterator[int]:
        """Continue a prompt. Text in -> text out; token ids in -> token ids out.

        Greedy at temperature 0. Stops at EOS or after max_new_tokens. With
        stream=True returns an iterator of text pieces (or of token ids).
        """
        if isinstance(prompt, str):
            steps = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed)
            pieces = (step.text for step in steps if step.text)
            return pieces if stream else "".join(pieces)
        tokens = self._generate_ids(list(prompt), max_new_tokens, Sampler(temperature, top_k, top_p, seed))
        return tokens if stream else list(tokens)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        cancel: Callable[[], bool] | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[Step]:
        """Generate token by token: one Step (token id, the text it adds, finish) per token.

        A text prompt is encoded with the tokenizer's special tokens; token ids are used as
        given (a chat template's rendering: ChatTemplate.encode). Stops at EOS, at the first
        of the `stop` strings (cut from the text), after max_new_tokens, or when cancel()
        returns True, checked after each token's Step, before the next forward pass: a caller
        on another thread cancels a generation by setting what cancel reads. The last Step
        carries the finish reason and any text held back; a cancelled generation ends with a
        Step whose token is None. ignore_eos: EOS is a token like
        any other (fixed-length runs for benchmarks).
        """
        ids = prompt if not isinstance(prompt, str) else self.encode(prompt)
        if isinstance(prompt, str) and not ids:
            raise ValueError("the prompt encodes to no tokens")
        text = TextStream(self.decode, stop)
        sampler = Sampler(temperature, top_k, top_p, seed)
        tokens = self._generate_ids(list(ids), max_new_tokens, sampler, stop_at_eos=not ignore_eos)
        try:
            for n, token in enumerate(tokens, start=1):
                if token in self.eos_ids and not ignore_eos:
                    yield Step(token, text.flush(), "stop")
                    return
                piece = text.push(token)
                if text.stopped:
                    yield Step(token, piece, "stop")
                    return
                if n == max_new_tokens:
                    yield Step(token, piece + text.flush(), "length")
                    return
                yield Step(token, piece)
                if cancel is not None and cancel():  # before the next forward pass
                    yield Step(None, text.flush(), "cancelled")
                    return
        finally:
            tokens.close()

    def _generate_ids(
        self, ids: list[int], max_new_tokens: int, sampler: Sampler, stop_at_eos: bool = True
    ) -> Generator[int, None, None]:
        arr = self._check_ids(ids)
        self.reset()
        t0 = time.perf_counter()
        self._counters["prompt_tokens"] += len(arr)
        arr = self.net.start(arr, self.kv)  # an encoder-decoder encodes the prompt here
        logits = self.net.forward(arr, self.kv, 0, all_logits=False)
        self._finish_preload()
        self._counters["prefill_seconds"] += time.perf_counter() - t0
        pos = len(arr)
        for i in range(max_new_tokens):
            token = sampler(logits[-1])
            yield token
            if (stop_at_eos and token in self.eos_ids) or i == max_new_tokens - 1:
                return
            t0 = time.perf_counter()
            logits = self.net.forward(np.array([token]), self.kv, pos, all_logits=False)
            self._counters["decode_seconds"] += time.perf_counter() - t0
            self._counters["tokens_generated"] += 1
            pos += 1

    def trace_routing(
        self, prompt: str | Sequence[int] | np.ndarray, window: int | None = None, lookahead: bool = True
    ) -> RoutingTrace:
        """Routing of a prompt: a RoutingTrace whose .experts is [tokens, moe_layers, top_k].
        window: prefill windows of that many tokens, the KV cache reset before each."""
        return trace_routing(self, prompt, window=window, lookahead=lookahead)

    # -- accounting ------------------------------------------------------------
    def _override_hook(self, name: str) -> Any:
        """A method of the MoE computation installed in place of the cache's (net.moe_override,
        e.g. a cluster's), or None when there is none or it lacks that method."""
        return getattr(self.net.moe_override, name, None)

    def stats(self) -> dict[str, Any]:
        """Totals since load (or reset_stats), and under "layers" one dict per MoE layer
        (see layer_stats). An installed MoE computation with a stats() method adds its sections
        (a cluster: "cluster")."""
        layers = self.layer_stats()
        c = dict(self.cache.stats())
        # totals from the same snapshot as the rows: a prefetch landing between the two native
        # calls would otherwise make them disagree
        c.update({k: sum(r[k] for r in layers) for k in c if layers and k in layers[0] and k != "layer"})
        n, dt = self._counters["tokens_generated"], self._counters["decode_seconds"]
        lookups = c["hits"] + c["misses"]
        return {
            "tokens_generated": n,
            "decode_tokens_per_s": n / dt if dt > 0 else 0.0,
            "prompt_tokens": self._counters["prompt_tokens"],
            "prefill_seconds": self._counters["prefill_seconds"],
            "expert_loads": int(c["loads"]),
            "cache_hits": int(c["hits"]),
            "cache_misses": int(c["misses"]),
            "cache_hit_rate": c["hits"] / lookups if lookups else 0.0,
            "evictions": int(c["evictions"]),
            "bytes_read": int(c["bytes_read"]),
            "demand_bytes": int(c["demand_bytes"]),
            "prefetch_bytes": int(c["prefetch_bytes"]),
            "prefetch_hits": int(c["prefetch_hits"]),
            "wasted_prefetch_bytes": int(c["wasted_prefetch_bytes"]),
            "read_seconds": c["read_seconds"],
            "stall_seconds": c["stall_seconds"],
            "compute_seconds": c["compute_seconds"],
            "expert_cache_bytes": int(c["resident_bytes"]),
            "expert_cache_peak_bytes": int(c["peak_resident_bytes"]),
            "memory_budget": self.budget,
            "direct_io": bool(c["direct_io"]),
            "backbone_bytes": self.backbone_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "storage_emulation": self.device.name if self.device else None,
            "kv_cache": self.kv.dtype.name,  # what the KV cache keeps keys and values as
            "kv_cache_bytes": self.kv.nbytes(),
            "preload": self.preloading or None,  # "all", "warm" (a warm start) or None
            **({"prefetch": self.prefetcher.stats()} if self.prefetcher else {}),
            **(
                {
                    "fallback": {
                        "threshold": self.cache.fallback_threshold,
                        "uses": int(c["fallback_uses"]),
                        "loads": int(c["fallback_loads"]),
                        "bytes_read": int(c["fallback_bytes"]),
                        "bytes_saved": int(c["fallback_bytes_saved"]),
                    }
                }
                if self.fallback_store
                else {}
            ),
            **(override_stats() if (override_stats := self._override_hook("stats")) else {}),
            "layers": layers,
        }

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per MoE layer: the cache's counters (hits, misses, hit_rate, loads, bytes_read,
        demand_bytes, prefetch_* , wasted_prefetch_bytes, evictions; read_seconds summed over
        I/O threads, stall_seconds spent by moe_forward waiting for reads, compute_seconds
        computing experts) and, with a prefetcher, its guesses' precision and recall
        (None for the first MoE layer, which nothing predicts)."""
        cache_layers = self.cache.layer_stats()
        pf = {d["layer"]: d for d in self.prefetcher.stats()["layers"]} if self.prefetcher else {}
        out = []
        for m, layer in enumerate(self.manifest["experts"]["moe_layers"]):
            c = cache_layers[layer]
            lookups = c["hits"] + c["misses"]
            row: dict[str, Any] = {"moe_index": m, "layer": layer}
            row.update({k: (v if k.endswith("_seconds") else int(v)) for k, v in c.items() if k != "layer"})
            row["hit_rate"] = c["hits"] / lookups if lookups else 0.0
            p = pf.get(layer)
            row["precision"] = p["precision"] if p else None
            row["recall"] = p["recall"] if p else None
            out.append(row)
        return out

    def memory_needed(self, context_tokens: int = 256, sequences: int = 1) -> int:
        """An upper bound of this process's memory while it generates up to context_tokens
        (prompt included, the prompt prefilled in one pass): the expert budget (all expert
        bytes when unbounded), the backbone, the expert cache's fixed overhead (native/cache.h),
        the KV cache, prefill's attention scores and moe_forward scratch, and the runtime's own
        (runtime/memory.py). docs/memory.md explains the terms.
        sequences: generations decoded together (runtime/batch.py), each with its own KV cache."""
        cfg, ex = self.config, self.manifest["experts"]
        copies = 2 if self.fallback_store is not None else 1  # low-bit copies have their own entries
        terms = memory_terms(
            experts=self.budget or self.info()["expert_bytes"],
            backbone=self.backbone_bytes,
            expert_slots=copies * ex["num_layers"] * ex["num_experts"],
            kv_values_per_token=cfg.kv_values_per_token(),
            kv_value_bytes=self.kv.dtype.itemsize,
            attention_values_per_token=cfg.attention_values_per_token(),
            heads=cfg.num_attention_heads,
            hidden=cfg.hidden_size,
            top_k=ex["top_k"],
            context_tokens=context_tokens,
            sequences=sequences,
        )
        return sum(terms.values())

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        if self.prefetcher:
            self.prefetcher.reset_stats()
        if reset := self._override_hook("reset_stats"):
            reset()
        for k in self._counters:
            self._counters[k] = 0 if isinstance(self._counters[k], int) else 0.0

    def close(self) -> None:
        """Release what the installed MoE computation holds outside this process (a cluster:
        its device servers and connection); the model then computes every expert itself."""
        if close := self._override_hook("close"):
            close()
        self.net.moe_override = None

    def info(self) -> dict[str, Any]:
        ex = self.manifest["experts"]
        _, lengths, _, bits = blob_tables(self.manifest)
        present = lengths > 0
        values, counts = np.unique(bits[present], return_counts=True)
        return {
            "architecture": self.architecture,
            "layers": self.config.num_hidden_layers,
            "moe_layers": len(ex["moe_layers"]),
            "experts_per_layer": ex["num_experts"],
            "top_k": ex["top_k"],
            "hidden_size": self.config.hidden_size,
            "vocab_size": self.config.vocab_size,
            "backbone_bytes": self.backbone_bytes,  # held in RAM
            "file_embedding_bytes": self.file_embedding_bytes,  # the embedding table, read by row from the file
            "expert_bytes": int(lengths.sum()),
            "bitwidths": {int(v): int(c) for v, c in zip(values, counts)},
            "min_memory_budget": self.min_budget,
        }


def load(
    path: str | os.PathLike[str],
    memory_budget: int | str | None = None,
    options: StreamOptions | None = None,
    *,
    threads: int | None = None,
    **stream: Any,
) -> Model:
    """Open a converted model directory.

    memory_budget bounds the RAM used for expert weights: bytes, or a string like "1.5GB"
    (powers of 1000) or "512MiB" (powers of 1024). None keeps every expert that was read.
    options: how experts are streamed (StreamOptions: policy, prefetch, preload, fallback,
    device, ...); any of its fields may also be given as a keyword, which replaces that field:
    load(path, "300MB", prefetch="lookahead"). threads: compute threads (default: all cores).
    """
    if not Path(path).exists():
        raise EdgeMoEError(f"no model at {path}: convert a checkpoint first with `edgemoe convert SRC -o {path}`")
    return Model(
        path, memory_budget=memory_budget, options=StreamOptions.with_overrides(options, stream), threads=threads
    )
