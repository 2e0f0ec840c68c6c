"""The partitioned join (retrieval.curation.partition) against brute force, and its use by `dedup`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from retrieval.curation import joinrows, partition
from retrieval.curation.graph import brute_force_edges, sampled_edge_recall
from retrieval.curation.partition import DirectedSink, n_cells, partition_edges
from tests.retrieval.curation.test_graph_oracles import planted_vectors


def _pairs(e) -> set[tuple[int, int]]:
    return set(zip(e.src.tolist(), e.dst.tolist()))


def _reader(x: np.ndarray, ids: np.ndarray):
    rows = {int(i): r for r, i in enumerate(ids)}
    return lambda q: x[[rows[int(i)] for i in q]]


@pytest.fixture(params=["int8", "stored"])
def rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both sources of the join's rows (joinrows): the resident int8 copy only filters, so the edges
    must not depend on it."""
    monkeypatch.setattr(joinrows, "ROWS", request.param)
    return request.param


@pytest.mark.parametrize("projected_dim,products", [(64, "float32"), (64, "bfloat16"), (8, "auto")])
def test_exact_bound_equals_brute_force(monkeypatch: pytest.MonkeyPatch, projected_dim: int, products: str,
                                        rows: str) -> None:
    """With rho = 1/2 every pair within the radius is reached from one side or the other (the two gaps
    sum to at most r ||c_i - c_j||), so the edges must be brute force's exactly: the join, the pre-filter below the threshold and
    the k best per vector across cells lose nothing; nor do cells made in 8 principal directions of the
    32 (a projection never lengthens a difference)."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    monkeypatch.setattr(partition, "PROJECTED_DIM", projected_dim)
    monkeypatch.setattr(partition, "PRODUCTS", products)  # bfloat16 blocks only filter: the edges are float32's
    n, dim = 3000, 32
    x = planted_vectors(n, dim, n_groups=120, per_group=5, noise=0.07, seed=11)
    ids = np.arange(n, dtype=np.int64) * 2 + 7
    read = _reader(x, ids)
    assert n_cells(n) > 16  # a real partition, not one cell
    for k, threshold in [(64, 0.9), (2, 0.9), (3, 0.6)]:
        stats: dict = {}
        got = partition_edges(ids, read, k, threshold, stats=stats)
        want = brute_force_edges(ids, x, threshold, k=k)
        assert len(want) > 100
        assert _pairs(got) == _pairs(want), (k, threshold)
        np.testing.assert_allclose(got.sim, want.sim, atol=1e-5)
        assert stats["probe_rho"] == partition.RHO_EXACT and stats["cells"] == n_cells(n)


@pytest.mark.parametrize("products", ["float32", "bfloat16"])
def test_pairs_at_the_threshold_are_decided_in_float32(monkeypatch: pytest.MonkeyPatch, products: str,
                                                       rows: str) -> None:
    """Pairs planted within +-0.004 of the threshold (under bfloat16's rounding) fall on the side brute
    force puts them."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    monkeypatch.setattr(partition, "PRODUCTS", products)
    rng = np.random.default_rng(5)
    n, dim, t = 2500, 48, 0.93
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cosines = t + rng.uniform(-0.004, 0.004, 300)
    for j, c in enumerate(cosines):
        a = x[2 * j]
        u = rng.normal(size=dim).astype(np.float32)
        u -= (u @ a) * a
        u /= np.linalg.norm(u)
        x[2 * j + 1] = c * a + np.sqrt(1 - c * c) * u
    ids = np.arange(n, dtype=np.int64)
    got = partition_edges(ids, lambda q: x[q], 64, t)
    want = brute_force_edges(ids, x, t, k=64)
    assert 100 < len(want) < 300
    assert _pairs(got) == _pairs(want)


def test_calibrated_probes_find_planted_copies_and_report_the_partition() -> None:
    n, dim = 6000, 64
    x = planted_vectors(n, dim, n_groups=300, per_group=3, noise=0.05, seed=2)
    ids = np.arange(n, dtype=np.int64)
    read = lambda q: x[np.asarray(q)]  # noqa: E731
    stats: dict = {}
    got = partition_edges(ids, read, 64, 0.9, stats=stats)
    want = brute_force_edges(ids, x, 0.9, k=64)
    assert _pairs(got) <= _pairs(want)  # never an edge brute force does not have
    assert len(_pairs(got)) >= 0.995 * len(want)
    assert stats["candidates"] == "partitioned join"
    assert partition.RHO_MIN <= stats["probe_rho"] < partition.RHO_EXACT
    assert 1.0 <= stats["probes_per_vector"] < stats["cells"]
    assert set(stats["partition_s"]) == {"train", "calibrate", "assign", "rows", "join"}
    assert stats["join_rows"] == "int8" and 0 < stats["join_rows_bound"] < 0.05
    assert sampled_edge_recall(got, ids, read, 64, 0.9, sample=500)["recall"] >= 0.99


def test_many_copies_keep_k_per_vector_across_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 near-identical vectors spread over several cells: each keeps its k best over all cells met."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    rng = np.random.default_rng(9)
    n, dim = 3000, 32
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:400] = x[0] / np.linalg.norm(x[0]) + rng.normal(0, 0.04, (400, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    got = partition_edges(ids, lambda q: x[q], 5, 0.9)
    want = brute_force_edges(ids, x, 0.9, k=5)
    assert _pairs(got) == _pairs(want)


def test_spilled_hits_give_the_same_edges(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    n, dim = 2500, 32
    x = planted_vectors(n, dim, n_groups=100, per_group=6, noise=0.06, seed=4)
    ids = np.arange(n, dtype=np.int64)
    kept = partition_edges(ids, lambda q: x[q], 3, 0.85)
    monkeypatch.setattr(partition, "SPILL_EDGES", 50)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    spilled = partition_edges(ids, lambda q: x[q], 3, 0.85)
    assert _pairs(spilled) == _pairs(kept) and len(kept) > 100
    assert not list(tmp_path.iterdir())  # the spill folder is gone


def test_directed_sink_keeps_k_best_per_source_over_parts() -> None:
    sink = DirectedSink(10, 2, limit=3)
    ids = np.arange(10, dtype=np.int64) * 10
    sink.add(np.array([0, 0]), np.array([1, 2]), np.array([0.91, 0.99], np.float32))
    sink.add(np.array([0, 5, 0]), np.array([3, 9, 2]), np.array([0.95, 0.97, 0.99], np.float32))  # (0, 2) twice
    sink.add(np.array([9, 0]), np.array([5, 4]), np.array([0.97, 0.92], np.float32))
    assert sink.folder is not None  # spilled
    out = sink.result(ids)
    sink.close()
    assert _pairs(out) == {(0, 20), (0, 30), (50, 90)} and sink.folder is None


def test_a_cell_of_identical_vectors_costs_k_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,500 identical vectors (a placeholder image) share one cell: the join keeps k per row instead
    of gathering every pair, and the graph still links them all."""
    import tracemalloc

    rng = np.random.default_rng(4)
    n, dim = 4000, 64
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:1500] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    tracemalloc.start()
    got = partition_edges(ids, lambda q: x[q], 4, 0.95)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    from retrieval.curation.groups import components

    comps = components(n, got)
    assert [len(c) for c in comps] == [1500]
    assert peak < 150 << 20  # gathering all 2.2M pairs' vectors would take over 1 GB


def test_reference_set_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    n, dim = 2000, 32
    x = planted_vectors(n, dim, n_groups=0, per_group=1, noise=0.0, seed=8)
    ref = x[:50] + np.random.default_rng(1).normal(0, 0.02, (50, dim)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(ref)
    ids = np.arange(n, dtype=np.int64)
    got = partition_edges(ids, lambda q: x[q], 64, 0.9, extra=(flat, 10_000))
    assert _pairs(got) == {(i, 10_000 + i) for i in range(50)}


def test_dedup_uses_the_partition_without_the_faiss_index(planted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MIN_VECTORS on CPU, `dedup` joins the vectors file and never loads the FAISS index; the groups
    are those of the index path."""
    from retrieval import ann
    from retrieval.curation.dedup import DedupOptions, run_dedup
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    _, index_dir, _ = planted
    opts = DedupOptions(threshold=0.95, use_gpu=False, force=True)

    def groups(run: dict) -> tuple:
        return (run["groups"], run["images_in_groups"], run["removed_by_reason"])

    from retrieval.curation import dedup

    reader = IndexReader(IndexLayout(index_dir), writable=True)
    by_exact_join = run_dedup(reader, opts).counts  # small and flat: the one-cell join
    reader.close()
    assert by_exact_join["graph"]["candidates"] == "exact join"
    assert "edge_recall_sample" not in by_exact_join["graph"]  # exact: nothing to check
    real = dedup.graph_method
    with monkeypatch.context() as m:
        m.setattr(dedup, "graph_method", lambda n, o, spec=None: "index")
        reader = IndexReader(IndexLayout(index_dir), writable=True)
        by_index = run_dedup(reader, opts).counts
        reader.close()
    assert by_index["graph"]["candidates"] == "exact scan"
    assert groups(by_exact_join) == groups(by_index)

    monkeypatch.setattr(partition, "MIN_VECTORS", 2)
    monkeypatch.setattr(dedup, "graph_method", lambda n, o, spec=None: real(n, o, None))  # as if not flat
    monkeypatch.setattr(ann, "load_index", lambda *a, **k: (_ for _ in ()).throw(AssertionError("FAISS loaded")))
    # and with the node table parked in files during the graph, as at a million images and up
    from retrieval.curation.groups import Nodes

    parked = []
    park = Nodes.parked
    monkeypatch.setattr(dedup, "PARK_NODES_FROM", 0)
    monkeypatch.setattr(Nodes, "parked", lambda self: parked.append(1) or park(self))
    reader = IndexReader(IndexLayout(index_dir), writable=True)
    by_join = run_dedup(reader, opts).counts
    reader.close()
    assert parked == [1]
    assert by_join["graph"]["candidates"] == "partitioned join"
    assert by_join["graph"]["edge_recall_sample"]["queries"] > 0
    assert groups(by_join) == groups(by_index)
    json.dumps(by_join)  # the run record stays JSON


def test_graph_method_keeps_exact_search_where_the_index_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval import ann
    from retrieval.curation.dedup import DedupOptions, graph_method

    monkeypatch.setattr(ann, "gpu_count", lambda: 0)
    cpu = DedupOptions(use_gpu=False)
    flat = ann.IndexSpec(kind="flat", factory="IDMap2,Flat", n=40_000, dim=8)
    ivf = ann.IndexSpec(kind="ivfpq", factory="IVF256,PQ8", n=200_000, dim=8)
    assert graph_method(40_000, cpu, flat) == "exact"  # a flat index: the exact join of one cell
    assert graph_method(partition.EXACT_MAX + 1, cpu, flat) == "index"  # beyond it, the flat scan
    assert graph_method(200_000, cpu, ivf) == "partition"
    assert graph_method(200_000, cpu, None) == "partition"  # no FAISS index at all
    assert graph_method(partition.MIN_VECTORS - 1, cpu, ivf) == "exact"
    assert graph_method(200_000, DedupOptions(use_gpu=False, ray="127.0.0.1:6379"), ivf) == "index"
    monkeypatch.setattr(ann, "gpu_count", lambda: 1)
    assert graph_method(200_000, DedupOptions(use_gpu=True), ivf) == "index"


def test_blocks_pad_to_few_shapes() -> None:
    """bfloat16 blocks are padded (with zero rows) to a handful of shapes; float32 ones are not."""
    import torch

    p = partition.Products("bfloat16", partition.BF16_SLACK, partition.PAD_ROWS, partition.PAD_COLS)
    x = np.random.default_rng(0).normal(size=(1300, 16)).astype(np.float32)
    t = p.prepare(x, partition.PAD_ROWS)
    assert t.shape == (1536, 16) and t.dtype == torch.bfloat16 and not t[1300:].any()
    assert partition.Products("float32", partition.SLACK, 1, 1).prepare(x, 1).shape == x.shape


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_block_hits_by_bit_patterns_equal_float_comparisons(dtype: str) -> None:
    """Positive thresholds compared as the integers of their bit patterns take exactly the entries a
    float comparison takes: entries equal to their threshold, one step below it, -0.0, negatives, -inf
    (masked entries) and rows of +inf thresholds (padding) included; the column side as well."""
    import torch

    rng = np.random.default_rng(3)
    t = getattr(torch, dtype)
    low = torch.from_numpy(rng.uniform(0.01, 0.99, 64)).to(t)
    low[-4:] = math.inf
    s = torch.from_numpy(rng.uniform(-1, 1, (64, 48))).to(t)
    bits = torch.int16 if dtype == "bfloat16" else torch.int32
    below = (low.view(bits) - 1).view(t)  # the grid's next value down (positive floats)
    assert (below[:-4] < low[:-4]).all()
    for r in range(0, 60, 3):
        s[r, r % 48] = low[r]  # exactly at the threshold: taken
        s[r, (r + 1) % 48] = below[r]  # one step under it: not taken
        s[r + 1, r % 48] = -low[r]
    s[5, :] = -0.0
    s[7, :] = -math.inf
    s[::2, 40] = 1.0
    never = lambda _: (_ for _ in ()).throw(AssertionError("k cap reached"))  # noqa: E731
    got = partition._block_hits(s, low, 48, never, 0.0, True, 64, never)
    want = partition._block_hits(s, low, 48, never, 0.0, False, 64, never)
    truth = set(zip(*np.nonzero((s >= low[:, None]).numpy())))
    assert len(truth) > 60
    assert set(zip(*got[0])) == set(zip(*want[0])) == truth
    assert set(zip(*got[1])) == {(c, r) for r, c in truth} == set(zip(*want[1]))


@pytest.mark.parametrize("products", ["float32", "bfloat16"])
def test_ties_at_the_k_cap_go_to_the_lower_id_in_either_dtype(monkeypatch: pytest.MonkeyPatch, products: str,
                                                               rows: str) -> None:
    """Byte-identical images give equal products: a row with more than k hits in a block keeps the
    lower ids among equals, as brute force does (torch.topk's pick among ties depends on the width)."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    monkeypatch.setattr(partition, "PRODUCTS", products)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    x[1] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(40, dtype=np.int64) * 3
    got = partition_edges(ids, _reader(x, ids), 5, -0.2)
    want = brute_force_edges(ids, x, -0.2, k=5)
    assert _pairs(got) == _pairs(want)


def test_both_dtypes_give_the_same_edges_on_clusters_of_copies(monkeypatch: pytest.MonkeyPatch, rows: str) -> None:
    """Clusters larger than k: which k each image keeps, and every value, must not depend on the dtype
    the blocks were filtered in (the run picks it by a timing)."""
    monkeypatch.setattr(partition, "RHO_MIN", partition.RHO_EXACT)
    x = planted_vectors(2400, 24, n_groups=12, per_group=150, noise=0.02, seed=8)
    ids = np.arange(len(x), dtype=np.int64)
    out = {}
    for products in ("float32", "bfloat16"):
        monkeypatch.setattr(partition, "PRODUCTS", products)
        stats: dict = {}
        out[products] = partition_edges(ids, lambda q: x[np.asarray(q)], 16, 0.95, stats=stats)
        assert stats["block_products"] == products
    a, b = out["float32"], out["bfloat16"]
    assert len(a) > 2000 and _pairs(a) == _pairs(b)
    np.testing.assert_array_equal(a.sim, b.sim)
    # against brute force (another summation order), edges may differ only by near-ties at the k cap
    differ = _pairs(a) ^ _pairs(brute_force_edges(ids, x, 0.95, k=16))
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    kth = np.sort(sims, axis=1)[:, -16]
    assert len(differ) < 0.01 * len(a)
    for i, j in differ:
        assert min(abs(sims[i, j] - kth[i]), abs(sims[i, j] - kth[j])) < 1e-5, (i, j)


def test_probes_spilled_to_disk_give_the_same_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PROBES_HELD the probes go to disk in ranges of cells and come back one range at a time:
    the edges must not change, and the spill folder must be gone afterwards (also after a failure)."""
    monkeypatch.setattr(partition, "RHO_MIN", 0.2)
    x = planted_vectors(4000, 32, n_groups=200, per_group=4, noise=0.06, seed=4)
    ids = np.arange(len(x), dtype=np.int64) + 10
    read = _reader(x, ids)
    held = partition_edges(ids, read, 8, 0.9)
    folders: list = []
    real = partition.Probes

    class Small(real):  # type: ignore[misc, valid-type]
        def __init__(self, n_cells: int, limit: int | None = None):
            super().__init__(n_cells, limit=500)
            folders.append(self)

    monkeypatch.setattr(partition, "Probes", Small)
    monkeypatch.setattr(partition, "PROBE_PARTS", 7)
    spilled = partition_edges(ids, read, 8, 0.9)
    assert _pairs(spilled) == _pairs(held) and len(held) > 500
    np.testing.assert_array_equal(spilled.sim, held.sim)
    assert folders and folders[0].count > 5000 and folders[0].folder is None

    def broken(*args, **kwargs):
        assert folders[-1].folder is not None and folders[-1].folder.exists()
        raise RuntimeError("the join failed")

    monkeypatch.setattr(partition, "_join", broken)
    with pytest.raises(RuntimeError):
        partition_edges(ids, read, 8, 0.9)
    assert folders[-1].folder is None


@pytest.mark.parametrize("products", ["float32", "bfloat16"])
def test_exact_edges_equal_brute_force(monkeypatch: pytest.MonkeyPatch, products: str, rows: str) -> None:
    """The one-cell join is brute force: the same edges and values at several k and thresholds, with a
    reference set, and for a pair of vectors."""
    import faiss

    monkeypatch.setattr(partition, "PRODUCTS", products)
    x = planted_vectors(2500, 32, n_groups=100, per_group=6, noise=0.08, seed=12)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 2
    read = _reader(x, ids)
    for k, threshold in [(64, 0.9), (2, 0.9), (4, 0.5)]:
        stats: dict = {}
        got = partition.exact_edges(ids, read, k, threshold, stats=stats)
        want = brute_force_edges(ids, x, threshold, k=k)
        assert len(want) > 100 and _pairs(got) == _pairs(want), (k, threshold)
        np.testing.assert_allclose(got.sim, want.sim, atol=1e-5)
        assert stats["candidates"] == "exact join" and stats["cells"] == 1 and stats["join_rows"] == rows
    ref = planted_vectors(50, 32, n_groups=5, per_group=2, noise=0.05, seed=13)
    flat = faiss.IndexFlatIP(32)
    flat.add(ref)
    with_ref = partition.exact_edges(ids, read, 8, 0.8, extra=(flat, 10**6))
    assert (with_ref.dst >= 10**6).sum() == (partition_edges(ids, read, 8, 0.8, extra=(flat, 10**6)).dst >= 10**6).sum()
    two = partition.exact_edges(ids[:2], read, 4, -1.0)
    assert _pairs(two) == {(int(ids[0]), int(ids[1]))}
    one = partition.exact_edges(ids[:1], read, 4, -1.0, extra=(flat, 10**6))  # `dedup --against` on one image
    assert len(one) == 4 and set(one.src.tolist()) == {int(ids[0])} and (one.dst >= 10**6).all()


def test_small_blocks_skip_the_lower_half_and_keep_k_per_column(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members against earlier members are taken from the transposed block with each column's own k cap:
    with blocks of 64 x 32 (most blocks skipped or transposed), clusters of copies larger than k give
    the same edges and values as one block for everything."""
    x = planted_vectors(1500, 24, n_groups=10, per_group=120, noise=0.15, seed=9)
    ids = np.arange(len(x), dtype=np.int64) * 2
    read = _reader(x, ids)
    whole = partition.exact_edges(ids, read, 16, 0.8)
    monkeypatch.setattr(partition, "ROW_BLOCK", 64)
    monkeypatch.setattr(partition, "COL_BLOCK", 32)
    small = partition.exact_edges(ids, read, 16, 0.8)
    assert len(whole) > 1000
    # the k picked in a block are chosen by block products, whose last bits depend on the block's
    # shape: edges may differ only by near-ties at the k cap
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    kth = np.sort(sims, axis=1)[:, -16]
    differ = _pairs(small) ^ _pairs(whole)
    assert len(differ) < 0.01 * len(whole)
    for i, j in differ:
        i, j = i // 2, j // 2
        assert min(abs(sims[i, j] - kth[i]), abs(sims[i, j] - kth[j])) < 1e-5, (i, j)
    want = brute_force_edges(ids, x, 0.6, k=4)
    assert _pairs(partition.exact_edges(ids, read, 4, 0.6)) == _pairs(want)


@pytest.mark.parametrize("n", [65, 129])
def test_a_last_row_block_of_one_row_is_joined(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """A cell whose members end one row into a row block (n = m * ROW_BLOCK + 1): the block of one row
    and its transposed hits give brute force's edges (the old per-column threshold shape failed here)."""
    monkeypatch.setattr(partition, "ROW_BLOCK", 64)
    monkeypatch.setattr(partition, "COL_BLOCK", 32)
    x = planted_vectors(n, 16, n_groups=8, per_group=4, noise=0.05, seed=n)
    ids = np.arange(n, dtype=np.int64) + 1
    got = partition.exact_edges(ids, _reader(x, ids), 8, 0.8)
    want = brute_force_edges(ids, x, 0.8, k=8)
    assert len(want) > 10 and _pairs(got) == _pairs(want)


@pytest.mark.parametrize("n_cells", [1, 3, 64, 65])
def test_probes_round_trip_with_fewer_cells_than_parts(n_cells: int) -> None:
    """Probes spilled many times (cells fewer, as many, or more than PROBE_PARTS) come back complete and
    sorted by (cell, position), each range with its own cells."""
    rng = np.random.default_rng(n_cells)
    probes = partition.Probes(n_cells, limit=50)
    cells, positions = rng.integers(0, n_cells, 777), rng.integers(0, 1 << 20, 777)
    try:
        for start in range(0, 777, 37):
            probes.add((cells[start : start + 37].astype(np.int64) << 32) | positions[start : start + 37])
        probes.settle()
        got = []
        for lo, hi, pos, bounds in probes.ranges():
            for j in range(lo, hi):
                got += [(j, int(p)) for p in pos[bounds[j - lo] : bounds[j - lo + 1]]]
    finally:
        probes.close()
    assert got == sorted(zip(cells.tolist(), positions.tolist()))


def test_sorted_range_files_refuse_bad_starts(tmp_path: Path) -> None:
    from retrieval.curation.graph import RangeFiles

    files = RangeFiles(10, "t-", parts=2)
    keys = np.arange(6, dtype=np.int64)
    for bad in ([0, 4, 3], [1, 3, 6], [0, 3, 5], [0, 6]):
        with pytest.raises(ValueError, match="starts"):
            files.write_sorted(np.array(bad), keys)
    files.write_sorted(np.array([0, 3, 6]), keys)
    assert [r[0].tolist() for r in files.ranges()] == [[0, 1, 2], [3, 4, 5]]
    files.close()
