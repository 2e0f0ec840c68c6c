"""VectorStore: the fp16 flat file where row i holds the vector of image id i.

Every read is compared with the float32 array that was written (fp16 tolerance), never with
another read of the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.vectors import DTYPE, VectorStore, check_matrix

DIM = 24
# fp16 has an 11-bit significand: relative error <= 2**-11 for values in the normal range.
FP16_ATOL = 1e-3


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path: Path) -> VectorStore:
    return VectorStore(tmp_path / "idx" / "vectors.f16", DIM)


def test_round_trip_within_fp16_tolerance(store: VectorStore) -> None:
    x = unit_vectors(50)
    store.write(np.arange(50), x)
    got = store.read(np.arange(50))
    assert got.dtype == np.float32 and got.shape == (50, DIM)
    np.testing.assert_allclose(got, x, atol=FP16_ATOL, rtol=0)
    # Exactly what an fp16 conversion gives: nothing else is done to the values.
    np.testing.assert_array_equal(got, x.astype(DTYPE).astype(np.float32))
    assert store.path.stat().st_size == 50 * DIM * np.dtype(DTYPE).itemsize


def test_read_order_follows_the_requested_ids(store: VectorStore) -> None:
    x = unit_vectors(10, seed=1)
    store.write(np.arange(10), x)
    order = np.array([7, 2, 2, 9, 0])
    np.testing.assert_allclose(store.read(order), x[order], atol=FP16_ATOL, rtol=0)
    np.testing.assert_allclose(store.read([3]), x[[3]], atol=FP16_ATOL, rtol=0)


def test_non_contiguous_ids_in_several_runs(store: VectorStore) -> None:
    rng = np.random.default_rng(2)
    ids = rng.choice(500, size=120, replace=False)  # unsorted, with gaps
    x = unit_vectors(120, seed=3)
    for part in np.array_split(np.arange(120), 4):  # four separate writes, each unsorted
        store.write(ids[part], x[part])
    assert store.n_rows == ids.max() + 1
    np.testing.assert_allclose(store.read(ids), x, atol=FP16_ATOL, rtol=0)
    gaps = np.setdiff1d(np.arange(ids.max() + 1), ids)
    assert len(gaps) > 0
    np.testing.assert_array_equal(store.read(gaps), 0.0)  # never-written rows are zero


def test_overwrite_replaces_only_that_row(store: VectorStore) -> None:
    x = unit_vectors(8, seed=4)
    store.write(np.arange(8), x)
    store.read(np.arange(8))  # map the file before overwriting: the map must not serve stale rows
    new = unit_vectors(1, seed=5)
    store.write(np.array([3]), new)
    expected = x.copy()
    expected[3] = new[0]
    np.testing.assert_allclose(store.read(np.arange(8)), expected, atol=FP16_ATOL, rtol=0)
    assert store.n_rows == 8
    # A fresh instance over the same file sees the same thing.
    np.testing.assert_allclose(VectorStore(store.path, DIM).read(np.arange(8)), expected, atol=FP16_ATOL, rtol=0)


def test_n_rows_grows_and_reads_see_new_rows(store: VectorStore) -> None:
    assert store.n_rows == 0
    a = unit_vectors(5, seed=6)
    store.write(np.arange(5), a)
    assert store.n_rows == 5
    store.read([4])  # mapped at 5 rows
    b = unit_vectors(3, seed=7)
    store.write(np.array([20, 21, 22]), b)
    assert store.n_rows == 23
    np.testing.assert_allclose(store.read([22, 0]), np.stack([b[2], a[0]]), atol=FP16_ATOL, rtol=0)


def test_reads_outside_the_file_raise_key_error(store: VectorStore) -> None:
    with pytest.raises(KeyError):
        store.read([0])  # empty store
    store.write(np.arange(4), unit_vectors(4))
    with pytest.raises(KeyError):
        store.read([4])
    with pytest.raises(KeyError):
        store.read([1, 1000])
    with pytest.raises(KeyError):
        store.read([-1])
    assert store.read(np.array([], dtype=np.int64)).shape == (0, DIM)


def test_write_contract_errors(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="2-D"):
        store.write(np.array([0]), np.zeros(DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension"):
        store.write(np.array([0]), np.zeros((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError):
        store.write(np.array([0, 1]), np.zeros((1, DIM), dtype=np.float32))  # id/vector count mismatch
    with pytest.raises(ValueError):
        store.write(np.array([-1]), np.zeros((1, DIM), dtype=np.float32))
    store.write(np.array([], dtype=np.int64), np.zeros((0, DIM), dtype=np.float32))  # no-op
    assert store.n_rows == 0
    with pytest.raises(ValueError):
        VectorStore(store.path, 0)


def test_float64_input_is_accepted_and_converted(store: VectorStore) -> None:
    x64 = unit_vectors(6, seed=8).astype(np.float64)
    store.write(np.arange(6), x64)
    got = store.read(np.arange(6))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x64, atol=FP16_ATOL, rtol=0)


def test_check_matrix_contract() -> None:
    with pytest.raises(ValueError, match="2-D"):
        check_matrix(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        check_matrix([[1.0, 2.0]])  # a list is not an array
    with pytest.raises(ValueError, match="dimension 3, expected 4"):
        check_matrix(np.zeros((2, 3), dtype=np.float32), 4)
    with pytest.raises(ValueError, match="queries"):
        check_matrix(np.zeros((2, 3)), 4, name="queries")
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    view = x[:, ::2]  # not contiguous, float64
    out = check_matrix(view, 3)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, view.astype(np.float32))
    fortran = np.asfortranarray(unit_vectors(5))
    assert check_matrix(fortran).flags.c_contiguous


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_iter_batches_covers_all_ids_in_order(store: VectorStore, batch: int) -> None:
    x = unit_vectors(100, seed=9)
    store.write(np.arange(100), x)
    ids = np.random.default_rng(10).permutation(100)[:61]
    seen_ids, seen = [], []
    for chunk_ids, chunk in store.iter_batches(ids, batch=batch):
        assert len(chunk_ids) <= batch and chunk.shape == (len(chunk_ids), DIM)
        seen_ids.append(chunk_ids)
        seen.append(chunk)
    np.testing.assert_array_equal(np.concatenate(seen_ids), ids)
    np.testing.assert_allclose(np.concatenate(seen), x[ids], atol=FP16_ATOL, rtol=0)
    assert list(store.iter_batches(np.array([], dtype=np.int64))) == []


def test_truncate_drops_rows(store: VectorStore) -> None:
    x = unit_vectors(10, seed=11)
    store.write(np.arange(10), x)
    store.read([9])
    store.truncate(4)
    assert store.n_rows == 4
    with pytest.raises(KeyError):
        store.read([5])
    np.testing.assert_allclose(store.read(np.arange(4)), x[:4], atol=FP16_ATOL, rtol=0)


# --- the .npy format and the upgrade of headerless vectors.f16 files --------------------------------

def test_npy_store_opens_without_knowing_the_dimension(tmp_path: Path) -> None:
    path = tmp_path / "vectors.npy"
    x = unit_vectors(30)
    VectorStore(path, DIM).write(np.arange(5, 35), x)
    loaded = np.load(path, mmap_mode="r")  # plain numpy, no dimension given
    assert loaded.shape == (35, DIM) and loaded.dtype == DTYPE
    np.testing.assert_array_equal(np.asarray(loaded[5:35]), x.astype(DTYPE))
    reopened = VectorStore(path)  # the dimension comes from the header
    assert reopened.dim == DIM and reopened.n_rows == 35
    with pytest.raises(ValueError, match="holds 24-d"):
        VectorStore(path, DIM + 1)


def test_npy_header_grows_in_place_and_truncates(tmp_path: Path) -> None:
    from retrieval.vectors import HEADER_BYTES

    store = VectorStore(tmp_path / "v.npy", DIM)
    store.write(np.arange(3), unit_vectors(3))
    store.write(np.array([10**6]), unit_vectors(1, seed=4))  # a 7-digit row count in the same header
    assert store.n_rows == 10**6 + 1
    assert store.path.stat().st_size == HEADER_BYTES + (10**6 + 1) * DIM * 2
    store.truncate(2)
    assert store.n_rows == 2 and np.load(store.path).shape == (2, DIM)


def test_rows_written_but_not_announced_are_invisible(tmp_path: Path) -> None:
    """A kill between the row write and the header update: the header still says the old count."""
    from retrieval.vectors import npy_header

    store = VectorStore(tmp_path / "v.npy", DIM)
    store.write(np.arange(4), unit_vectors(4))
    with open(store.path, "r+b") as f:  # simulate: rows 4..5 written, header not yet rewritten
        f.seek(0, 2)
        f.write(unit_vectors(2, seed=9).astype(DTYPE).tobytes())
        f.seek(0)
        assert f.read(len(npy_header(4, DIM))) == npy_header(4, DIM)
    assert VectorStore(store.path).n_rows == 4 and np.load(store.path).shape == (4, DIM)


def _legacy_file(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(x.astype(DTYPE).tobytes())


def test_legacy_file_is_read_until_the_first_write_converts_it(tmp_path: Path) -> None:
    legacy, target = tmp_path / "vectors.f16", tmp_path / "vectors.npy"
    x = unit_vectors(12)
    _legacy_file(legacy, x)
    store = VectorStore(target, DIM, legacy=legacy)
    assert store.n_rows == 12 and not target.exists()
    np.testing.assert_array_equal(store.read(np.arange(12)), x.astype(DTYPE).astype(np.float32))
    store.write(np.array([12]), unit_vectors(1, seed=5))
    assert target.exists() and not legacy.exists()
    np.testing.assert_array_equal(np.load(target)[:12], x.astype(DTYPE))
    assert VectorStore(target).n_rows == 13


def test_upgrade_is_crash_safe_at_every_step(tmp_path: Path) -> None:
    from retrieval.vectors import upgrade_legacy

    legacy, target = tmp_path / "vectors.f16", tmp_path / "vectors.npy"
    x = unit_vectors(20)
    _legacy_file(legacy, x)
    # killed while copying: a partial temporary file; the old file is untouched and the next call starts over
    (tmp_path / ".vectors.npy.upgrading").write_bytes(b"\x93NUMPY partial")
    assert upgrade_legacy(legacy, target, DIM)
    np.testing.assert_array_equal(np.load(target), x.astype(DTYPE))
    assert not legacy.exists() and not (tmp_path / ".vectors.npy.upgrading").exists()
    # killed after the rename, before the old file was deleted: the next call only deletes it
    _legacy_file(legacy, unit_vectors(3, seed=7))
    assert not upgrade_legacy(legacy, target, DIM)
    assert not legacy.exists()
    np.testing.assert_array_equal(np.load(target), x.astype(DTYPE))
    # a trailing partial row of the old format (a kill mid-write) is dropped
    legacy2, target2 = tmp_path / "b.f16", tmp_path / "b.npy"
    legacy2.write_bytes(x.astype(DTYPE).tobytes() + b"\x01\x02\x03")
    upgrade_legacy(legacy2, target2, DIM)
    assert np.load(target2).shape == (20, DIM)


def test_bounded_reader_keeps_the_mapped_file_out_of_rss(tmp_path) -> None:
    """Scattered reads over a 51 MB file: plain reads leave most of it resident in this process, a
    BoundedReader unmaps it whenever its pages pass the budget; both return the same rows."""
    import os

    from retrieval.vectors import BoundedReader, _file_rss_bytes

    if _file_rss_bytes() is None:
        pytest.skip("needs /proc/self/statm")
    n, dim = 100_000, 256
    store = VectorStore(tmp_path / "v.npy", dim)
    rng = np.random.default_rng(0)
    for start in range(0, n, 25_000):
        store.write(np.arange(start, start + 25_000), rng.normal(size=(25_000, dim)).astype(np.float32))
    fd = os.open(tmp_path / "v.npy", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # in the page cache: faults map pages, no disk reads
    os.close(fd)
    order = [np.sort(rng.choice(n, 200, replace=False)) for _ in range(300)]

    def grown(make_read) -> tuple[int, list[np.ndarray]]:
        store.release()
        read = make_read()
        base = _file_rss_bytes()
        peak, outs = 0, []
        for ids in order:
            outs.append(read(ids))
            peak = max(peak, _file_rss_bytes() - base)
        return peak, outs

    plain_peak, plain = grown(lambda: store.read)
    budget = 4 << 20
    bounded_peak, bounded = grown(lambda: BoundedReader(store, budget=budget))
    assert all(np.array_equal(a, b) for a, b in zip(plain, bounded))
    assert plain_peak > 40 << 20  # most of the 51 MB file
    assert bounded_peak <= budget
    # a long read goes in pieces: the same rows, and the file is released along the way
    many = np.sort(rng.choice(n, 5000, replace=False))
    store.release()
    assert np.array_equal(BoundedReader(store, budget=budget)(many), store.read(many))
