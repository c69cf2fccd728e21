"""How a model streams its experts: one typed, validated object.

edgemoe.load(path, memory_budget="300MB")                        # the defaults
edgemoe.load(path, memory_budget="300MB", prefetch="lookahead")  # any field as a keyword
edgemoe.load(path, options=StreamOptions(policy="structure", fallback=0.3))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from ..devices import load_profile

Policy = Literal["lru", "lfu", "structure"]
Preload = Literal["auto", "all", "warm", "none"]
Embeddings = Literal["auto", "file", "ram"]
KVCacheType = Literal["float16", "float32"]
Verify = Literal[True, False, "every read"]
PREDICTORS = ("table", "lookahead", "fitted")  # each may end in ":moe_in" or ":layer_out" (look-aheads)
LOOKAHEAD_POINTS = ("moe_in", "layer_out")
DEFAULT_PREFETCH_RATIO = 1.5  # prefetch byte budget per layer, in units of the bytes a token needs
DEFAULT_FALLBACK_THRESHOLD = 0.3  # a useful gate weight for fallback=, as `edgemoe run --fallback` documents


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """Streaming settings of a loaded model (the memory budget itself is load's own argument).

    policy: which expert the cache evicts when the budget is full: "lru" (least recently
        used), "lfu" (least used), "structure" (lowest decayed use rate divided by how many
        MoE layers away the expert's layer is: structure-aware, after EdgeMoE).
    prefetch: read the experts the next layer will probably need while this one computes:
        "table" (routing.json, see `edgemoe profile`), "lookahead" (the next router applied
        to this layer's hidden state), "fitted" (a fitted look-ahead, routing.safetensors);
        ":moe_in" or ":layer_out" picks a look-ahead's point. None: no prefetch.
    prefetch_ratio: prefetch bytes per layer, as a multiple of the bytes a token needs.
    prefetch_min_prob: skip guesses needed with a probability below this.
    preload: what the I/O threads read at load, behind the first tokens' compute (demand
        reads go first). "all": every expert. "warm": the most used experts by the model's
        routing profile (routing.json usage; without one, the same number of each layer's),
        as many as the budget holds (unbounded: as fit in half the memory available now).
        "none": each expert is read when first needed. When what load queued is every
        expert, the first token waits for the last of it, so decode never stops for a read.
        "auto": "all" when the budget holds every expert (or is unbounded) and they fit in
        half the memory available now, else "warm"; nothing with fallback.
    io_threads: threads that read experts (0: the decoding thread reads on a miss).
    direct_io: read experts with O_DIRECT (False: through the page cache).
    verify: check each expert blob's CRC-32C on its first read (True), on "every read",
        or never (False). A damaged file fails on the first read of the damaged expert.
    fallback: None, or a gate weight (e.g. 0.3): open the model's low-bit copies (convert
        with --fallback-bits) and, on a miss for an expert whose gate weight is below it,
        compute from its low-bit copy instead of reading the full one (HOBBIT). 0 opens the
        copies without using them (Model.set_fallback changes it later).
    embeddings: "file" reads a token's row of the embedding table from the backbone file
        when needed (not when the output head shares the table); "ram" holds the table;
        "auto": "file" under a memory budget, "ram" without one.
    device: a device profile (devices/profiles, e.g. "jetson-tx2-emmc") whose storage
        bandwidth and latency expert reads are throttled to, to emulate that device.
    kv_cache: what the KV cache keeps keys and values as: "float16" (half the memory and
        what a decode token reads of it, each value rounded to nearest, as llama.cpp keeps
        them) or "float32" (exact; what matching transformers bit for bit needs). Models whose
        attention reads the cache in numpy (DeepSeek's latent attention, Switch) keep float32;
        stats()["kv_cache"] says which one a model uses.
    """

    policy: Policy = "lru"
    prefetch: str | None = None
    prefetch_ratio: float = DEFAULT_PREFETCH_RATIO
    prefetch_min_prob: float = 0.0
    preload: Preload = "auto"
    io_threads: int = 2
    direct_io: bool = True
    verify: Verify = True
    fallback: float | None = None
    embeddings: Embeddings = "auto"
    kv_cache: KVCacheType = "float16"
    device: str | None = None

    def __post_init__(self) -> None:
        _choice("policy", self.policy, get_args(Policy))
        _choice("preload", self.preload, get_args(Preload))
        _choice("embeddings", self.embeddings, get_args(Embeddings))
        _choice("kv_cache", self.kv_cache, get_args(KVCacheType))
        _choice("verify", self.verify, get_args(Verify))
        if self.prefetch is not None:
            kind, sep, point = self.prefetch.partition(":")
            if kind not in PREDICTORS or (sep and (kind == "table" or point not in LOOKAHEAD_POINTS)):
                raise ValueError(
                    f"unknown predictor {self.prefetch!r}: choose one of {', '.join(PREDICTORS)} "
                    f"(a look-ahead may end in :moe_in or :layer_out), or None for no prefetch"
                )
        if not self.prefetch_ratio > 0:
            raise ValueError(
                f"prefetch_ratio is a multiple of the bytes a token needs and must be > 0, got {self.prefetch_ratio}"
            )
        if not 0 <= self.prefetch_min_prob <= 1:
            raise ValueError(f"prefetch_min_prob is a probability between 0 and 1, got {self.prefetch_min_prob}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or self.io_threads < 0:
            raise ValueError(f"io_threads must be a whole number >= 0, got {self.io_threads!r}")
        if self.fallback is not None and (isinstance(self.fallback, bool) or not 0 <= self.fallback <= 1):
            raise ValueError(
                f"fallback is None or a gate weight between 0 and 1 (e.g. "
                f"{DEFAULT_FALLBACK_THRESHOLD}), got {self.fallback!r}"
            )
        if self.device is not None:
            load_profile(self.device)  # a named error listing the profiles

    @classmethod
    def with_overrides(cls, options: StreamOptions | None, overrides: dict[str, Any]) -> StreamOptions:
        """options (or the defaults) with some fields replaced; an unknown name is a TypeError
        that lists the fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unknown streaming option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"StreamOptions has {', '.join(sorted(names))}"
            )
        return dataclasses.replace(options or cls(), **overrides)
