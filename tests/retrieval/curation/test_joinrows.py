"""The join's rows (retrieval.curation.joinrows): the int8 copy's bound, and the edges it must not change."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.curation import joinrows, partition
from retrieval.curation.graph import brute_force_edges
from retrieval.curation.joinrows import Int8Rows, StoredRows, join_rows, quantize, rounded_down
from retrieval.curation.partition import partition_edges


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _spiky(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors with one heavy dimension (as some embedders have): a large int8 scale, so a coarse
    grid for every other dimension: the hardest case for a per-row absmax copy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, 0] += 6.0 * np.sign(rng.normal(size=n))
    return _unit(x)


@pytest.mark.parametrize("make", [lambda: _unit(np.random.default_rng(1).normal(size=(600, 64))),
                                  lambda: _spiky(600, 64, 2)])
def test_int8_products_stay_within_the_bound(make) -> None:
    """Every product of the copy is within `bound` of the stored vectors' (all pairs, exactly)."""
    x = make()
    x[7] = 0.0  # a zero row: scale 1, q 0, no division by zero
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    pos = {int(i): r for r, i in enumerate(ids)}
    rows = Int8Rows(ids, lambda q: x[[pos[int(i)] for i in q]])
    every = np.arange(len(x))
    approx = rows.rows(every).astype(np.float64) * rows.scales(every)[:, None].astype(np.float64)
    np.testing.assert_array_equal(rows.columns(every), rows.rows(every).astype(np.float32) * rows.scales(every)[:, None])
    err = np.abs(x.astype(np.float64) @ x.T.astype(np.float64) - approx @ approx.T)
    assert err.max() <= rows.bound
    assert rows.bound < 0.2 and err.max() > rows.bound / 20  # a bound, and not a vacuous one
    assert rows.q.dtype == np.int8 and np.abs(rows.q).max() <= 127 and not rows.q[7].any()


def test_quantize_reports_its_error_and_norm() -> None:
    x = _unit(np.random.default_rng(3).normal(size=(50, 16)))
    q, scale, error, norm = quantize(x)
    approx = q.astype(np.float32) * scale[:, None]
    assert np.isclose(error, np.linalg.norm(approx - x, axis=1).max(), rtol=1e-5)
    assert np.isclose(norm, np.linalg.norm(approx, axis=1).max(), rtol=1e-5)
    assert (np.abs(q).max(axis=1) == 127).all()  # absmax: each row's largest entry on the grid's end


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_thresholds_round_down_onto_the_grid(dtype: str) -> None:
    want = np.random.default_rng(4).uniform(-3, 900, 500)
    got = rounded_down(want, dtype)
    assert str(got.dtype) == f"torch.{dtype}"
    assert (got.double().numpy() <= want).all()
    assert (got.double().numpy() > want - np.abs(want) * 2**-7 - 1e-30).all()


@pytest.mark.parametrize("products", ["float32", "bfloat16"])
def test_spiky_vectors_near_the_threshold_give_brute_force_edges(monkeypatch: pytest.MonkeyPatch,
                                                                products: str) -> None:
    """Pairs planted within +-0.002 of the threshold among vectors with a heavy dimension: the int8 copy
    filters with its bound, the pairs are decided in float32, so the edges are brute force's."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    monkeypatch.setattr(partition, "PRODUCTS", products)
    monkeypatch.setattr(joinrows, "ROWS", "int8")
    rng = np.random.default_rng(6)
    n, dim, t = 2400, 48, 0.97
    x = _spiky(n, dim, 7)
    for a in range(0, 400, 2):  # b = cos * a + sin * (a unit vector orthogonal to a)
        c = t + rng.uniform(-0.002, 0.002)
        o = rng.normal(size=dim).astype(np.float32)
        o -= (o @ x[a]) * x[a]
        o /= np.linalg.norm(o)
        x[a + 1] = c * x[a] + np.sqrt(1 - c * c) * o
    ids = np.arange(n, dtype=np.int64)
    stats: dict = {}
    got = partition_edges(ids, lambda q: x[np.asarray(q)], 8, t, stats=stats)
    want = brute_force_edges(ids, x, t, k=8)
    assert stats["join_rows"] == "int8" and stats["join_rows_bound"] > 0.01
    assert 50 < len(want) and set(zip(got.src.tolist(), got.dst.tolist())) == set(zip(want.src.tolist(), want.dst.tolist()))
    np.testing.assert_allclose(got.sim, want.sim, atol=1e-6)


def test_auto_reads_the_stored_vectors_when_the_copy_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _unit(np.random.default_rng(8).normal(size=(100, 32)))
    ids = np.arange(100, dtype=np.int64)
    read = lambda q: x[np.asarray(q)]  # noqa: E731
    assert isinstance(join_rows(ids, read), Int8Rows)
    monkeypatch.setattr(joinrows, "RESIDENT_BYTES", 100 * 32 - 1)
    stored = join_rows(ids, read)
    assert isinstance(stored, StoredRows) and stored.bound == 0.0
    np.testing.assert_array_equal(stored.rows(np.array([3, 1])), x[[3, 1]])
    monkeypatch.setattr(joinrows, "ROWS", "float8")
    with pytest.raises(ValueError, match="ROWS"):
        join_rows(ids, read)
