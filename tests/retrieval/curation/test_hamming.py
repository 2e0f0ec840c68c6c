"""Multi-index Hamming range search against a brute-force oracle (bit by bit, no shared code)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.curation import hamming
from retrieval.curation.hamming import range_pairs, range_pairs_dihedral


def oracle(codes: np.ndarray, radius: int) -> set[tuple[int, int, int]]:
    bits = np.unpackbits(codes, axis=1).astype(np.int32)
    d = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    i, j = np.nonzero(np.triu(d <= radius, k=1))
    return {(int(a), int(b), int(d[a, b])) for a, b in zip(i, j)}


def oracle_dihedral(codes: np.ndarray, variants: np.ndarray, radius: int) -> set[tuple[int, int, int]]:
    cb = np.unpackbits(codes, axis=1).astype(np.int32)
    vb = np.unpackbits(variants, axis=2).astype(np.int32)
    d = (vb[:, :, None, :] != cb[None, None, :, :]).sum(axis=3).min(axis=1)  # d[i, j]: variants of i vs j
    both = np.minimum(d, d.T)
    i, j = np.nonzero(np.triu(both <= radius, k=1))
    return {(int(a), int(b), int(both[a, b])) for a, b in zip(i, j)}


def as_set(found: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int, int]]:
    i, j, d = found
    assert i.dtype == np.int64 and j.dtype == np.int64 and d.dtype == np.int32
    assert np.all(i < j)
    out = set(zip(i.tolist(), j.tolist(), d.tolist()))
    assert len(out) == len(i), "a pair was reported twice"
    return out


def planted(rng: np.random.Generator, n: int, nbytes: int, radius: int) -> np.ndarray:
    """Random codes plus, for a third of them, copies at exactly radius - 1, radius and radius + 1 bits,
    plus exact duplicates: the adversarial cases around the boundary."""
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    nbits = nbytes * 8
    out = [codes]
    for delta in (radius - 1, radius, radius + 1, 0):
        if delta < 0 or delta > nbits:
            continue
        src = codes[rng.choice(n, n // 6 + 1, replace=False)]
        bits = np.unpackbits(src, axis=1)
        for row in bits:
            row[rng.choice(nbits, delta, replace=False)] ^= 1
        out.append(np.packbits(bits, axis=1))
    allc = np.concatenate(out)
    return allc[rng.permutation(len(allc))]


def force_mih(fn, *args):
    """The multi-index path even where brute force would be chosen (small n)."""
    if fn is range_pairs:
        return hamming._range_pairs(np.ascontiguousarray(args[0]), args[1], method="mih")
    return hamming._range_pairs_dihedral(np.ascontiguousarray(args[0]), np.ascontiguousarray(args[1]), args[2],
                                         method="mih")


@pytest.mark.parametrize("nbytes,radius", [(8, 0), (8, 1), (8, 4), (8, 8), (8, 10), (8, 20), (32, 0), (32, 8),
                                           (32, 31), (3, 5)])
def test_range_pairs_equal_brute_force(nbytes: int, radius: int) -> None:
    rng = np.random.default_rng(nbytes * 100 + radius)
    codes = planted(rng, 240, nbytes, radius)
    want = oracle(codes, radius)
    assert as_set(force_mih(range_pairs, codes, radius)) == want
    assert as_set(range_pairs(codes, radius)) == want
    assert as_set(hamming._range_pairs(codes, radius, method="brute")) == want
    assert any(d == radius for _, _, d in want) or radius > nbytes * 8 - 1


def test_clustered_codes_and_big_buckets() -> None:
    """Few distinct values (blank images share a hash): buckets far larger than a batch."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    codes = base[rng.integers(0, 5, 400)]
    flip = rng.random((400, 8)) < 0.05
    codes = codes ^ (flip * rng.integers(1, 256, (400, 8))).astype(np.uint8)
    old = hamming.CANDIDATE_BATCH
    hamming.CANDIDATE_BATCH = 20  # force the batched and the sliced big-run paths (runs of ~80)
    try:
        got = force_mih(range_pairs, codes, 6)
    finally:
        hamming.CANDIDATE_BATCH = old
    assert as_set(got) == oracle(codes, 6)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(n: int) -> None:
    codes = np.zeros((n, 8), np.uint8)
    for fn in (range_pairs, lambda c, r: force_mih(range_pairs, c, r)):
        i, j, d = fn(codes, 3)
        assert len(i) == len(j) == len(d) == (1 if n == 2 else 0)
        assert i.dtype == np.int64 and d.dtype == np.int32
    assert len(range_pairs(codes, -1)[0]) == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        range_pairs(np.zeros((3, 2), np.int64), 1)
    with pytest.raises(ValueError, match="variants"):
        range_pairs_dihedral(np.zeros((3, 8), np.uint8), np.zeros((3, 8, 4), np.uint8), 1)


def test_plan_keeps_the_pigeonhole() -> None:
    for nbits, radius, n in [(64, 8, 10**6), (64, 10, 10**7), (256, 31, 10**6), (256, 31, 10**4), (64, 0, 10**6)]:
        plan = hamming._plan(nbits, radius, n, n)
        assert plan is not None
        assert sum(plan.widths) == nbits
        assert sum(s + 1 for s in plan.radii) == radius + 1
        assert min(plan.radii) >= 0


@pytest.mark.parametrize("nbytes,radius", [(32, 31), (32, 10), (8, 6), (8, 0)])
def test_dihedral_equal_brute_force(nbytes: int, radius: int) -> None:
    rng = np.random.default_rng(radius)
    n = 150
    codes = planted(rng, n, nbytes, radius)[:n]
    variants = rng.integers(0, 256, (n, 8, nbytes), dtype=np.uint8)
    variants[:, 0] = codes
    # planted transformed copies: j's plain hash near one of i's variants, at and around the radius
    nbits = nbytes * 8
    for k, delta in enumerate([radius, radius + 1, max(radius - 1, 0), 0] * 5):
        i, j, v = rng.choice(n, 2, replace=False).tolist() + [int(rng.integers(1, 8))]
        bits = np.unpackbits(variants[i, v])
        bits[rng.choice(nbits, min(delta, nbits), replace=False)] ^= 1
        codes[j] = variants[j, 0] = np.packbits(bits)
    want = oracle_dihedral(codes, variants, radius)
    assert as_set(force_mih(range_pairs_dihedral, codes, variants, radius)) == want
    assert as_set(range_pairs_dihedral(codes, variants, radius)) == want
    assert as_set(hamming._range_pairs_dihedral(codes, variants, radius, method="brute")) == want


@pytest.mark.parametrize("direct_bits,lookup_cost,nbytes", [(22, 0.2, 32), (3, 0.2, 32), (22, 20.0, 32),
                                                            (3, 0.05, 24), (22, 0.2, 16)])
def test_dihedral_tables_and_plans_equal_brute_force(monkeypatch: pytest.MonkeyPatch, direct_bits: int,
                                                     lookup_cost: float, nbytes: int) -> None:
    """Dense-count and sorted (searchsorted) tables, short and long chunks (the cost model pushed both
    ways), and hashes of 2, 3 and 4 words (the two-word pre-check only where there are more): the
    pairs are brute force's, planted transformed copies at the radius and one bit beyond included."""
    monkeypatch.setattr(hamming, "DIRECT_TABLE_BITS", direct_bits)
    monkeypatch.setattr(hamming, "LOOKUP_COST", lookup_cost)
    rng = np.random.default_rng(direct_bits + nbytes)
    n, radius = 200, nbytes - 1
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    variants = rng.integers(0, 256, (n, 8, nbytes), dtype=np.uint8)
    variants[:, 0] = codes
    for k, delta in enumerate([radius, radius + 1, radius - 1, 0, 3] * 6):
        i, j, v = rng.choice(n, 2, replace=False).tolist() + [int(rng.integers(1, 8))]
        bits = np.unpackbits(variants[i, v])
        # every other copy differs only in its first two words: the pre-check's sum is the distance
        where = min(128, nbytes * 8) if k % 2 else nbytes * 8
        bits[rng.choice(where, delta, replace=False)] ^= 1
        codes[j] = variants[j, 0] = np.packbits(bits)
    want = oracle_dihedral(codes, variants, radius)
    assert len(want) >= 15
    assert as_set(force_mih(range_pairs_dihedral, codes, variants, radius)) == want


@pytest.mark.parametrize("width", [3, 30])
def test_table_lookup_finds_every_run(width: int) -> None:
    """Both kinds of table (dense counts up to DIRECT_TABLE_BITS, sorted values beyond) against a
    dictionary: the smallest and largest keys, absent values on both sides, repeated keys."""
    rng = np.random.default_rng(width)
    keys = rng.integers(1, (1 << width) - 1, 300).astype(np.int64)
    keys[:20] = keys[20]  # a long run
    table = hamming._Table(keys, width)
    assert table.direct == (width <= hamming.DIRECT_TABLE_BITS)
    values = np.r_[keys.min(), keys.max(), 0, (1 << width) - 1, rng.integers(0, 1 << width, 200)].astype(np.int64)
    found, lo, hi = table.lookup(values)
    got = {int(f): set(table.order[a:b].tolist()) for f, a, b in zip(found, lo, hi)}
    want = {k: {r for r, x in enumerate(keys.tolist()) if x == int(v)} for k, v in enumerate(values.tolist())}
    assert got == {k: rows for k, rows in want.items() if rows}


def test_key_ranges_and_small_batches_give_the_same_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded-memory paths (entries sorted in several key ranges, tiny candidate batches)."""
    rng = np.random.default_rng(11)
    codes = planted(rng, 400, 8, 7)
    want = oracle(codes, 7)
    monkeypatch.setattr(hamming, "ENTRY_BATCH", 1000)
    monkeypatch.setattr(hamming, "CANDIDATE_BATCH", 50)
    assert as_set(force_mih(range_pairs, codes, 7)) == want


def test_sorted_entries_cover_every_hash_and_pattern_once() -> None:
    """The key ranges of the self-join partition the (hash, flip pattern) entries, each range sorted."""
    rng = np.random.default_rng(5)
    n = 300
    keys = rng.integers(0, 1 << 12, n).astype(np.int64)
    keys[:40] = keys[0]  # a crowded key range
    patterns = np.array([0] + [1 << b for b in range(12)], np.int64)
    join = hamming._Meet(keys, patterns, n, entry_batch=500)
    assert join.parts > 1
    got = []
    for r in range(join.parts):
        e = join.entries(r)
        assert np.all(e[1:] >= e[:-1])
        k = e >> join.shift
        assert np.all((k >> join.range_shift) == r)
        got.append(e)
    got = np.concatenate(got)
    item = (got >> join.pat_bits) & ((1 << join.item_bits) - 1)
    pat = got & ((1 << join.pat_bits) - 1)
    assert np.array_equal(got >> join.shift, keys[item] ^ patterns[pat])
    assert sorted(zip(item.tolist(), pat.tolist())) == [(i, p) for i in range(n) for p in range(len(patterns))]


def test_planted_pairs_with_tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs compared one at a time, rows in slices, survivors flushed in tiny batches."""
    rng = np.random.default_rng(21)
    codes = planted(rng, 500, 8, 8)
    want = oracle(codes, 8)
    for block, batch in [(1, 3), (7, 5), (64, 1000)]:
        monkeypatch.setattr(hamming, "BLOCK", block)
        monkeypatch.setattr(hamming, "CANDIDATE_BATCH", batch)
        monkeypatch.setattr(hamming, "ENTRY_BATCH", 2000)
        assert as_set(force_mih(range_pairs, codes, 8)) == want


def test_many_identical_hashes_stay_in_bounded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of hundreds of identical hashes (blank images): its pairs are compared and handed on in
    pieces of about CANDIDATE_BATCH, never all at once, and every pair is still found once."""
    rng = np.random.default_rng(8)
    blank = rng.integers(0, 256, (1, 8), dtype=np.uint8)
    near = np.repeat(blank, 60, axis=0)
    bits = np.unpackbits(near, axis=1)
    for row in bits:
        row[rng.choice(64, int(rng.integers(1, 10)), replace=False)] ^= 1
    codes = np.concatenate([np.repeat(blank, 300, axis=0), np.packbits(bits, axis=1),
                            rng.integers(0, 256, (200, 8), dtype=np.uint8)])
    codes = codes[rng.permutation(len(codes))]
    want = oracle(codes, 8)
    batch = 64
    monkeypatch.setattr(hamming, "CANDIDATE_BATCH", batch)
    seen = []
    real = hamming._run_pairs

    def spy(*args):
        for a, b, d in real(*args):
            seen.append(len(a))
            yield a, b, d

    monkeypatch.setattr(hamming, "_run_pairs", spy)
    assert as_set(force_mih(range_pairs, codes, 8)) == want
    assert len(want) > 300 * 299 // 2
    assert max(seen) < 2 * batch


@pytest.mark.parametrize("radius", [31, 16])
def test_pdq_sized_hashes(radius: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """256-bit hashes (4 words a row) with planted pairs around the radius, in several key ranges."""
    rng = np.random.default_rng(radius)
    codes = planted(rng, 360, 32, radius)
    codes[:30] = codes[30]  # a run of identical hashes
    want = oracle(codes, radius)
    monkeypatch.setattr(hamming, "ENTRY_BATCH", 400)
    monkeypatch.setattr(hamming, "CANDIDATE_BATCH", 40)
    assert as_set(force_mih(range_pairs, codes, radius)) == want
    assert any(d == radius for _, _, d in want)
