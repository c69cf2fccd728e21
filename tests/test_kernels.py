"""Native kernels (edgemoe._core) against the numpy reference (edgemoe.quant)."""

import numpy as np
import pytest
import reference

from edgemoe import _core
from edgemoe.format import quant as q

RNG = np.random.default_rng(1234)


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6))


def matmul_err(y, x, w):
    """Error of y = x @ w.T relative to sum |x||w| (float32 rounding scales with it)."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    return float((np.abs(y - ref) / np.maximum(scale, 1e-30)).max())


def uses_x16(bits, T):
    """The SIMD decode (AVX2, NEON; one token) rounds x per 32 values (kernels.cpp): to int16, or int8 (uses_x8)."""
    return T == 1 and not _core.simd().startswith("portable")


def uses_x8(bits, T):
    """4-bit codes meet x rounded to int8 (vpmaddubsw) in that decode."""
    return uses_x16(bits, T) and bits == 4


def uses_prefill_x8(buf, T, expert=False):
    """Several tokens times 4- or 8-bit codes on AVX2 or AVX-512: x rounded per 32 values (the
    integer prefill kernels; prefill_levels), min terms from the rounded x as the int8 decode."""
    return T >= _core.GEMM_MIN_TOKENS and _core.prefill_int8(buf, expert=expert)


def prefill_levels(buf):
    """What the integer prefill rounds x to for this matrix: int16 (32767) for 8-bit codes, else int8 (127)."""
    return 32767 if q.matrix_header(buf)["bits"] == 8 else 127


def round_x(x, levels):
    """x rounded per block of 32 to integers in [-levels, levels] times the block's dx, as
    quantize_x16 (levels 32767) and quantize_x8 (127) do it in float32; float64 result."""
    xb = x.reshape(-1, x.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    dx = amax / np.float32(levels)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(levels) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(xb * inv).astype(np.float64) * dx).reshape(x.shape)


def group_mins(buf):
    """Each group's min [rows, cols/gs] as float64: stored (kind 3) or -2^(bits-1) * scale (kind 4)."""
    h = q.matrix_header(buf)
    ng = h["rows"] * h["cols"] // h["group_size"]
    if h["kind"] == q.KIND_QS:
        off, mult = h["scales_offset"], -float(1 << (h["bits"] - 1))
    else:
        off, mult = h["mins_offset"], 1.0
    return mult * buf[off : off + 2 * ng].view("<f2").astype(np.float64).reshape(h["rows"], -1)


def x16_matmul_reference(x, buf):
    """What that kernel computes, in float64: (s*q) . x16*dx + min . x for int16, and
    w . x8*dx for int8 (its group sums, min term included, come from the rounded x)."""
    h = q.matrix_header(buf)
    deq = q.dequantize_matrix(buf).astype(np.float64)
    if uses_x8(h["bits"], 1):
        return round_x(x, 127) @ deq.T
    mins = np.repeat(group_mins(buf), h["group_size"], axis=1)
    return round_x(x, 32767) @ (deq - mins).T + x.astype(np.float64) @ mins.T


# (symmetric, kind): asymmetric kind 3, symmetric kind 4, and format 1's symmetric kind 3
LAYOUTS = [(False, q.KIND_Q), (True, q.KIND_QS), (True, q.KIND_Q)]


@pytest.mark.parametrize("bits", q.QBITS)
@pytest.mark.parametrize("group_size", q.GROUP_SIZES)
@pytest.mark.parametrize("symmetric,kind", LAYOUTS)
def test_quantized_matmul_matches_reference(bits, group_size, symmetric, kind):
    for rows, cols in [(1, 128), (37, 256), (64, 384)]:
        if cols % group_size:
            continue
        w = RNG.standard_normal((rows, cols)).astype(np.float32)
        buf = q.quantize_matrix(w, bits, group_size, symmetric, kind)
        assert q.matrix_header(buf)["kind"] == kind
        deq = q.dequantize_matrix(buf)
        for T in (1, 2, 5, 9, 13, 35):
            x = RNG.standard_normal((T, cols)).astype(np.float32)
            y = _core.qmatrix_matmul(x, buf)
            assert y.shape == (T, rows) and y.dtype == np.float32
            if uses_prefill_x8(buf, T):
                ref = round_x(x, prefill_levels(buf)) @ deq.astype(np.float64).T
                scale = np.abs(x) @ np.abs(deq).T
                assert (np.abs(y - ref) / scale).max() < 1e-6, (rows, cols, T)
                assert matmul_err(y, x, deq) < (1e-4 if bits == 8 else 1e-2), (rows, cols, T)
            elif uses_x16(bits, T):
                ref = x16_matmul_reference(x, buf)
                scale = np.abs(x) @ np.abs(deq).T
                assert (np.abs(y - ref) / scale).max() < 1e-6, (rows, cols, T)
                # int8: error <= max|x_block| / 254 per value; int16: / 65534
                assert matmul_err(y, x, deq) < (1e-2 if uses_x8(bits, T) else 1e-4), (rows, cols, T)
            else:
                assert matmul_err(y, x, deq) < 1e-6, (rows, cols, T)


@pytest.mark.parametrize("bits", q.QBITS)
def test_x16_decode_error_stays_small_with_outliers(bits):
    """Rounding x to int16 per 32 values costs ~2^-16 of a block's max, even with outliers;
    int8 (4-bit codes) ~2^-8, as llama.cpp's Q8_0 activations."""
    rng = np.random.default_rng(bits)
    buf = q.quantize_matrix(rng.standard_normal((64, 1024)).astype(np.float32), bits, 64, False)
    deq = q.dequantize_matrix(buf)
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    x[0, rng.integers(0, 1024, 8)] *= 50
    assert matmul_err(_core.qmatrix_matmul(x, buf), x, deq) < (1e-2 if uses_x8(bits, 1) else 1e-4)


@pytest.mark.parametrize("bits", q.QBITS)
def test_matmul_at_an_offset_and_1d_x(bits):
    w = RNG.standard_normal((19, 64)).astype(np.float32)
    buf = q.quantize_matrix(w, bits, 32, False)
    padded = np.concatenate([np.zeros(64, np.uint8), buf])
    x = RNG.standard_normal(64).astype(np.float32)
    y = _core.qmatrix_matmul(x, padded, 64)
    assert y.shape == (19,)
    assert matmul_err(y[None], x[None], q.dequantize_matrix(buf)) < (1e-2 if uses_x8(bits, 1) else 1e-4)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 7), (33, 100), (64, 512), (5, 1000)])
def test_float_matmul_matches_reference(kind, shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    buf = q.float_matrix(w, kind)
    deq = q.dequantize_matrix(buf)
    for T in (1, 4, 7, 13):
        x = RNG.standard_normal((T, shape[1])).astype(np.float32)
        assert matmul_err(_core.qmatrix_matmul(x, buf), x, deq) < 1e-6


def test_linear_reads_numpy_weights_in_place():
    w = RNG.standard_normal((50, 96)).astype(np.float32)
    x = RNG.standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_allclose(_core.linear(x, w, "f32"), x @ w.T, rtol=1e-5, atol=1e-5)
    w16 = w.astype(np.float16)
    ref16 = x @ w16.astype(np.float32).T
    np.testing.assert_allclose(_core.linear(x, w16, "f16"), ref16, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_core.linear(x, w16.view(np.uint16), "f16"), ref16, rtol=1e-5, atol=1e-5)
    bf = q.f32_to_bf16_bits(w)
    np.testing.assert_allclose(_core.linear(x, bf, "bf16"), x @ q.bf16_bits_to_f32(bf).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        _core.linear(x, w[:, ::2], "f32")  # not contiguous: refuse rather than copy
    with pytest.raises(ValueError):
        _core.linear(x, w, "bf16")
    with pytest.raises(ValueError):
        _core.linear(x[:, :10], w, "f32")


def test_bf16_bits_pass_through_losslessly():
    bits = RNG.integers(0, 0x7F00, size=(4, 32), dtype=np.uint16)
    buf = q.float_matrix(bits, "bf16")
    np.testing.assert_array_equal(q.dequantize_matrix(buf), q.bf16_bits_to_f32(bits))


@pytest.mark.parametrize("bits,bound", [(2, 0.5), (3, 0.25), (4, 0.12), (8, 0.008)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_scales_with_bits(bits, bound, symmetric):
    w = RNG.standard_normal((16, 256)).astype(np.float32)
    for gs in q.GROUP_SIZES:
        deq = q.dequantize_matrix(q.quantize_matrix(w, bits, gs, symmetric))
        g = w.reshape(16, -1, gs)
        spread = np.abs(g).max(axis=-1, keepdims=True) * 2  # range of the group
        err = np.abs(deq.reshape(16, -1, gs) - g) / spread
        # rounding error is half a step: spread / (2^bits - 1) / 2; clipping adds at most one step
        assert err.max() <= bound, (gs, err.max())


def test_quantize_guards_constant_groups():
    w = np.zeros((2, 64), np.float32)
    w[1] = 3.0
    for bits in q.QBITS:
        for sym in (False, True):
            np.testing.assert_allclose(q.dequantize_matrix(q.quantize_matrix(w, bits, 32, sym)), w, atol=3e-3)


def test_pack_unpack_roundtrip():
    for bits in q.QBITS:
        codes = RNG.integers(0, 1 << bits, size=(3, 128), dtype=np.uint8)
        packed = q.pack_codes(codes, bits)
        assert packed.shape == (3, 128 // 32 * q.CHUNK_BYTES[bits])
        np.testing.assert_array_equal(q.unpack_codes(packed, bits, 3, 128), codes)


def test_bad_matrix_header_is_value_error():
    buf = q.quantize_matrix(RNG.standard_normal((4, 64)).astype(np.float32), 4, 32, False)
    with pytest.raises(ValueError):
        _core.qmatrix_matmul(np.zeros(64, np.float32), buf[:-10])  # truncated
    bad = buf.copy()
    bad[9] = 5  # bits
    with pytest.raises(ValueError):
        _core.qmatrix_matmul(np.zeros(64, np.float32), bad)
    bad = buf.copy()
    bad[8] = q.KIND_QS  # kind 4 with a mins section: the header lies
    with pytest.raises(ValueError, match="mins offset"):
        _core.qmatrix_matmul(np.zeros(64, np.float32), bad)
    sym = q.quantize_matrix(RNG.standard_normal((4, 64)).astype(np.float32), 4, 32, True)
    with pytest.raises(ValueError):
        _core.qmatrix_matmul(np.zeros(64, np.float32), sym[:-1])  # kind 4 truncated in its scales
    with pytest.raises(ValueError):
        q.quantize_matrix(np.zeros((4, 64), np.float32), 4, 32, False, q.KIND_QS)  # kind 4 is symmetric only


@pytest.mark.parametrize("bits", q.QBITS)
@pytest.mark.parametrize("group_size", q.GROUP_SIZES)
def test_symmetric_kind4_drops_exactly_the_mins(bits, group_size):
    """Kind 4 is format 1's symmetric kind 3 without the mins section (and its padding): the
    same codes and scales bytes, the same values w, and the same kernel outputs bit for bit
    (the kernels' min term is -2^(bits-1) * scale, a power of two times the stored min)."""
    w = RNG.standard_normal((40, 256)).astype(np.float32)
    new = q.quantize_matrix(w, bits, group_size, True)
    old = q.quantize_matrix(w, bits, group_size, True, q.KIND_Q)
    hn, ho = q.matrix_header(new), q.matrix_header(old)
    assert (hn["kind"], hn["mins_offset"], ho["kind"]) == (q.KIND_QS, 0, q.KIND_Q)
    mins_bytes = 2 * 40 * 256 // group_size
    assert hn["total_bytes"] == new.nbytes == ho["scales_offset"] + mins_bytes  # ends after the scales
    pad = ho["mins_offset"] - new.nbytes  # format 1 aligned its mins section to 64 bytes
    assert 0 <= pad < 64 and old.nbytes - new.nbytes == pad + mins_bytes
    np.testing.assert_array_equal(new[32:], old[32 : new.nbytes])  # codes and scales
    np.testing.assert_array_equal(q.dequantize_matrix(new), q.dequantize_matrix(old))
    for T in (1, 3, 13):  # decode, a few tokens, prefill
        x = RNG.standard_normal((T, 256)).astype(np.float32)
        np.testing.assert_array_equal(_core.qmatrix_matmul(x, new), _core.qmatrix_matmul(x, old))


def make_blob(hidden, inter, bits, gs=32, sym=False, layer=0, expert=0, kind=None):
    def mat(r, c):
        w = (RNG.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32)
        return q.float_matrix(w, kind) if kind else q.quantize_matrix(w, bits, gs, sym)

    return q.pack_expert_blob(layer, expert, mat(inter, hidden), mat(inter, hidden), mat(hidden, inter))


@pytest.mark.parametrize(
    "bits,kind,sym",
    [
        (2, None, False),
        (3, None, False),
        (4, None, False),
        (8, None, False),
        (2, None, True),
        (3, None, True),
        (4, None, True),
        (8, None, True),
        (16, "bf16", False),
        (16, "f16", False),
        (32, "f32", False),
    ],
)
def test_expert_forward_matches_reference(bits, kind, sym):
    blob = make_blob(64, 96, bits, sym=sym, kind=kind)
    info = q.parse_blob(blob)
    assert blob.size == info["offsets"][2] + info["sizes"][2]  # exact length
    for T in (1, 3, 6, 16):
        x = RNG.standard_normal((T, 64)).astype(np.float32)
        y = _core.expert_forward(x, blob)
        g_off, _, d_off = info["offsets"]
        if uses_x8(bits, T) or (uses_prefill_x8(blob[g_off:], T, True) and uses_prefill_x8(blob[d_off:], T, True)):
            # x and h rounded as the kernel does (int8; int16 for 8-bit codes in prefill): ~2% of
            # the largest output against the float reference with int8, ~5e-7 against this one
            gate, up, down = (m.astype(np.float64) for m in q.expert_matrices(blob))
            levels = 127 if uses_x8(bits, T) else prefill_levels(blob[g_off:])
            xr = round_x(x, levels)
            h = (reference.silu(xr @ gate.T) * (xr @ up.T)).astype(np.float32)
            assert rel_err(y, round_x(h, levels) @ down.T) < 1e-5, T
            assert rel_err(y, reference.expert_forward(x, blob)) < (1e-3 if levels > 127 else 3e-2), T
            continue
        # one token on AVX2/NEON rounds x and h to int16 (uses_x16): ~2e-4 of the largest output at worst
        tol = 1e-3 if uses_x16(bits, T) else 1e-4
        assert rel_err(y, reference.expert_forward(x, blob)) < tol, T


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_expert_blob_is_smaller_by_the_mins_and_computes_the_same(bits):
    H, I = 64, 96
    ws = [(RNG.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for s in ((I, H), (I, H), (H, I))]
    new = q.pack_expert_blob(0, 0, *(q.quantize_matrix(w, bits, 32, True) for w in ws))
    old = q.pack_expert_blob(0, 0, *(q.quantize_matrix(w, bits, 32, True, q.KIND_Q) for w in ws))
    mins_bytes = sum(2 * w.size // 32 for w in ws)  # 64-byte multiples here: no padding either way
    assert old.nbytes - new.nbytes == mins_bytes
    from edgemoe.planning.allocate import blob_nbytes

    assert blob_nbytes(H, I, bits, 32, symmetric=True) == new.nbytes
    assert blob_nbytes(H, I, bits, 32, symmetric=False) == old.nbytes  # asymmetric: same layout as before
    for T in (1, 3, 16):
        x = RNG.standard_normal((T, H)).astype(np.float32)
        np.testing.assert_array_equal(_core.expert_forward(x, new), _core.expert_forward(x, old))


def test_threads_give_the_same_answer():
    buf = q.quantize_matrix(RNG.standard_normal((300, 512)).astype(np.float32), 4, 64, False)
    x = RNG.standard_normal((5, 512)).astype(np.float32)
    n = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        one = _core.qmatrix_matmul(x, buf)
        _core.set_num_threads(3)
        assert _core.get_num_threads() == 3
        np.testing.assert_array_equal(_core.qmatrix_matmul(x, buf), one)
    finally:
        _core.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_experts_in_one_call_are_each_experts_answer(threads):
    """experts_forward: one token through each expert (one per thread when the bytes share
    evenly, a lone one on the calling thread), or several tokens, mixed bitwidths: every
    output is expert_forward's, bit for bit, whatever the threads and however long idle
    threads spin."""
    blobs = [make_blob(64, 96, 4, sym=True), make_blob(64, 96, 8, sym=True), make_blob(64, 96, 4, sym=False)]
    n, spin = _core.get_num_threads(), _core.get_thread_spin()
    try:
        _core.set_num_threads(threads)
        for us in (0, 200):
            _core.set_thread_spin(us)
            assert _core.get_thread_spin() == us
            for T, k in ((1, 1), (1, 2), (1, 3), (4, 2), (1, 0)):
                xs = [RNG.standard_normal((T, 64)).astype(np.float32) for _ in range(k)]
                ys = _core.experts_forward(xs, blobs[:k])
                assert len(ys) == k
                for x, blob, y in zip(xs, blobs, ys):
                    np.testing.assert_array_equal(y, _core.expert_forward(x, blob))
    finally:
        _core.set_num_threads(n)
        _core.set_thread_spin(spin)
    with pytest.raises(ValueError, match="2 inputs for 1 experts"):
        _core.experts_forward([np.zeros((1, 64), np.float32)] * 2, blobs[:1])
    with pytest.raises(ValueError):  # a hidden size the expert does not take
        _core.experts_forward([np.zeros((1, 32), np.float32)], blobs[:1])


def test_crc32c_known_vectors():
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"") == 0
    assert _core.crc32c(np.zeros(32, np.uint8)) == 0x8A9136AA
    data = RNG.integers(0, 256, 1000, dtype=np.uint8)
    assert _core.crc32c(data[500:], _core.crc32c(data[:500])) == _core.crc32c(data)


def _crc32c_python(data: bytes) -> int:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ table[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def test_crc32c_long_buffers_match_a_bytewise_reference():
    data = RNG.integers(0, 256, 3 * 4096 * 2 + 999, dtype=np.uint8)  # past the 3-stream block size
    for n in (3 * 4096, data.size):
        assert _core.crc32c(data[:n]) == _crc32c_python(data[:n].tobytes())


@pytest.mark.parametrize("T", [1, 3, 16])
def test_matmul_many_matches_one_at_a_time(T):
    cols = 256
    bufs = [
        q.quantize_matrix(RNG.standard_normal((rows, cols)).astype(np.float32), 4, 64, False) for rows in (96, 32, 40)
    ]
    bufs.append(q.quantize_matrix(RNG.standard_normal((8, cols)).astype(np.float32), 8, 64, False))
    bufs.append(q.quantize_matrix(RNG.standard_normal((24, cols)).astype(np.float32), 4, 64, True))  # kind 4
    x = RNG.standard_normal((T, cols)).astype(np.float32)
    ys = _core.qmatrix_matmul_many(x, bufs)
    for y, buf in zip(ys, bufs):
        np.testing.assert_array_equal(y, _core.qmatrix_matmul(x, buf))
    four = [b for b in bufs if q.matrix_header(b)["bits"] == 4]  # prefill: x rounded once for all of them
    for y, buf in zip(_core.qmatrix_matmul_many(x, four), four):
        np.testing.assert_array_equal(y, _core.qmatrix_matmul(x, buf))
    with pytest.raises(ValueError):
        _core.qmatrix_matmul_many(x, [bufs[0], q.quantize_matrix(np.ones((4, 128), np.float32), 4, 64, False)])


# The AVX-512 sets the kernels need, as Linux names them in /proc/cpuinfo (it drops them
# when the OS does not save the zmm state).
AVX512_SETS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def test_avx512_kernels_follow_what_the_cpu_has():
    """The core picks its AVX-512 kernels at run time exactly when this CPU has every set they use."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None or "sse2" not in flags:
        pytest.skip("not an x86 Linux machine: the AVX-512 kernels are x86 only")
    missing = [s for s in AVX512_SETS if s not in flags]
    assert ("avx512vnni" in _core.simd()) == (not missing), _core.simd()
    if missing:
        pytest.skip(
            f"this CPU lacks {' '.join(missing)}: the real AVX-512 kernels are not run here "
            "(the native tests check their SIMDe build)"
        )
    for bits in (4, 8):  # on this CPU the integer prefill takes 4-bit codes (int8 x) and 8-bit ones (int16 x)
        buf = q.quantize_matrix(RNG.standard_normal((32, 64)).astype(np.float32), bits, 32, False)
        assert _core.prefill_int8(buf, expert=True) and _core.prefill_int8(buf)
