"""Oracle tests on seeded synthetic vectors: union-find, the k-NN graph, groups and chain safety."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import ann
from retrieval.curation import hamming as hamming_search
from retrieval.curation.graph import Edges, brute_force_edges, knn_edges, sampled_edge_recall
from retrieval.curation.groups import Nodes, build_groups, components
from retrieval.curation.hashing import hamming, phash_codes, phash_edges


def planted_vectors(n: int, dim: int, n_groups: int, per_group: int, noise: float, seed: int) -> np.ndarray:
    """Random unit vectors; the first n_groups * per_group rows form tight groups (copies with noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    for g in range(n_groups):
        base = x[g * per_group]
        for j in range(1, per_group):
            x[g * per_group + j] = base + rng.normal(0, noise, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _oracle_components(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Components by breadth-first search over adjacency lists, in the documented order."""
    adj: dict[int, set[int]] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        adj.setdefault(x, set()).add(y)
        adj.setdefault(y, set()).add(x)
    seen: set[int] = set()
    out = []
    for start in range(n):
        if start in seen or start not in adj:
            continue
        comp, todo = {start}, [start]
        while todo:
            for y in adj[todo.pop()]:
                if y not in comp:
                    comp.add(y)
                    todo.append(y)
        seen |= comp
        if len(comp) >= 2:
            out.append(sorted(comp))
    return sorted(out, key=lambda c: (-len(c), c[0]))


@pytest.mark.parametrize("seed,n,m", [(0, 2000, 1500), (1, 2000, 3000), (2, 50, 0), (3, 10, 40), (4, 5000, 200)])
def test_components_equal_breadth_first_oracle(seed: int, n: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    a[: m // 10] = b[: m // 10]  # self-loops are not components
    got = components(n, Edges(a, b, np.ones(m, np.float32)))
    assert [c.tolist() for c in got] == _oracle_components(n, a[a != b], b[a != b])
    assert all(c.dtype == np.int64 for c in got)


def _index(x: np.ndarray, ids: np.ndarray, factory: str) -> object:
    spec = ann.IndexSpec(kind="custom", factory=factory, n=len(x), dim=x.shape[1])
    index = ann.new_index(spec)
    index.train(x)
    ann.add(index, ids, x)
    return index


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,PQ8"])
def test_knn_graph_edges_equal_brute_force(factory: str) -> None:
    n, dim = 1200, 32
    x = planted_vectors(n, dim, n_groups=40, per_group=4, noise=0.08, seed=3)
    ids = np.arange(n, dtype=np.int64) * 3 + 5  # sparse ids, like an index after deletions
    rows = {int(i): r for r, i in enumerate(ids)}
    read = lambda q: x[[rows[int(i)] for i in q]]  # noqa: E731
    index = _index(x, ids, factory)
    ann.set_nprobe(index, 16)  # all lists: candidates are complete, scores are re-ranked exactly
    for k, threshold in [(64, 0.8), (2, 0.8), (5, 0.5)]:
        got = knn_edges(index, ids, read, k, threshold, batch=256)
        want = brute_force_edges(ids, x, threshold, k=k)
        assert len(want) > 0
        assert set(zip(got.src.tolist(), got.dst.tolist())) == set(zip(want.src.tolist(), want.dst.tolist()))
        np.testing.assert_allclose(got.sim, want.sim, atol=1e-5)
    # k >= group size - 1: the k-NN graph holds every pair above the threshold
    got = knn_edges(index, ids, read, 64, 0.8)
    every = brute_force_edges(ids, x, 0.8)
    assert set(zip(got.src.tolist(), got.dst.tolist())) == set(zip(every.src.tolist(), every.dst.tolist()))


def test_graph_prefilter_skips_far_candidates_without_losing_edges() -> None:
    """On a PQ index the graph re-ranks only candidates whose ANN score is within the measured margin
    of the threshold; the edges must still equal brute force, also on a deliberately coarse code."""
    n, dim = 3000, 32
    x = planted_vectors(n, dim, n_groups=100, per_group=4, noise=0.06, seed=7)
    ids = np.arange(n, dtype=np.int64)
    read = lambda q: x[np.asarray(q)]  # noqa: E731
    for factory in ["IVF32,PQ8", "IVF32,PQ2"]:
        index = _index(x, ids, factory)
        ann.set_nprobe(index, 32)
        stats: dict[str, float] = {}
        got = knn_edges(index, ids, read, 64, 0.9, batch=512, stats=stats)
        want = brute_force_edges(ids, x, 0.9, k=64)
        assert len(want) >= 100 * 6 * 0.9
        assert set(zip(got.src.tolist(), got.dst.tolist())) == set(zip(want.src.tolist(), want.dst.tolist()))
        margin = stats["prefilter_margin"]
        assert 0.02 < margin < 2.0
        # the margin covers every true neighbour's under-estimate on the calibration queries
        q = ids[:200]
        approx, cand = index.search(x[q], 65)
        exact = np.einsum("qd,qkd->qk", x[q], x[np.maximum(cand, 0)])
        assert (exact - approx)[cand >= 0].max() <= margin


def test_flat_and_ivf_flat_indexes_are_known_to_score_exactly() -> None:
    """IDMap2 hands its inner index back as a bare faiss.Index: it must still be seen as flat."""
    from retrieval.curation.graph import is_exact_index, scores_are_exact

    x = planted_vectors(300, 16, n_groups=0, per_group=1, noise=0.0, seed=1)
    flat, ivf_flat, ivf_pq = (_index(x, np.arange(300), f) for f in ("IDMap2,Flat", "IVF8,Flat", "IVF8,PQ4"))
    assert is_exact_index(flat) and scores_are_exact(flat)
    assert not is_exact_index(ivf_flat) and scores_are_exact(ivf_flat)
    assert not is_exact_index(ivf_pq) and not scores_are_exact(ivf_pq)


def _nodes(n: int, n_ref: int = 0, width: np.ndarray | None = None) -> Nodes:
    total = n + n_ref
    return Nodes(image_id=np.r_[np.arange(n), -np.ones(n_ref, np.int64)], path=[f"p{i:04d}.jpg" for i in range(total)],
                 sha256=np.array([f"s{i}" for i in range(total)], dtype=object),
                 phash=np.arange(total, dtype=np.int64) * 0x0F0F0F0F0F0F0F, width=width if width is not None else np.full(total, 100),
                 height=np.full(total, 100), size=np.full(total, 1000), mtime_ns=np.arange(total),
                 is_ref=np.r_[np.zeros(n, bool), np.ones(n_ref, bool)])


def test_groups_equal_brute_force_components_and_policy_picks_representative() -> None:
    n = 300
    x = planted_vectors(n, 16, n_groups=30, per_group=3, noise=0.05, seed=4)
    ids = np.arange(n)
    edges = brute_force_edges(ids, x, 0.9)
    width = np.random.default_rng(0).integers(50, 500, n)
    groups = build_groups(_nodes(n, width=width), edges, lambda p: x[p], "highest-resolution", phash_distance=-1)
    want = {frozenset(c.tolist()) for c in components(n, edges)}
    assert {frozenset(m.pos for m in g.members) for g in groups} == want
    for g in groups:
        kept = [m.pos for m in g.members if m.action == "keep"]
        assert kept == [max((m.pos for m in g.members), key=lambda p: (width[p], -p))]
        assert all(m.reason == "embedding" for m in g.members if m.action == "remove")


def test_relative_dedup_removes_whole_components_touching_a_reference() -> None:
    # chain 0-1-2-3 touches reference 6 through node 3 only; 4-5 does not touch a reference
    n, n_ref = 6, 1
    edges = Edges(np.array([0, 1, 2, 4, 3]), np.array([1, 2, 3, 5, 6]), np.full(5, 0.95, np.float32))
    x = planted_vectors(7, 8, 0, 0, 0, seed=5)
    groups = build_groups(_nodes(n, n_ref), edges, lambda p: x[p], "first", phash_distance=-1)
    ref_groups = [g for g in groups if g.touches_reference]
    assert len(ref_groups) == 1
    g = ref_groups[0]
    assert {m.pos: m.action for m in g.members} == {0: "remove", 1: "remove", 2: "remove", 3: "remove", 6: "keep"}
    assert g.representative is None and all(m.reason == "reference" for m in g.members)
    other = [g for g in groups if not g.touches_reference][0]
    assert {m.pos: m.action for m in other.members} == {4: "keep", 5: "remove"}


def test_chain_safety_reports_and_splits_chained_groups() -> None:
    # a -> b -> c where a and c are dissimilar: one component, weak min pairwise similarity
    a = np.array([1.0, 0.0, 0.0], np.float32)
    c = np.array([0.0, 1.0, 0.0], np.float32)
    b = (a + c) / np.linalg.norm(a + c)
    x = np.stack([a, b, c])
    edges = brute_force_edges(np.arange(3), x, 0.7)
    assert len(edges) == 2
    [g] = build_groups(_nodes(3), edges, lambda p: x[p], "first", phash_distance=-1)
    assert len(g.members) == 3
    assert g.weakest_edge == pytest.approx(np.sqrt(0.5), abs=1e-5)
    assert g.min_pairwise == pytest.approx(0.0, abs=1e-6)
    # with a diameter of 0.35 (cos >= 0.65 to the representative 0) node 2 is split off and, alone, is no group
    [g] = build_groups(_nodes(3), edges, lambda p: x[p], "first", phash_distance=-1, max_group_diameter=0.35)
    assert {m.pos for m in g.members} == {0, 1}
    assert g.min_pairwise == pytest.approx(np.sqrt(0.5), abs=1e-5)


@pytest.mark.parametrize("brute_pairs", [0, hamming_search.BRUTE_PAIRS])  # multi-index hashing, then brute force
def test_phash_edges_equal_brute_force_hamming(monkeypatch: pytest.MonkeyPatch, brute_pairs: int) -> None:
    monkeypatch.setattr(hamming_search, "BRUTE_PAIRS", brute_pairs)
    rng = np.random.default_rng(6)
    base = rng.integers(-(1 << 63), (1 << 63) - 1, 300, dtype=np.int64)
    # plant near copies: flip 0..6 bits of the first 40 hashes
    copies = base[:40].copy()
    for i in range(40):
        for bit in rng.choice(64, size=i % 7, replace=False):
            copies[i] ^= np.int64(1) << np.int64(bit) if bit < 63 else np.int64(-(1 << 63))
    h = np.r_[base, copies]
    ids = np.arange(len(h), dtype=np.int64)
    got = phash_edges(ids, h, 5)
    want = {(i, j) for i in range(len(h)) for j in range(i + 1, len(h)) if hamming(int(h[i]), int(h[j])) <= 5}
    assert set(zip(got.src.tolist(), got.dst.tolist())) == want and len(want) >= 30
    assert phash_codes(np.array([1], np.int64)).tolist() == [[0, 0, 0, 0, 0, 0, 0, 1]]


def test_sampled_edge_recall_counts_the_exact_k_nn_edges_a_graph_misses() -> None:
    x = planted_vectors(900, 16, n_groups=60, per_group=5, noise=0.05, seed=9)
    ids = np.arange(10, 910, dtype=np.int64)  # ids are not positions
    read = lambda q: x[np.asarray(q) - 10]  # noqa: E731
    truth = brute_force_edges(ids, x, 0.9, k=3)
    full = sampled_edge_recall(truth, ids, read, k=3, threshold=0.9, sample=900, block=97)
    assert full["queries"] == 900 and full["true_edges"] == len(truth) > 200 and full["recall"] == 1.0
    half = Edges(truth.src[::2], truth.dst[::2], truth.sim[::2])
    part = sampled_edge_recall(half, ids, read, k=3, threshold=0.9, sample=900, block=97)
    assert part["recall"] == pytest.approx(len(half) / len(truth), abs=1e-4)
    some = sampled_edge_recall(half, ids, read, k=3, threshold=0.9, sample=100)
    assert some["queries"] == 100 and 0 < some["true_edges"] < len(truth)


def test_range_search_candidates_equal_brute_force_and_the_depth_limited_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On IVF-PQ the candidates come from a range search at threshold - margin; the edges must equal
    brute force (every list probed), and the old top-depth path also where groups hold more than k
    members (which neighbours make the top k is then decided among near-ties)."""
    from retrieval.curation import graph

    n, dim = 3000, 32
    x = planted_vectors(n, dim, n_groups=10, per_group=80, noise=0.04, seed=11)
    ids = np.arange(n, dtype=np.int64) * 2 + 1
    pos = lambda q: (np.asarray(q) - 1) // 2  # noqa: E731
    read = lambda q: x[pos(q)]  # noqa: E731
    index = _index(x, ids, "IVF16,PQ8")
    ann.set_nprobe(index, 16)
    stats: dict[str, object] = {}
    got = knn_edges(index, ids, read, 100, 0.9, batch=700, stats=stats)
    assert stats["candidates"] == "range search" and stats["nprobe"] == 16
    want = brute_force_edges(ids, x, 0.9, k=100)
    assert len(want) > 10 * 80 * 79 / 2 * 0.9
    assert set(zip(got.src.tolist(), got.dst.tolist())) == set(zip(want.src.tolist(), want.dst.tolist()))
    np.testing.assert_allclose(got.sim, want.sim, atol=1e-5)
    # k below the group size: a top-k cut per query (which of two exactly tied neighbours makes it
    # depends on rounding, so only the cut itself is checked here)
    few = knn_edges(index, ids, read, 20, 0.9, batch=700)
    few_set = set(zip(few.src.tolist(), few.dst.tolist()))
    assert few_set < set(zip(got.src.tolist(), got.dst.tolist())) and len(few) >= len(ids[:800]) * 20 / 2
    monkeypatch.setattr(graph, "supports_range_search", lambda index: False)
    old = knn_edges(index, ids, read, 20, 0.9, batch=700)
    assert len(few_set ^ set(zip(old.src.tolist(), old.dst.tolist()))) <= len(few) // 100


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,PQ8"])
def test_edges_spilled_to_disk_equal_edges_kept_in_memory(monkeypatch: pytest.MonkeyPatch, factory: str) -> None:
    from retrieval.curation import graph

    n, dim = 1500, 32
    x = planted_vectors(n, dim, n_groups=60, per_group=5, noise=0.06, seed=5)
    ids = np.arange(n, dtype=np.int64)
    read = lambda q: x[np.asarray(q)]  # noqa: E731
    index = _index(x, ids, factory)
    ann.set_nprobe(index, 16)
    kept = knn_edges(index, ids, read, 64, 0.85, batch=100)
    monkeypatch.setattr(graph, "SPILL_EDGES", 50)
    stats: dict[str, object] = {}
    spilled = knn_edges(index, ids, read, 64, 0.85, batch=100, stats=stats)
    assert stats["edges_spilled_to_disk"] >= len(kept)  # both directions of a pair, before canonical
    assert isinstance(spilled.src, np.memmap)
    np.testing.assert_array_equal(spilled.src, kept.src)
    np.testing.assert_array_equal(spilled.dst, kept.dst)
    np.testing.assert_array_equal(spilled.sim, kept.sim)


def test_sha256_edges_compare_raw_digests_like_the_hex_text() -> None:
    import hashlib

    from retrieval.curation.hashing import sha256_edges

    digests = [hashlib.sha256(bytes([i % 7])).hexdigest() for i in range(40)] + ["00" * 32, "00" * 31 + "01"]
    ids = np.arange(len(digests)) + 10
    from retrieval.curation.hashing import group_edges

    got = sha256_edges(ids, np.array(digests, dtype=object))
    _, codes = np.unique(np.array(digests), return_inverse=True)  # the hex text, as before
    a, b = group_edges(codes.astype(np.int64), ids)
    assert got.src.tolist() == a.tolist() and got.dst.tolist() == b.tolist() and len(a) == 40 - 7
    mixed = sha256_edges(ids[:3], np.array(["abc", "abc", digests[0]], dtype=object))  # not hex digests: as text
    assert set(zip(mixed.src.tolist(), mixed.dst.tolist())) == {(10, 11)}
