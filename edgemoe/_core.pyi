"""Type stub for the native core (native/, bound with pybind11).

Every call that does real work releases the GIL. Arrays must be C-contiguous.
Matrices follow docs/format.md's QMatrix layout; blobs follow its expert blob layout.
"""

from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

import edgemoe.errors

FORMAT_VERSION: int
"""The newest experts-file format_version this core reads (older ones read too); the
converter writes it and edgemoe.quant / edgemoe.manifest take it from here (docs/format.md)."""

EVICTION_DECAY: float
"""Per token, the structure policy's decayed activation rate is multiplied by this (0.95:
a half-life of ~14 tokens); edgemoe.simulate replays the policy with the same figure."""

def set_num_threads(n: int) -> None:
    """Threads used by the compute kernels (default: hardware threads)."""

def get_num_threads() -> int: ...
def set_thread_spin(microseconds: int) -> None: ...
def wake_threads() -> None: ...
def get_thread_spin() -> int: ...
def crc32c(data: npt.NDArray[np.uint8] | bytes, seed: int = 0) -> int:
    """CRC-32C (Castagnoli) of a buffer, as stored in the manifest."""

def crc32c_impl() -> str:
    """Which CRC-32C implementation this build uses: 'sse4.2', 'armv8-crc' or 'table'."""

def stream_read(data: npt.NDArray[Any] | bytes) -> int:
    """Read every byte of a buffer once on the kernel threads (returns a checksum of it):
    the memory bandwidth the kernels can hope for. For benchmarks."""

GEMM_MIN_TOKENS: int
"""From this many tokens on, a matmul takes the prefill kernels (weights unpacked once for all
the tokens) instead of the per-token ones."""

def prefill_int8(buf: npt.NDArray[np.uint8], offset: int = 0, expert: bool = False) -> bool:
    """Whether GEMM_MIN_TOKENS or more tokens times this QMatrix run the integer prefill kernels
    (x rounded per 32 values: to int8 for 4-bit codes, as one token's x; to int16 for 8-bit
    ones): 4- and 8-bit codes on the AVX2 path (and AVX-512); expert=True asks the same of an
    expert's matrix (the same answer)."""

def simd() -> str:
    """Which kernel path runs: 'avx2+fma+f16c', 'neon', 'neon+dotprod', 'neon+dotprod+i8mm' or 'portable';
    on x86 CPUs with AVX-512 F/BW/VL/VNNI (chosen at run time) '+avx512vnni' is appended."""

def linear(x: npt.NDArray[np.float32], w: npt.NDArray[Any], kind: str) -> npt.NDArray[np.float32]:
    """y[T, out] = x[T, in] @ w[out, in].T for a float weight.

    kind: 'f32' (w float32), 'f16' (w float16 or uint16 bits), 'bf16' (w uint16 bits).
    w must be C-contiguous (read in place, never copied). A 1-D x is one token and gives a 1-D y.
    """

def qmatrix_matmul(x: npt.NDArray[np.float32], buf: npt.NDArray[np.uint8], offset: int = 0) -> npt.NDArray[np.float32]:
    """y[T, rows] = x[T, cols] @ W.T for a QMatrix stored in buf at offset (any kind).

    Numerics: f32 accumulation. On the AVX2 and NEON paths a single token (T=1) times a
    group-quantized matrix rounds x per 32 values first: to int8 for 4-bit codes
    (error <= 1/254 of each block's max |x|, as llama.cpp's Q8_0 activations), to
    int16 for 2/3/8-bit ones (<= 2^-16). GEMM_MIN_TOKENS or more tokens times a matrix
    for which prefill_int8 holds round x per 32 values too (to int8 for 4-bit codes, to int16
    for 8-bit ones; AVX2, and AVX-512 where the CPU has it); every other case uses x as given.
    """

def qmatrix_matmul_many(x: npt.NDArray[np.float32], bufs: list[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.float32]]:
    """[x @ W.T for W in bufs] for QMatrix buffers of the same cols (a layer's q, k, v) in one call:
    one token's x is rounded once per width its matrices need and one pass over the threads covers every matrix.
    The same numbers as qmatrix_matmul on each."""

def expert_forward(x: npt.NDArray[np.float32], blob: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """SwiGLU of one expert blob: down(silu(gate x) * up x), x [T, hidden] -> [T, hidden]."""

def round_rows_x8(
    x: npt.NDArray[np.float32], min_amax: float
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]] | None:
    """x [T, hidden] -> (q int8 [T, hidden], amax [T, hidden / 32]): each block of 32 rounded as the
    one-token decode kernels round a 4-bit matrix's input, or None where that cannot be undone exactly."""

def unround_rows_x8(q: npt.NDArray[np.int8], amax: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """round_rows_x8's (q, amax) -> x [T, hidden] that the decode kernels round to the same q and step."""

def experts_forward(
    xs: list[npt.NDArray[np.float32]], blobs: list[npt.NDArray[np.uint8]]
) -> list[npt.NDArray[np.float32]]:
    """expert_forward of each (x, blob) in one call; one-token inputs run whole experts one per thread."""

def sample(logits: npt.NDArray[np.float32], temperature: float, top_k: int, top_p: float, u: float) -> int:
    """The token drawn from logits [vocab] at temperature > 0 with top_k (0: all) and top_p (1: all),
    u a uniform draw in [0, 1) (native/dense.h)."""

def rms_norm(x: npt.NDArray[np.float32], w: npt.NDArray[np.float32], eps: float) -> npt.NDArray[np.float32]:
    """x / sqrt(mean(x^2) + eps) * w over x's last axis; a new array shaped like x."""

def rope(x: npt.NDArray[np.float32], start: int, inv_freq: npt.NDArray[np.float32]) -> None:
    """Rotary embedding in place (rotate-half) on float32 x [T, heads, head_dim] at positions start..;
    inv_freq [head_dim / 2]. Any other dtype or layout is a TypeError (no silent copy)."""

def attention(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    start: int,
    window: int = 0,
    sinks: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Causal grouped-query attention: q [T, heads, hd] at positions start.., k and v the whole cache
    [start + T, kv_heads, hd]; window > 0: a query sees only its last `window` keys; sinks [heads]:
    one more logit per head in each softmax's denominator (attention sinks). -> [T, heads * hd]."""

def softmax_topk(
    logits: npt.NDArray[np.float32], k: int, normalize: bool
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Softmax over each row of logits [T, E], its k largest (largest first, lower id on a tie),
    renormalized to sum 1 if normalize: (ids [T, k], weights [T, k])."""

class ExpertStore:
    """Reads expert blobs from the experts file: one pread per expert, O_DIRECT
    into 4 KiB aligned buffers when the filesystem allows it (buffered otherwise).

    offsets/sizes/checksums are [num_layers, num_experts]; size 0 marks "no expert".
    A blob whose CRC-32C differs (or whose header names another expert) raises
    CorruptExpertError naming layer and expert. A blob beyond the end of the file
    raises edgemoe.errors.ModelDirectoryError at construction (truncated file); a read
    that fails (an I/O error, a file shrunk since) raises edgemoe.errors.ExpertReadError
    and leaves the store usable.
    read_bytes_per_s / read_latency_s > 0 emulate a slower device (see set_throttle).
    verify: True / 'first read' checks each blob's CRC-32C on its first read by this store,
    and again once the file's size or timestamps change; 'every read' on every read, False never.
    """
    def __init__(
        self,
        path: str,
        offsets: npt.NDArray[np.uint64],
        sizes: npt.NDArray[np.uint64],
        checksums: npt.NDArray[np.uint32],
        direct: bool = True,
        verify: bool | Literal["first read", "every read", "never"] = True,
        read_bytes_per_s: float = 0.0,
        read_latency_s: float = 0.0,
    ) -> None: ...
    @property
    def direct(self) -> bool:
        """True when reads use O_DIRECT."""
    @property
    def verify(self) -> Literal["first read", "every read", "never"]:
        """When reads check a blob's CRC-32C (True at construction is 'first read')."""
    @property
    def path(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def file_bytes(self) -> int: ...
    @property
    def read_bytes_per_s(self) -> float:
        """Emulated bandwidth (0 = off)."""
    @property
    def read_latency_s(self) -> float:
        """Emulated latency per read (0 = off)."""
    def set_throttle(self, read_bytes_per_s: float, read_latency_s: float = 0.0) -> None:
        """Emulate a device's storage: a read of n bytes takes at least
        read_latency_s + n / read_bytes_per_s. Concurrent reads overlap their latency
        and share the bandwidth; a read that finishes early sleeps until its slot ends.
        0 turns either part off. Figures: devices/profiles/*.json."""
    def blob_size(self, layer: int, expert: int) -> int: ...
    def read(self, layer: int, expert: int) -> npt.NDArray[np.uint8]:
        """The blob's bytes (a copy), checksum verified."""
    def drop_page_cache(self) -> None:
        """Evict the experts file from the OS page cache (posix_fadvise DONTNEED), for benchmarks."""

class ExpertCache:
    """Expert blobs resident in RAM under a byte budget (0 = unbounded), read by
    `io_threads` I/O threads, evicted by `policy`:

    - "lru": least recently used first (a prefetch landing counts as a use);
    - "lfu": fewest demand uses first, ties by recency;
    - "structure" (structure-aware): lowest decayed activation rate (x EVICTION_DECAY
      per token) divided by the number of MoE layers until the expert's layer runs again (the layer just
      computed is the farthest, the next one the nearest), ties by recency.

    The budget bounds every buffer the cache holds, in flight included: a blob is
    charged its size rounded up to 4 KiB before it is read. Beyond the budget the
    cache keeps a fixed `entry_overhead_bytes` per (layer, expert) of the file (see
    native/cache.h for the rest). Experts in use by moe_forward are pinned and never
    evicted; if the budget cannot make room, BudgetError names the budget and the
    bytes needed. Demand reads (moe_forward misses) go before queued prefetches.
    io_threads=0: the calling thread reads, and prefetch() queues nothing.
    Thread-safe; no lock is held during a read or a computation.

    Low-bit fallback (HOBBIT): `fallback` is an ExpertStore of low-bit copies (the
    model's experts.fallback.bin). With fallback_threshold > 0, moe_forward serves a
    miss on an expert whose |gate weight| is below the threshold for every token of
    the call from its low-bit copy: its own entry, charged its own bytes. A use at or
    above the threshold always takes the full copy; a resident full copy is always used.
    """

    entry_overhead_bytes: Final[int]  # read-only, on the class
    fallback_threshold: float
    def __init__(
        self,
        store: ExpertStore,
        budget_bytes: int = 0,
        policy: str = "lru",
        io_threads: int = 2,
        fallback: ExpertStore | None = None,
        fallback_threshold: float = 0.0,
    ) -> None: ...
    @property
    def has_fallback(self) -> bool: ...
    @property
    def budget_bytes(self) -> int: ...
    @property
    def resident_bytes(self) -> int:
        """Bytes charged now: resident, being read, or reserved for a queued demand read."""
    @property
    def policy(self) -> str: ...
    @property
    def io_threads(self) -> int: ...
    def contains(self, layer: int, expert: int, low_bit: bool = False) -> bool:
        """True if the expert's full copy (low_bit: its low-bit copy) is resident."""
    def load(self, layer: int, expert: int) -> bool:
        """Blocking, one expert: make it resident now, without pinning it (may evict);
        returns when it is. True if it was not resident. Not counted as a hit or miss;
        counted in loads. prefetch() is the non-blocking read of a list of experts."""
    def prefetch(self, layer: int, experts: list[int], max_bytes: int = 0) -> int:
        """Non-blocking: queue reads of `experts` (a list) of `layer`, most likely first; returns
        how many were queued. Skips experts resident, queued or being read, and stops
        before the bytes queued by this call would pass max_bytes (0: no cap). A queued
        read starts after every demand read; when it starts it evicts only unpinned
        experts the policy values less, never one of the layer computing now or of a
        layer that runs before it, else it is dropped. A wrong guess costs bandwidth,
        never correctness. load() is the blocking read of one expert."""
    def cancel_prefetches(self, layer: int = -1) -> int:
        """Drop queued prefetches that have not started (all, or those of `layer`); returns how many."""
    def set_current_layer(self, layer: int) -> None:
        """The layer computing now (moe_forward sets it): the structure policy's distances,
        the layers a prefetch may not evict from, and token boundaries."""
    def wait_idle(self) -> None:
        """Block until no read is queued or in flight."""
    def clear(self) -> None:
        """Cancel queued prefetches and evict every unpinned expert."""
    def stats(self) -> dict[str, int | float]:
        """The layer_stats() keys summed over layers, and resident_bytes (charged now),
        peak_resident_bytes (never above the budget), direct_io (a bool). Counts and bytes
        are ints, the *_seconds floats."""
    def layer_stats(self) -> list[dict[str, int | float]]:
        """One dict per layer of the experts file (its model layer index in "layer"); counts
        and bytes are ints, the *_seconds floats:
        hits / misses (demanded experts found resident / not), loads and bytes_read
        (reads, demand and prefetch, and their blob bytes), demand_bytes, prefetch_issued
        (queued), prefetch_loads and prefetch_bytes (read), prefetch_hits (demanded while
        resident or in flight because of a prefetch), prefetch_cancelled (before they
        started), prefetch_dropped (no room worth taking), wasted_prefetch_bytes
        (prefetched, then evicted unused), evictions, read_seconds (inside reads, all
        threads), stall_seconds (moe_forward waiting for reads), compute_seconds;
        fallback_uses (demands served by a low-bit copy, also in hits/misses),
        fallback_loads and fallback_bytes (its reads, also in loads/bytes_read),
        fallback_bytes_saved (per fallback use: the full copy's bytes minus those read)."""
    def reset_stats(self) -> None: ...

def moe_forward(
    cache: ExpertCache,
    layer: int,
    x: npt.NDArray[np.float32],
    expert_ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    *,
    per_token: bool = False,
) -> npt.NDArray[np.float32]:
    """sum_k weights[t, k] * expert[expert_ids[t, k]](x[t]) for every token t.

    x [T, hidden], expert_ids/weights [T, k]. Each distinct expert is fetched
    from the cache once for all tokens that chose it and pinned for the call: the
    reads of the missing ones go to the I/O threads at once (waiting for a
    prefetch already reading one instead of reading it twice), the resident ones
    compute meanwhile, then each missing one as it lands. The weighted sum runs
    in slot order, so the result does not depend on what was cached. Sets the
    cache's current layer. An out-of-range expert id or a shape mismatch raises ValueError.
    Bit for bit combine_slots(moe_forward_slots(cache, layer, x, expert_ids, weights=weights), weights).
    """

def moe_forward_slots(
    cache: ExpertCache,
    layer: int,
    x: npt.NDArray[np.float32],
    expert_ids: npt.NDArray[np.int32],
    mask: npt.NDArray[np.bool_] | None = None,
    weights: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Each slot's expert output ys [T, k, hidden]: ys[t, j] = expert[expert_ids[t, j]](x[t])
    for the slots where mask [T, k] is True (None: every slot); the others are zero.

    Each expert computes all its slots in one call through the cache, as moe_forward does
    (pinned once, reads overlapping compute), so combine_slots(ys, weights) is moe_forward's
    result bit for bit. weights [T, k] only decide the low-bit fallback (as in moe_forward);
    None: no slot falls back. Every expert id is checked, masked out or not (ValueError).
    Sets the cache's current layer.
    """

def combine_slots(ys: npt.NDArray[np.float32], weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """y [T, hidden] = sum_j weights[t, j] * ys[t, j] for ys [T, k, hidden], in slot order
    from 0: the weighted sum that ends moe_forward, with the same arithmetic."""

class DecodeLayer:
    """One MoE decoder layer's weights for the one-call decode step (native/layer.h): the same
    ops and arithmetic as DecoderLM.block for one token. Linears are (array, kind) pairs: kind
    'qmatrix' (a U8 QMatrix buffer) or 'f32' / 'f16' / 'bf16' (a float matrix [out, in])."""

    def __init__(
        self,
        layer: int,
        q: tuple[npt.NDArray[Any], str],
        k: tuple[npt.NDArray[Any], str],
        v: tuple[npt.NDArray[Any], str],
        o: tuple[npt.NDArray[Any], str],
        router: tuple[npt.NDArray[Any], str],
        attn_norm: npt.NDArray[np.float32],
        ffn_norm: npt.NDArray[np.float32],
        inv_freq: npt.NDArray[np.float32],
        heads: int,
        kv_heads: int,
        head_dim: int,
        top_k: int,
        window: int,
        eps: float,
        normalize: bool,
    ) -> None: ...
    def step(
        self,
        cache: ExpertCache,
        h: npt.NDArray[np.float32],
        k_cache: npt.NDArray[np.float32],
        v_cache: npt.NDArray[np.float32],
        pos: int,
    ) -> None:
        """The token at position pos through this layer: h [hidden] += attention + MoE, in place;
        writes position pos of k_cache / v_cache [capacity, kv_heads, head_dim] and attends to
        positions 0..pos."""
    def attend(
        self,
        h: npt.NDArray[np.float32],
        k_cache: npt.NDArray[np.float32],
        v_cache: npt.NDArray[np.float32],
        pos: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """step() up to the experts, for a caller that computes them elsewhere (a cluster): h
        [hidden] += attention, in place, and the KV cache as step() writes it; returns the MoE's
        input x [1, hidden] float32 and the token's experts, ids [1, top_k] int32 and weights
        [1, top_k] float32. step() is this, the experts' weighted sum, and h += it."""

# raised by the core, caught as edgemoe.errors' classes (their subclasses)
class LinkSwitch:
    """The link emulator's switching loop (`python -m edgemoe.cluster.linkem`): every packet read
    from a port's descriptor is held for the sender's and the receiver's one-way delays, paced
    at their rates, and written to the port whose address is its IPv4 destination.

    ports: (fd, "a.b.c.d", one-way delay in s, bits/s or 0 for no limit) per endpoint; the
    descriptors (nonblocking, one packet per read and write: TUN devices, packet sockets) stay
    the caller's. spin_s: poll without sleeping for this long before a packet is due."""

    def __init__(self, ports: list[tuple[int, str, float, float]], spin_s: float = 0.0) -> None: ...
    def run(self, watch_fd: int = -1) -> Literal["stopped", "readable"]:
        """Switch until stop() ('stopped') or until watch_fd, if given, is readable ('readable'; not
        read here: signal.set_wakeup_fd's descriptor, for one). Packets held stay held for the next
        run(). Releases the GIL."""

    def stop(self) -> None:
        """Make run() return 'stopped' (from any thread; at once or when next called)."""

    def stats(self) -> dict[str, Any]:
        """Counters so far (not while run() is running in another thread): per flow (src and dst
        port index, IP protocol, TCP/UDP ports) packets, bytes and queued_s (time behind earlier
        packets on the links); totals; late_*: how much later than due each packet's write began
        (the emulator's own delay); write_sum_s: time in write() (the receiving stack, run by this
        thread); wakeups; seconds switched."""

class CorruptExpertError(edgemoe.errors.CorruptExpertError): ...
class BudgetError(edgemoe.errors.BudgetError): ...
