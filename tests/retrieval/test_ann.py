"""retrieval.ann against a brute-force numpy oracle, in the style of faiss/contrib tests.

All data is seeded synthetic: clustered unit vectors (Gaussian noise around random centres), so
neighbourhoods are structured like real embeddings and similarities are continuous (no ties).
Every approximate path is compared with `brute_force` below, which shares no code with the library.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pytest

from retrieval import ann
from retrieval.errors import RetrievalError

K = 10
GB = 10**9


# --- data and oracle ------------------------------------------------------------------------------
def clustered(n: int, dim: int, seed: int = 0, draw: int = 0, n_centres: int = 200, noise: float = 1.0) -> np.ndarray:
    """n unit vectors around `n_centres` centres. Same seed = same centres; `draw` picks fresh points."""
    centres = np.random.default_rng([seed, 0]).standard_normal((n_centres, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1 + draw])
    x = centres[rng.integers(0, n_centres, n)] + noise * rng.standard_normal((n, dim)) / math.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def big_unique_ids(n: int, seed: int = 0) -> np.ndarray:
    """Sorted unique ids far from 0..n-1, so a position/id mix-up cannot go unnoticed."""
    rng = np.random.default_rng([seed, 99])
    return np.sort(rng.choice(10**12, size=n, replace=False)).astype(np.int64) + 10**9


def brute_force(queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int,
                exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores, ids), in float64."""
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    if exclude is not None:
        sims[exclude[:, None] == base_ids[None, :]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), base_ids[order]


def oracle_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def reader(ids: np.ndarray, vectors: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """read_vectors for search_reranked: ids (sorted) -> rows of `vectors`; unknown ids fail loudly."""
    def read(query_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(ids, query_ids)
        assert np.all(pos < len(ids)) and np.array_equal(ids[np.minimum(pos, len(ids) - 1)], query_ids), \
            "search_reranked asked for ids that were never added"
        return vectors[pos]
    return read


def batches(ids: np.ndarray, vectors: np.ndarray, size: int):
    for start in range(0, len(ids), size):
        yield ids[start : start + size], vectors[start : start + size]


def without_polysemous_training(index):
    """Test-speed only: polysemous training costs seconds per PQ sub-quantizer and is never used
    by inner-product search (see test_new_index_skips_polysemous_training)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    return index


def copy_index(index):
    return faiss.deserialize_index(faiss.serialize_index(index))


# --- choose_index_spec ----------------------------------------------------------------------------
def test_flat_below_threshold_ivfpq_above() -> None:
    below = ann.choose_index_spec(49_999, 64, 4 * GB, exact_threshold=50_000)
    assert below.kind == "flat" and below.factory == "IDMap2,Flat"
    assert below.nlist is None and below.pq_m is None
    above = ann.choose_index_spec(50_000, 64, 4 * GB, exact_threshold=50_000)
    assert above.kind == "ivfpq"
    assert above.n == 50_000 and above.dim == 64


@pytest.mark.parametrize("n", [1_000, 2_500, 5_000, 20_000, 100_000, 1_000_000, 10**8, 10**10])
def test_nlist_rule(n: int) -> None:
    spec = ann.choose_index_spec(n, 384, 10**15, exact_threshold=1)
    nlist = spec.nlist
    assert spec.kind == "ivfpq" and nlist is not None
    assert nlist & (nlist - 1) == 0, "nlist must be a power of two"
    assert n / nlist >= ann.MIN_POINTS_PER_LIST == 39
    assert 16 <= nlist <= 65_536
    target = 4 * math.sqrt(n)
    assert nlist <= 2 ** math.ceil(math.log2(target))  # never more lists than ~4*sqrt(n)
    if n >= 39 * 2 * target and target < 65_536:  # the 39-points rule does not bind: ~4*sqrt(n)
        assert target / math.sqrt(2) <= nlist <= target * math.sqrt(2)
    else:  # the largest power of two that leaves 39 points per list (or the cap)
        assert nlist == 65_536 or n / (2 * nlist) < 39 or nlist * 2 > target * math.sqrt(2)
    assert f"IVF{nlist}" in spec.factory


@pytest.mark.parametrize("dim", [32, 64, 384, 768, 1024])
def test_pq_m_divides_dim_and_fits_budget(dim: int) -> None:
    n, budget = 200_000, 4 * GB
    spec = ann.choose_index_spec(n, dim, budget, exact_threshold=50_000)
    m = spec.pq_m
    assert m is not None and dim % m == 0 and 4 <= m <= dim // 4
    assert spec.factory.startswith("IVF") and spec.factory.endswith(f",PQ{m}")
    assert 0 < spec.estimated_bytes <= budget
    assert spec.estimated_bytes >= n * m  # at least the codes themselves are counted


def test_smaller_budget_gives_smaller_or_equal_codes() -> None:
    n, dim = 1_000_000, 384
    budgets = [int(b) for b in np.geomspace(100 * GB, 0.01 * GB, 40)]
    ms = []
    for budget in budgets:
        try:
            spec = ann.choose_index_spec(n, dim, budget, exact_threshold=50_000)
        except RetrievalError as e:
            assert "--memory-budget" in str(e)
            ms.append(0)
            continue
        assert spec.estimated_bytes <= budget
        ms.append(spec.pq_m)
    assert ms == sorted(ms, reverse=True), ms
    assert ms[0] == dim // 4  # a generous budget buys the d/4 cap, not more
    assert len(set(m for m in ms if m)) >= 3  # the budget really steers the choice
    assert ms[-1] == 0  # and the smallest one is refused


def test_budget_too_small_raises_with_flag_name() -> None:
    with pytest.raises(RetrievalError, match="--memory-budget"):
        ann.choose_index_spec(10_000_000, 768, 10_000_000, exact_threshold=50_000)


def test_budget_error_states_the_real_minimum() -> None:
    """The 'at least X GB' in the error must be the budget that actually suffices (smallest PQ code)."""
    n, dim = 10**8, 768
    roomy = ann.choose_index_spec(n, dim, 10**15, exact_threshold=50_000)
    fixed = roomy.estimated_bytes - n * roomy.pq_m
    smallest_m = min(m for m in range(4, dim // 4 + 1) if dim % m == 0)
    minimum = fixed + n * smallest_m
    assert ann.choose_index_spec(n, dim, minimum, exact_threshold=50_000).pq_m == smallest_m
    with pytest.raises(RetrievalError) as err:
        ann.choose_index_spec(n, dim, minimum - 1, exact_threshold=50_000)
    stated = float(re.search(r"at least ([0-9.]+) GB", str(err.value)).group(1))
    assert stated == pytest.approx(minimum / GB, abs=0.006), str(err.value)


def test_dimension_without_pq_divisor_is_not_blamed_on_the_budget() -> None:
    """dim=34 has no divisor in [4, 8]: no budget can fix that, so the error must not say it can."""
    try:
        spec = ann.choose_index_spec(100_000, 34, 10**15, exact_threshold=1_000)
    except RetrievalError as e:
        assert "--memory-budget" not in str(e), f"misleading error for an unlimited budget: {e}"
    else:
        assert spec.kind in ("ivfpq", "flat", "custom")


def test_no_vectors_raises() -> None:
    with pytest.raises(RetrievalError):
        ann.choose_index_spec(0, 64, 4 * GB, exact_threshold=10)
    with pytest.raises(RetrievalError):
        ann.choose_index_spec(-3, 64, 4 * GB, exact_threshold=10)


def test_factory_override_is_custom() -> None:
    spec = ann.choose_index_spec(10, 64, 1, exact_threshold=5, factory="IVF64,Flat")  # budget ignored
    assert spec.kind == "custom" and spec.factory == "IVF64,Flat" and spec.n == 10 and spec.dim == 64
    assert ann.IndexSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("n", [200, 1_000])  # PQ needs >= 256 training points
def test_chosen_index_trains_on_small_corpora(n: int) -> None:
    """Whatever is chosen for a small corpus with a tiny exact_threshold must train on n vectors."""
    x = clustered(n, 32, seed=5)
    spec = ann.choose_index_spec(n, 32, 4 * GB, exact_threshold=1)
    index = without_polysemous_training(ann.new_index(spec))
    index.train(x)
    ids = big_unique_ids(n, seed=5)
    ann.add(index, ids, x)
    np.testing.assert_array_equal(ann.index_ids(index), ids)


def test_new_index_skips_polysemous_training() -> None:
    """Polysemous training (on by default from index_factory) only serves Hamming-thresholded search,
    which inner-product search never uses; it costs seconds per PQ sub-quantizer at every build."""
    spec = ann.choose_index_spec(100_000, 384, 4 * GB, exact_threshold=50_000)
    index = ann.new_index(spec)  # keep a reference: the extracted IVF does not own it
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert not ivf.do_polysemous_training
    # the PQ codebooks train on a capped sample (FAISS's 256 points x 25 iterations made builds minutes long)
    assert ivf.pq.cp.max_points_per_centroid == ann.PQ_TRAIN_POINTS_PER_CENTROID
    assert ivf.pq.cp.niter == ann.PQ_TRAIN_ITERATIONS


# --- exact_knn and recall_at_k -------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 5_000])  # 5,000 similarities at once: several query groups
@pytest.mark.parametrize("batch", [7, 64, 1_000, 5_000])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_exact_knn_matches_numpy(batch: int, use_exclude: bool, chunk: int | None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:
        monkeypatch.setattr(ann, "KNN_CHUNK_ELEMENTS", chunk)
    n, d = 1_000, 32
    x = clustered(n, d, seed=1)
    ids = big_unique_ids(n, seed=1)
    q_pos = np.random.default_rng(1).choice(n, 40, replace=False)
    queries = x[q_pos]
    exclude = ids[q_pos] if use_exclude else None
    got = ann.exact_knn(queries, batches(ids, x, batch), K, exclude=exclude)
    want_scores, want = brute_force(queries, x, ids, K, exclude)
    assert got.shape == (40, K)
    for g, w in zip(got, want):
        assert set(g.tolist()) == set(w.tolist())
    if use_exclude:
        assert not np.any(got == ids[q_pos][:, None])
    else:
        np.testing.assert_array_equal(got[:, 0], ids[q_pos])  # a stored vector is its own nearest
    # scores of what was found equal the oracle's, rank by rank
    found_scores = np.einsum("qd,qkd->qk", queries.astype(np.float64), x[np.searchsorted(ids, got)].astype(np.float64))
    np.testing.assert_allclose(found_scores, want_scores, atol=1e-5)


def test_exact_knn_fewer_vectors_than_k_pads_with_minus_one() -> None:
    x = clustered(5, 16, seed=2)
    ids = np.array([3, 8, 20, 21, 400], dtype=np.int64)
    got = ann.exact_knn(x[:2], batches(ids, x, 2), K, exclude=ids[:2])
    assert got.shape == (2, K)
    for row, own in zip(got, ids[:2]):
        real = row[row >= 0]
        assert sorted(real.tolist()) == sorted(set(ids.tolist()) - {int(own)})
        assert np.all(row[len(real):] == -1)


def test_recall_at_k() -> None:
    t = np.array([[1, 2, 3], [4, 5, 6]])
    assert ann.recall_at_k(t, t) == 1.0
    assert ann.recall_at_k(t[:, ::-1], t) == 1.0  # order does not matter
    assert ann.recall_at_k(np.array([[7, 8, 9], [10, 11, 12]]), t) == 0.0
    assert ann.recall_at_k(np.array([[1, 9, 9], [4, 5, 0]]), t) == pytest.approx(3 / 6)
    assert ann.recall_at_k(np.array([[-1, -1, -1], [4, -1, -1]]), t) == pytest.approx(1 / 6)
    # -1 padding in the truth is not counted, and -1 never matches -1
    assert ann.recall_at_k(np.array([[1, -1, -1]]), np.array([[1, 2, -1]])) == pytest.approx(1 / 2)
    assert ann.recall_at_k(np.array([[-1, -1]]), np.array([[-1, -1]])) == 1.0


# --- the IVF-PQ path end to end -------------------------------------------------------------------
@dataclass
class Built:
    spec: ann.IndexSpec
    index: object
    ids: np.ndarray
    x: np.ndarray
    read: Callable[[np.ndarray], np.ndarray]
    query_ids: np.ndarray
    truth: np.ndarray
    tuned: dict


N_IVF, D_IVF, TARGET = 4_000, 32, 0.95


@pytest.fixture(scope="module")
def ivfpq() -> Built:
    x = clustered(N_IVF, D_IVF, seed=3)
    ids = big_unique_ids(N_IVF, seed=3)
    spec = ann.choose_index_spec(N_IVF, D_IVF, 4 * GB, exact_threshold=1_000)
    assert spec.kind == "ivfpq" and spec.nlist == 64 and spec.pq_m == 8
    index = without_polysemous_training(ann.new_index(spec))
    assert not index.is_trained
    rng = np.random.default_rng(3)
    query_pos = np.sort(rng.choice(N_IVF, 500, replace=False))
    train_pos = rng.choice(np.setdiff1d(np.arange(N_IVF), query_pos), 2_600, replace=False)  # held-out queries
    index.train(x[train_pos])
    for chunk_ids, chunk in batches(ids, x, 1_000):
        ann.add(index, chunk_ids, chunk)
    read = reader(ids, x)
    query_ids = ids[query_pos]
    truth = ann.exact_knn(read(query_ids), batches(ids, x, 1_024), ann.TUNE_K, exclude=query_ids)
    tuned = ann.tune_nprobe(index, spec, query_ids, truth, read, TARGET)
    return Built(spec, index, ids, x, read, query_ids, truth, tuned)


def test_ivfpq_truth_is_the_oracle(ivfpq: Built) -> None:
    _, want = brute_force(ivfpq.read(ivfpq.query_ids), ivfpq.x, ivfpq.ids, K, exclude=ivfpq.query_ids)
    assert ann.recall_at_k(ivfpq.truth, want) == 1.0


def test_ivfpq_tuned_nprobe_is_smallest_reaching_target(ivfpq: Built) -> None:
    tuned, nlist = ivfpq.tuned, ivfpq.spec.nlist
    curve = tuned["curve"]
    probes = [p for p, _ in curve]
    recalls = [r for _, r in curve]
    assert probes[0] == 1 and all(b == min(2 * a, nlist) for a, b in zip(probes, probes[1:]))
    assert tuned["nprobe"] == probes[-1]
    assert tuned["recall_at_10"] == recalls[-1] >= TARGET
    assert all(r < TARGET for r in recalls[:-1]), "a smaller nprobe already reached the target"
    assert len(curve) >= 3, "data too easy: the curve does not exercise tuning"
    assert all(b >= a - 0.01 for a, b in zip(recalls, recalls[1:])), f"recall falls with nprobe: {curve}"
    assert faiss.extract_index_ivf(ivfpq.index).nprobe == tuned["nprobe"]  # left set on the index
    assert tuned["queries"] == len(ivfpq.query_ids) and tuned["target"] == TARGET


def test_ivfpq_curve_matches_oracle_recall(ivfpq: Built) -> None:
    """Each point of the reported curve, re-measured with the numpy oracle (self excluded)."""
    queries = ivfpq.read(ivfpq.query_ids)
    _, want = brute_force(queries, ivfpq.x, ivfpq.ids, K, exclude=ivfpq.query_ids)
    index = copy_index(ivfpq.index)
    for nprobe, reported in ivfpq.tuned["curve"]:
        _, found = ann.search_reranked(index, queries, K, ivfpq.read, nprobe=nprobe, exclude=ivfpq.query_ids)
        assert oracle_recall(found, want) == pytest.approx(reported, abs=1e-3)


def test_ivfpq_recall_on_fresh_queries(ivfpq: Built) -> None:
    """Queries the tuning never saw (new points from the same distribution) reach the target too."""
    fresh = clustered(400, D_IVF, seed=3, draw=7)
    _, want = brute_force(fresh, ivfpq.x, ivfpq.ids, K)
    index = copy_index(ivfpq.index)
    nprobe = ivfpq.tuned["nprobe"]
    _, found = ann.search_reranked(index, fresh, K, ivfpq.read, nprobe=nprobe)
    assert oracle_recall(found, want) >= TARGET - 0.02
    # and the knob matters: a single probe is clearly worse (so the check above can fail)
    _, found1 = ann.search_reranked(index, fresh, K, ivfpq.read, nprobe=1)
    assert oracle_recall(found1, want) < oracle_recall(found, want) - 0.05


def test_ivfpq_reranked_scores_are_exact_and_ids_stable(ivfpq: Built) -> None:
    queries = clustered(100, D_IVF, seed=3, draw=8)
    index = copy_index(ivfpq.index)
    scores, found = ann.search_reranked(index, queries, K, ivfpq.read, nprobe=ivfpq.tuned["nprobe"])
    assert found.shape == scores.shape == (100, K)
    assert np.all(found >= 0) and np.all(np.isin(found, ivfpq.ids))  # the caller's ids, not positions
    assert all(len(set(row)) == K for row in found.tolist())
    exact = np.einsum("qd,qkd->qk", queries, ivfpq.x[np.searchsorted(ivfpq.ids, found)])
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ivfpq_self_query_and_exclude(ivfpq: Built) -> None:
    index = copy_index(ivfpq.index)
    qids = ivfpq.query_ids[:200]
    queries = ivfpq.read(qids)
    nprobe = ivfpq.tuned["nprobe"]
    _, found = ann.search_reranked(index, queries, K, ivfpq.read, nprobe=nprobe)
    assert np.mean(found[:, 0] == qids) >= 0.99  # id i really holds vector i
    scores, found_ex = ann.search_reranked(index, queries, K, ivfpq.read, nprobe=nprobe, exclude=qids)
    assert not np.any(found_ex == qids[:, None])
    assert np.all(found_ex >= 0)  # excluding one id still fills k results
    # -1 in exclude means "exclude nothing" for that query
    mixed = qids.copy()
    mixed[::2] = -1
    _, found_mixed = ann.search_reranked(index, queries, K, ivfpq.read, nprobe=nprobe, exclude=mixed)
    np.testing.assert_array_equal(found_mixed[::2, 0] == qids[::2], found[::2, 0] == qids[::2])
    assert not np.any(found_mixed[1::2] == qids[1::2, None])


def test_ivfpq_index_ids_and_remove(ivfpq: Built) -> None:
    index = copy_index(ivfpq.index)
    np.testing.assert_array_equal(ann.index_ids(index), ivfpq.ids)
    assert index.ntotal == N_IVF
    gone = np.random.default_rng(4).choice(ivfpq.ids, 300, replace=False)
    assert ann.remove(index, gone) == 300
    assert ann.remove(index, gone) == 0
    assert ann.remove(index, np.array([], dtype=np.int64)) == 0
    assert ann.remove(index, np.array([12345], dtype=np.int64)) == 0  # never added
    np.testing.assert_array_equal(ann.index_ids(index), np.setdiff1d(ivfpq.ids, gone))
    assert index.ntotal == N_IVF - 300
    # removed ids are never returned, even when their own vector is the query
    _, found = ann.search_reranked(index, ivfpq.read(np.sort(gone)[:50]), K, ivfpq.read, nprobe=ivfpq.spec.nlist)
    assert not np.any(np.isin(found, gone))
    # re-adding makes them findable again, once
    ann.add(index, np.sort(gone), ivfpq.read(np.sort(gone)))
    np.testing.assert_array_equal(ann.index_ids(index), ivfpq.ids)


def test_save_and_load_ivfpq(ivfpq: Built, tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    path = folder / "index.faiss"
    ann.save_index(ivfpq.index, path)
    assert os.listdir(folder) == ["index.faiss"]
    queries = clustered(50, D_IVF, seed=3, draw=9)
    nprobe = ivfpq.tuned["nprobe"]
    want_scores, want = ann.search_reranked(copy_index(ivfpq.index), queries, K, ivfpq.read, nprobe=nprobe)
    for mmap in (False, True):
        loaded = ann.load_index(path, mmap=mmap)
        assert loaded.ntotal == N_IVF
        np.testing.assert_array_equal(ann.index_ids(loaded), ivfpq.ids)
        scores, found = ann.search_reranked(loaded, queries, K, ivfpq.read, nprobe=nprobe)
        np.testing.assert_array_equal(found, want)
        np.testing.assert_array_equal(scores, want_scores)


# --- per-call search parameters -------------------------------------------------------------------
def _ivf_flat(n: int = 3_000, d: int = 16, seed: int = 11) -> tuple[object, np.ndarray, np.ndarray]:
    x = clustered(n, d, seed=seed, n_centres=40)
    ids = big_unique_ids(n, seed=seed)
    index = ann.new_index(ann.IndexSpec(kind="custom", factory="IVF16,Flat", n=n, dim=d))
    index.train(x)
    ann.add(index, ids, x)
    return index, ids, x


def test_nprobe_applies_to_one_search_and_leaves_the_shared_index_alone() -> None:
    index, ids, x = _ivf_flat()
    read = reader(ids, x)
    ann.set_nprobe(index, 2)
    queries = clustered(100, 16, seed=11, draw=3, n_centres=40)
    _, every_list = ann.search_reranked(index, queries, K, read, nprobe=16)
    assert faiss.extract_index_ivf(index).nprobe == 2
    _, truth = brute_force(queries, x, ids, K)
    np.testing.assert_array_equal(every_list, truth)  # all 16 lists of an IVF-Flat index: exact
    _, default = ann.search_reranked(index, queries, K, read)
    _, two = ann.search_reranked(copy_index(index), queries, K, read, nprobe=2)
    np.testing.assert_array_equal(default, two)  # no nprobe: the index's own


def test_concurrent_searches_with_different_nprobe_each_get_their_own_answers() -> None:
    """One shared index, threads searching at nprobe 1 and 16 at once: each matches its oracle."""
    from concurrent.futures import ThreadPoolExecutor

    index, ids, x = _ivf_flat()
    read = reader(ids, x)
    queries = clustered(200, 16, seed=11, draw=4, n_centres=40)
    _, truth = brute_force(queries, x, ids, K)
    _, one_list = ann.search_reranked(copy_index(index), queries, K, read, nprobe=1)
    assert not np.array_equal(one_list, truth), "nprobe=1 must differ from exact search for this test to mean anything"
    want = {1: one_list, 16: truth}

    def work(worker: int) -> list[int]:
        wrong = []
        for i in range(20):
            nprobe = 1 if (worker + i) % 2 else 16
            pos = slice((i * 10) % 200, (i * 10) % 200 + 10)
            _, found = ann.search_reranked(index, queries[pos], K, read, nprobe=nprobe)
            if not np.array_equal(found, want[nprobe][pos]):
                wrong.append(nprobe)
        return wrong

    with ThreadPoolExecutor(8) as pool:
        wrong = [w for ws in pool.map(work, range(16)) for w in ws]
    assert wrong == []


@pytest.mark.parametrize("factory", ["IVF16,Flat", "PCA8,IVF16,Flat", "IVF16,PQ4,RFlat", "IDMap2,Flat"])
def test_search_params_fit_every_index_wrapper(factory: str) -> None:
    """Per-call nprobe through pre-transforms and refinement equals setting it on a private copy."""
    n, d = 2_000, 16
    x = clustered(n, d, seed=12, n_centres=40)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    if factory.startswith("IDMap2"):
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        assert ann.search_params(index, 3) is None  # nothing to probe
        return
    index.add(x)
    queries = clustered(50, d, seed=12, draw=1, n_centres=40)
    private = copy_index(index)
    ann.set_nprobe(private, 3)
    want_d, want_i = private.search(queries, K)
    got_d, got_i = index.search(queries, K, params=ann.search_params(index, 3))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-6)
    assert ann.search_params(index, None) is None


# --- the flat path --------------------------------------------------------------------------------
def test_flat_search_equals_brute_force() -> None:
    n, d = 1_500, 32
    x = clustered(n, d, seed=6)
    ids = big_unique_ids(n, seed=6)
    spec = ann.choose_index_spec(n, d, 4 * GB, exact_threshold=50_000)
    index = ann.new_index(spec)
    assert spec.kind == "flat" and isinstance(index, faiss.IndexIDMap2) and index.is_trained
    ann.add(index, ids, x)
    queries = clustered(60, d, seed=6, draw=1)
    read = reader(ids, x)
    scores, found = ann.search_reranked(index, queries, K, read)
    want_scores, want = brute_force(queries, x, ids, K)
    assert oracle_recall(found, want) == 1.0
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # query by id, self excluded
    qids = ids[:30]
    _, found_ex = ann.search_reranked(index, read(qids), K, read, exclude=qids)
    _, want_ex = brute_force(read(qids), x, ids, K, exclude=qids)
    np.testing.assert_array_equal(found_ex, want_ex)
    # the tuner reports exact search as such
    truth = ann.exact_knn(read(qids), batches(ids, x, 500), K, exclude=qids)
    tuned = ann.tune_nprobe(index, spec, qids, truth, read, 0.95)
    assert tuned["nprobe"] is None and tuned["recall_at_10"] == 1.0


def test_flat_search_with_fewer_vectors_than_k() -> None:
    x = clustered(4, 16, seed=7)
    ids = np.array([10, 20, 30, 40], dtype=np.int64)
    index = ann.new_index(ann.choose_index_spec(4, 16, GB, exact_threshold=100))
    ann.add(index, ids, x)
    scores, found = ann.search_reranked(index, x[:1], K, reader(ids, x), exclude=ids[:1])
    assert sorted(found[0, :3].tolist()) == [20, 30, 40]
    assert np.all(found[0, 3:] == -1) and np.all(np.isneginf(scores[0, 3:]))
    assert np.all(np.diff(scores[0, :3]) <= 0)


def test_search_rejects_wrong_query_dimension() -> None:
    index = ann.new_index(ann.choose_index_spec(4, 16, GB, exact_threshold=100))
    with pytest.raises(ValueError):
        ann.search_reranked(index, np.zeros((1, 8), np.float32), K, lambda i: np.zeros((len(i), 16), np.float32))
    with pytest.raises(ValueError):
        ann.add(index, np.array([1]), np.zeros(16, np.float32))


def test_flat_index_ids_after_remove() -> None:
    x = clustered(300, 16, seed=8)
    ids = big_unique_ids(300, seed=8)
    index = ann.new_index(ann.choose_index_spec(300, 16, GB, exact_threshold=1_000))
    ann.add(index, ids, x)
    np.testing.assert_array_equal(ann.index_ids(index), ids)
    gone = ids[::3]
    assert ann.remove(index, gone) == len(gone)
    np.testing.assert_array_equal(ann.index_ids(index), np.setdiff1d(ids, gone))
    kept = np.setdiff1d(ids, gone)
    # the id -> vector association survives the compaction that remove_ids does
    _, found = ann.search_reranked(index, reader(ids, x)(kept[:40]), 1, reader(ids, x))
    np.testing.assert_array_equal(found[:, 0], kept[:40])


# --- save / load ---------------------------------------------------------------------------------
def test_save_index_is_atomic_and_replaces(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    path = folder / "index.faiss"
    x = clustered(200, 16, seed=9)
    ids = big_unique_ids(200, seed=9)
    index = ann.new_index(ann.choose_index_spec(200, 16, GB, exact_threshold=1_000))
    ann.add(index, ids[:100], x[:100])
    ann.save_index(index, path)
    assert os.listdir(folder) == ["index.faiss"]
    first_inode = path.stat().st_ino
    ann.add(index, ids[100:], x[100:])
    ann.save_index(index, path)
    assert os.listdir(folder) == ["index.faiss"]  # no temp file left behind
    assert path.stat().st_ino != first_inode  # replaced by rename, not rewritten in place
    for mmap in (False, True):
        loaded = ann.load_index(path, mmap=mmap)
        assert loaded.ntotal == 200
        np.testing.assert_array_equal(ann.index_ids(loaded), ids)


def test_load_missing_index_raises(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError):
        ann.load_index(tmp_path / "nope.faiss")
    with pytest.raises(RetrievalError):
        ann.load_index(tmp_path / "nope.faiss", mmap=True)


# --- custom factories ----------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16", "Flat", "IDMap,Flat"])
def test_custom_factories_take_ids(factory: str) -> None:
    n, d = 1_500, 32
    x = clustered(n, d, seed=10)
    ids = big_unique_ids(n, seed=10)
    spec = ann.choose_index_spec(n, d, GB, exact_threshold=1_000, factory=factory)
    assert spec.kind == "custom"
    index = ann.new_index(spec)
    if factory == "HNSW16":
        assert isinstance(index, faiss.IndexIDMap2)  # HNSW has no ids of its own
    if not index.is_trained:
        index.train(x)
    ann.add(index, ids, x)  # add_with_ids must work whatever the factory
    np.testing.assert_array_equal(ann.index_ids(index), ids)
    read = reader(ids, x)
    queries = clustered(50, d, seed=10, draw=1)
    ann.set_nprobe(index, 32)  # all lists for IVF32; a no-op for the others
    scores, found = ann.search_reranked(index, queries, K, read)
    _, want = brute_force(queries, x, ids, K)
    assert oracle_recall(found, want) >= 0.9
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, read(found)), atol=1e-5)
