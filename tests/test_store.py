"""ExpertStore / ExpertCache / moe_forward on a small experts file written with quant.py."""

import os

import numpy as np
import pytest
import reference

from edgemoe import _core, errors
from edgemoe.format import quant as q

L, E, H, I = 2, 4, 64, 96


def write_experts(path, bits_of=lambda l, e: 4, seed=0):
    """An experts.bin per docs/format.md; returns (offsets, sizes, checksums, blobs)."""
    rng = np.random.default_rng(seed)
    blobs, offsets, sizes, crcs = (
        {},
        np.zeros((L, E), np.uint64),
        np.zeros((L, E), np.uint64),
        np.zeros((L, E), np.uint32),
    )
    pos, parts = q.EXPERTS_HEADER_BYTES, []
    for l in range(L):
        for e in range(E):
            bits = bits_of(l, e)

            def mat(r, c):
                w = (rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32)
                return q.float_matrix(w, "bf16") if bits == 16 else q.quantize_matrix(w, bits, 32, False)

            blob = q.pack_expert_blob(l, e, mat(I, H), mat(I, H), mat(H, I))
            blobs[l, e] = blob
            offsets[l, e], sizes[l, e], crcs[l, e] = pos, blob.size, _core.crc32c(blob)
            parts.append((pos, blob))
            pos = (pos + blob.size + 4095) // 4096 * 4096
    file_bytes = parts[-1][0] + parts[-1][1].size  # the last blob ends the file, mid-page
    data = np.zeros(file_bytes, np.uint8)
    data[:4096] = q.experts_file_header(L, E, L * E, file_bytes)
    for off, blob in parts:
        data[off : off + blob.size] = blob
    data.tofile(path)
    return offsets, sizes, crcs, blobs


@pytest.fixture()
def experts(tmp_path):
    path = str(tmp_path / "experts.bin")
    offsets, sizes, crcs, blobs = write_experts(path, bits_of=lambda l, e: (2, 3, 4, 8)[e] if l else 16)
    return path, offsets, sizes, crcs, blobs


def test_reads_return_the_blobs(experts):
    path, offsets, sizes, crcs, blobs = experts
    store = _core.ExpertStore(path, offsets, sizes, crcs)
    assert store.direct  # ext4 under /tmp accepts O_DIRECT
    assert (store.num_layers, store.num_experts) == (L, E)
    for (l, e), blob in blobs.items():
        assert store.blob_size(l, e) == blob.size
        np.testing.assert_array_equal(store.read(l, e), blob)


def test_buffered_reads_and_tmpfs_fallback(experts, tmp_path):
    path, offsets, sizes, crcs, blobs = experts
    store = _core.ExpertStore(path, offsets, sizes, crcs, direct=False)
    assert not store.direct
    np.testing.assert_array_equal(store.read(1, 3), blobs[1, 3])
    if os.path.isdir("/dev/shm"):  # tmpfs may refuse O_DIRECT: then reads fall back to buffered
        shm = f"/dev/shm/edgemoe-test-{os.getpid()}.bin"
        try:
            with open(path, "rb") as src, open(shm, "wb") as dst:
                dst.write(src.read())
            s = _core.ExpertStore(shm, offsets, sizes, crcs, direct=True)
            np.testing.assert_array_equal(s.read(1, 3), blobs[1, 3])
        finally:
            os.unlink(shm)


def test_flipped_byte_is_a_corrupt_expert(experts):
    path, offsets, sizes, crcs, blobs = experts
    with open(path, "r+b") as f:
        f.seek(int(offsets[1, 2]) + 1000)
        b = f.read(1)
        f.seek(int(offsets[1, 2]) + 1000)
        f.write(bytes([b[0] ^ 0x10]))
    store = _core.ExpertStore(path, offsets, sizes, crcs)
    with pytest.raises(errors.CorruptExpertError, match="expert 2 of layer 1 failed its checksum") as info:
        store.read(1, 2)
    assert isinstance(info.value, _core.CorruptExpertError)
    assert isinstance(info.value, errors.ModelDirectoryError)
    assert "convert the model again" in str(info.value)
    store.read(1, 1)  # the others are fine
    unverified = _core.ExpertStore(path, offsets, sizes, crcs, verify=False)
    assert unverified.verify == "never" and unverified.read(1, 2).size == blobs[1, 2].size
    assert store.verify == "first read"
    with pytest.raises(errors.CorruptExpertError, match="failed its checksum"):
        store.read(1, 2)  # a blob that failed was not marked checked: it fails again


def test_first_read_verification_checks_again_after_the_file_changes(experts):
    """verify=True checks a blob's first read, and again after the file changed under the
    store (its size or timestamps moved): a blob rewritten after it was read once fails too."""
    path, offsets, sizes, crcs, blobs = experts
    once = _core.ExpertStore(path, offsets, sizes, crcs)
    every = _core.ExpertStore(path, offsets, sizes, crcs, verify="every read")
    assert every.verify == "every read"
    for s in (once, every):
        np.testing.assert_array_equal(s.read(0, 3), blobs[0, 3])
    with open(path, "r+b") as f:  # damage two blobs: one already read, one not
        for layer, expert in ((0, 3), (1, 1)):
            f.seek(int(offsets[layer, expert]) + 700)
            b = f.read(1)
            f.seek(int(offsets[layer, expert]) + 700)
            f.write(bytes([b[0] ^ 0x01]))
    for s in (once, every):
        s.drop_page_cache()  # buffered fallback reads must see the new bytes too
        with pytest.raises(errors.CorruptExpertError, match="expert 1 of layer 1 failed its checksum"):
            s.read(1, 1)  # never read before: checked by both
    for s in (once, every):  # checked once already, but the file changed since
        with pytest.raises(errors.CorruptExpertError, match="expert 3 of layer 0 failed its checksum"):
            s.read(0, 3)
    with pytest.raises(ValueError, match="verify must be True, False, 'first read', 'every read' or 'never'"):
        _core.ExpertStore(path, offsets, sizes, crcs, verify="sometimes")


def test_blob_with_a_wrong_header_is_corrupt(experts):
    path, offsets, sizes, crcs, blobs = experts
    swapped_offsets = offsets.copy()
    swapped_offsets[0, 0], swapped_offsets[0, 1] = offsets[0, 1], offsets[0, 0]
    swapped_crcs = crcs.copy()
    swapped_crcs[0, 0], swapped_crcs[0, 1] = crcs[0, 1], crcs[0, 0]
    store = _core.ExpertStore(path, swapped_offsets, sizes, swapped_crcs)  # bf16 experts: same size
    with pytest.raises(errors.CorruptExpertError, match="expert 0 of layer 0"):
        store.read(0, 0)


def test_blob_that_does_not_parse_is_corrupt_when_unchecked(experts):
    """With checksums off, a damaged matrix header reaches the layer: it is still named."""
    path, offsets, sizes, crcs, blobs = experts
    with open(path, "r+b") as f:  # expert 2 of layer 1: its gate matrix's kind byte
        f.seek(int(offsets[1, 2]) + int.from_bytes(blobs[1, 2][16:20].tobytes(), "little") + 8)
        f.write(bytes([0xF0]))
    store = _core.ExpertStore(path, offsets, sizes, crcs, verify=False)
    cache = _core.ExpertCache(store, 0, io_threads=0)
    x, w = np.ones((1, H), np.float32), np.ones((1, 1), np.float32)
    with pytest.raises(
        errors.CorruptExpertError, match=r"expert 2 of layer 1 in .*\(unknown QMatrix kind 240\).*convert"
    ):
        _core.moe_forward(cache, 1, x, np.array([[2]], np.int32), w)
    _core.moe_forward(cache, 1, x, np.array([[1]], np.int32), w)  # the others still serve


def test_matrix_sizes_that_overflow_are_refused():
    # f32 [2^31, 2^31]: rows * row_bytes is 2^64, 0 in 64-bit arithmetic
    header = np.array([1 << 31, 1 << 31, 32 << 8, 0, 64, 0, 0, 128], "<u4").view(np.uint8)
    buf = np.concatenate([header, np.zeros(96, np.uint8)])
    with pytest.raises(ValueError, match="overruns its 128 bytes"):
        _core.qmatrix_matmul(np.zeros((1, 4), np.float32), buf)


def test_truncated_file_is_refused_at_construction(experts):
    path, offsets, sizes, crcs, blobs = experts
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(errors.ModelDirectoryError, match="expert 3 of layer 1 .*truncated, convert the model again"):
        _core.ExpertStore(path, offsets, sizes, crcs)
    with pytest.raises(errors.ModelDirectoryError, match="cannot open"):
        _core.ExpertStore(path + ".missing", offsets, sizes, crcs)
    with pytest.raises(errors.ModelDirectoryError, match="truncated"):
        os.truncate(path, 100)
        _core.ExpertStore(path, offsets, sizes, crcs)


def test_cache_evicts_lru_under_a_two_blob_budget(experts):
    path, offsets, sizes, crcs, blobs = experts
    store = _core.ExpertStore(path, offsets, sizes, crcs)
    page = lambda n: (int(n) + 4095) // 4096 * 4096
    # layer 0 experts are bf16 and all the same size
    budget = 2 * page(sizes[0, 0])
    cache = _core.ExpertCache(store, budget)
    assert cache.budget_bytes == budget
    x = np.random.default_rng(5).standard_normal((1, H)).astype(np.float32)
    w = np.ones((1, 1), np.float32)
    run = lambda e: _core.moe_forward(cache, 0, x, np.array([[e]], np.int32), w)
    for e in (0, 1, 0, 2, 1):  # 0 miss, 1 miss, 0 hit, 2 miss (evicts 1), 1 miss (evicts 0)
        run(e)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["loads"], s["evictions"]) == (1, 4, 4, 2)
    assert s["bytes_read"] == 4 * int(sizes[0, 0])
    assert s["resident_bytes"] == budget == cache.resident_bytes == s["peak_resident_bytes"]
    assert s["direct_io"] == 1.0 and s["read_seconds"] > 0
    # counts and bytes cross as ints, durations as floats, per layer as in the totals
    for d in [s, *cache.layer_stats()]:
        assert all(
            type(v) is (float if k.endswith("_seconds") else bool if k == "direct_io" else int) for k, v in d.items()
        ), d
    assert [cache.contains(0, e) for e in range(E)] == [False, True, True, False]
    cache.reset_stats()
    assert cache.stats()["hits"] == 0 and cache.stats()["resident_bytes"] == budget
    cache.clear()
    assert cache.resident_bytes == 0 and not cache.contains(0, 2)
    assert cache.load(0, 3) and not cache.load(0, 3)
    assert cache.contains(0, 3)


def test_moe_forward_matches_reference(experts):
    path, offsets, sizes, crcs, blobs = experts
    cache = _core.ExpertCache(_core.ExpertStore(path, offsets, sizes, crcs))
    rng = np.random.default_rng(7)
    T, K = 9, 2
    for layer in range(L):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
        weights = rng.random((T, K)).astype(np.float32)
        ref = np.zeros((T, H), np.float32)
        for t in range(T):
            for k in range(K):
                ref[t] += weights[t, k] * reference.expert_forward(x[t : t + 1], blobs[layer, ids[t, k]])[0]
        y = _core.moe_forward(cache, layer, x, ids, weights)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # int64 ids work too (converted)
        np.testing.assert_array_equal(_core.moe_forward(cache, layer, x, ids.astype(np.int64), weights), y)
    assert cache.stats()["misses"] == cache.stats()["loads"] <= L * E  # each expert read once


@pytest.mark.parametrize("T", [1, 5, 16])
def test_moe_forward_is_its_slots_combined(experts, T):
    """moe_forward == combine_slots(moe_forward_slots(...)) bit for bit, whole or with the slots
    split in two by a mask; each expert's slots are expert_forward of its rows in slot order
    (what a device computing some experts elsewhere returns)."""
    path, offsets, sizes, crcs, blobs = experts
    cache = _core.ExpertCache(_core.ExpertStore(path, offsets, sizes, crcs), int(sizes.max()) * 3)  # experts stream
    rng = np.random.default_rng(T)
    K = 2
    for layer in range(L):
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
        weights = rng.random((T, K)).astype(np.float32)
        y = _core.moe_forward(cache, layer, x, ids, weights)
        ys = _core.moe_forward_slots(cache, layer, x, ids, weights=weights)
        assert ys.shape == (T, K, H) and ys.dtype == np.float32
        np.testing.assert_array_equal(_core.combine_slots(ys, weights), y)

        remote = np.isin(ids, [1, 2])  # the slots of experts 1 and 2, computed "elsewhere"
        split = _core.moe_forward_slots(cache, layer, x, ids, mask=~remote)
        assert not split[remote].any()  # masked-out slots stay zero
        for e in (1, 2):
            rows = np.flatnonzero(ids.reshape(-1) == e)  # slot indices t * K + k, in slot order
            if rows.size:
                split.reshape(T * K, H)[rows] = _core.expert_forward(x[rows // K], blobs[layer, e])
        np.testing.assert_array_equal(_core.combine_slots(split, weights), y)


def test_slot_arguments_are_checked(experts):
    path, offsets, sizes, crcs, blobs = experts
    cache = _core.ExpertCache(_core.ExpertStore(path, offsets, sizes, crcs))
    x = np.zeros((2, H), np.float32)
    ids = np.array([[0, 1], [2, 3]], np.int32)
    with pytest.raises(ValueError, match="mask must be"):
        _core.moe_forward_slots(cache, 0, x, ids, mask=np.ones((2, 1), bool))
    with pytest.raises(ValueError, match="weights must be"):
        _core.moe_forward_slots(cache, 0, x, ids, weights=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="out of range"):  # checked even when masked out
        _core.moe_forward_slots(cache, 0, x, np.array([[0, E], [2, 3]]), mask=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="weights must be"):
        _core.combine_slots(np.zeros((2, 2, H), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="ys must be"):
        _core.combine_slots(np.zeros((2, H), np.float32), np.ones((2, 2), np.float32))
    assert cache.stats()["loads"] == 0


def test_budget_below_one_blob_is_a_budget_error(experts):
    path, offsets, sizes, crcs, blobs = experts
    cache = _core.ExpertCache(_core.ExpertStore(path, offsets, sizes, crcs), 4096)
    x = np.zeros((1, H), np.float32)
    with pytest.raises(errors.BudgetError, match="4096 bytes cannot hold expert 1 of layer 0"):
        _core.moe_forward(cache, 0, x, np.array([[1]], np.int32), np.ones((1, 1), np.float32))
    assert cache.resident_bytes == 0


def test_bad_ids_and_shapes_are_value_errors(experts):
    path, offsets, sizes, crcs, blobs = experts
    cache = _core.ExpertCache(_core.ExpertStore(path, offsets, sizes, crcs))
    x = np.zeros((2, H), np.float32)
    w = np.ones((2, 1), np.float32)
    for bad in ([[E], [0]], [[-1], [0]]):
        with pytest.raises(ValueError, match="out of range"):
            _core.moe_forward(cache, 0, x, np.array(bad, np.int32), w)
    with pytest.raises(ValueError):
        _core.moe_forward(cache, L, x, np.zeros((2, 1), np.int32), w)
    with pytest.raises(ValueError):
        _core.moe_forward(cache, 0, x, np.zeros((3, 1), np.int32), w)
    # an expert whose hidden size is not the model's: a damaged file, as the model sees it
    with pytest.raises(errors.CorruptExpertError, match="hidden size"):
        _core.moe_forward(cache, 0, np.zeros((2, H + 1), np.float32), np.zeros((2, 1), np.int32), w)
    with pytest.raises(ValueError):
        cache.contains(0, E)
    assert cache.stats()["loads"] <= 1
