"""Type stub for the native core (native/, bound with pybind11).

Every call that does real work releases the GIL. Arrays must be C-contiguous.
Matrices follow FORMAT.md's QMatrix layout; blobs follow its expert blob layout.
"""
from typing import Any

import numpy as np
import numpy.typing as npt

def set_num_threads(n: int) -> None:
    """Threads used by the compute kernels (default: hardware threads)."""

def get_num_threads() -> int: ...
def crc32c(data: npt.NDArray[np.uint8] | bytes, seed: int = 0) -> int:
    """CRC-32C (Castagnoli) of a buffer, as stored in the manifest."""

def crc32c_impl() -> str:
    """Which CRC-32C implementation this build uses: 'sse4.2', 'armv8-crc' or 'table'."""

def stream_read(data: npt.NDArray[Any] | bytes) -> int:
    """Read every byte of a buffer once on the kernel threads (returns a checksum of it):
    the memory bandwidth the kernels can hope for. For benchmarks."""

def simd() -> str:
    """Which kernel path this build uses: 'avx2+fma+f16c' or 'portable' (chosen at build time)."""

def linear(x: npt.NDArray[np.float32], w: npt.NDArray[Any], kind: str) -> npt.NDArray[np.float32]:
    """y[T, out] = x[T, in] @ w[out, in].T for a float weight.

    kind: 'f32' (w float32), 'f16' (w float16 or uint16 bits), 'bf16' (w uint16 bits).
    w must be C-contiguous (read in place, never copied). A 1-D x is one token and gives a 1-D y.
    """

def qmatrix_matmul(x: npt.NDArray[np.float32], buf: npt.NDArray[np.uint8], offset: int = 0) -> npt.NDArray[np.float32]:
    """y[T, rows] = x[T, cols] @ W.T for a QMatrix stored in buf at offset (any kind).

    Numerics: f32 accumulation. On the AVX2 path a single token (T=1) times a
    group-quantized matrix rounds x to int16 per 32 values first (error <= 2^-16
    of each block's max |x|, well below the weights' quantization error); every
    other case uses x as given.
    """

def expert_forward(x: npt.NDArray[np.float32], blob: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """SwiGLU of one expert blob: down(silu(gate x) * up x), x [T, hidden] -> [T, hidden]."""

class ExpertStore:
    """Reads expert blobs from the experts file: one pread per expert, O_DIRECT
    into 4 KiB aligned buffers when the filesystem allows it (buffered otherwise).

    offsets/sizes/checksums are [num_layers, num_experts]; size 0 marks "no expert".
    A blob whose CRC-32C differs (or whose header names another expert) raises
    CorruptExpertError naming layer and expert. A blob beyond the end of the file
    raises edgemoe.errors.ModelDirectoryError at construction (truncated file).
    """
    def __init__(
        self,
        path: str,
        offsets: npt.NDArray[np.uint64],
        sizes: npt.NDArray[np.uint64],
        checksums: npt.NDArray[np.uint32],
        direct: bool = True,
        verify: bool = True,
    ) -> None: ...
    @property
    def direct(self) -> bool:
        """True when reads use O_DIRECT."""
    @property
    def verify(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def file_bytes(self) -> int: ...
    def blob_size(self, layer: int, expert: int) -> int: ...
    def read(self, layer: int, expert: int) -> npt.NDArray[np.uint8]:
        """The blob's bytes (a copy), checksum verified."""
    def drop_page_cache(self) -> None:
        """Evict the experts file from the OS page cache (posix_fadvise DONTNEED), for benchmarks."""

class ExpertCache:
    """Expert blobs resident in RAM under a byte budget (0 = unbounded), LRU.

    The budget counts each resident blob's buffer (its size rounded up to 4 KiB).
    Experts in use by moe_forward are pinned and never evicted; if the budget
    cannot make room, BudgetError names the budget and the bytes needed.
    Thread-safe: reads happen outside the lock, concurrent requests for one
    expert wait for a single read.
    """
    def __init__(self, store: ExpertStore, budget_bytes: int = 0) -> None: ...
    @property
    def budget_bytes(self) -> int: ...
    @property
    def resident_bytes(self) -> int: ...
    def contains(self, layer: int, expert: int) -> bool: ...
    def prefetch(self, layer: int, expert: int) -> bool:
        """Make the expert resident without pinning it (may evict). True if this call read it.
        Not counted as a hit or miss; counted in loads and bytes_read."""
    def clear(self) -> None: ...
    def stats(self) -> dict[str, float]:
        """hits, misses (requests from moe_forward), loads (reads from the file),
        evictions, bytes_read (blob bytes loaded), read_seconds, resident_bytes,
        peak_resident_bytes, direct_io (1.0/0.0)."""
    def reset_stats(self) -> None: ...

def moe_forward(
    cache: ExpertCache,
    layer: int,
    x: npt.NDArray[np.float32],
    expert_ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """sum_k weights[t, k] * expert[expert_ids[t, k]](x[t]) for every token t.

    x [T, hidden], expert_ids/weights [T, k]. Each distinct expert is fetched
    from the cache once for all tokens that chose it (loaded on a miss, pinned
    while it computes). An out-of-range expert id or a shape mismatch raises ValueError.
    """

class CorruptExpertError(Exception): ...
class BudgetError(Exception): ...
