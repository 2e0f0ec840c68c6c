"""Exact Hamming range search over binary hashes (pHash, PDQ) by multi-index hashing.

Brute force compares every pair (N^2 / 2); at a million hashes that is what made the pHash stage
the slowest part of `retrieval dedup`. Multi-index hashing (Norouzi et al.) uses the pigeonhole
principle instead: cut the hash into m chunks and give chunk c a radius s_c with
sum(s_c + 1) = radius + 1. If two hashes are within `radius`, their chunk distances sum to at most
`radius`, so on at least one chunk c they are within s_c. Only pairs that are that close on some
chunk become candidates, and every candidate is verified exactly on the whole hash.

With s_c = 0 for every chunk (m = radius + 1) this is plain bucketing by chunk value; it is exact
but its short chunks make huge buckets on a large collection (a 64-bit pHash at radius 8 has 7-bit
chunks: a million hashes put ~8,000 in each bucket). Longer chunks with a small radius each (three
21-22 bit chunks within 2 bits for the same pHash) trade flip patterns for buckets that are almost
empty. The chunking is picked per call by a cost model of both terms.

* `range_pairs` (self-join) meets in the middle: every hash enters one sorted list per flip pattern
  of at most h = ceil(s_c / 2) bits of its chunk; two hashes within 2h bits on the chunk share a
  key there (a ^ p == b ^ q). Only entries in the same run of equal keys are candidates. At 10M
  pHashes that is ~2e10 candidates, so each must cost a few streaming operations: runs of equal
  length are laid side by side as a matrix of their full hashes (gathered once per entry, not
  twice per candidate) and whole rows are XORed and popcounted at once; item, pattern and the
  rules below are looked at only for the few pairs within the radius.
* `range_pairs_dihedral` puts the 8n variant hashes into one table per chunk and looks each plain
  hash up once per flip pattern of at most s_c bits, so the look-ups are not repeated per variant.

A pair is reported once: within a chunk, only its canonical (p, q) split is kept; across chunks, only
the first chunk that finds it. Memory is bounded: entries are sorted in key ranges of about
ENTRY_BATCH (ranges of the key's top bits, so each is built from its own slices of the hashes),
look-ups go in blocks, and candidates are compared and expanded in pieces of CANDIDATE_BATCH, so a
bucket of millions of identical hashes costs time in proportion to its pairs but not memory beyond
the pairs it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import combinations, pairwise
from math import comb

import numpy as np

logger = logging.getLogger(__name__)

CANDIDATE_BATCH = 1 << 22  # candidate pairs expanded and verified at once
LOOKUP_BATCH = 1 << 22  # (query, flip pattern) look-ups at once
BRUTE_PAIRS = 1 << 21  # below this many pairs, comparing all of them is cheaper than building tables
DIRECT_TABLE_BITS = 22  # chunks up to this width are looked up in a dense offset table (2^w + 1 entries)
KEY_BITS = 56  # chunks up to this width are keyed by their value (it fits in 8 bytes at any bit offset)
MAX_PATTERNS = 20_000  # flip patterns per chunk the cost model may choose
LOOKUP_COST = 0.2  # relative cost of one table look-up vs one candidate (direct table, two-word pre-check; measured)
SORT_COST = 3.0  # relative cost of one sorted entry vs one verified candidate
ENTRY_BATCH = 1 << 25  # (hash, flip pattern) entries sorted at once in the self-join
BLOCK = 1 << 16  # hashes of the runs compared together in the self-join (kept in cache)

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def range_pairs(codes: np.ndarray, radius: int) -> Pairs:
    """All pairs i < j with popcount(codes[i] ^ codes[j]) <= radius; codes uint8 (n, nbytes).

    Returns (i, j, distance) int64/int64/int32 arrays, sorted by (i, j).
    """
    codes = _check_codes(codes)
    return _range_pairs(codes, radius, method="auto")


def range_pairs_dihedral(codes: np.ndarray, variants: np.ndarray, radius: int) -> Pairs:
    """Pairs i < j with min over v of popcount(variants[i, v] ^ codes[j]) <= radius, or the same with i
    and j swapped; distance is that minimum (over both directions).

    variants: uint8 (n, 8, nbytes), the 8 dihedral hashes of each image (variants[:, 0] == codes).
    The 8n variants share one table that the n plain hashes are looked up in once, so the look-ups
    are not repeated per variant; only the candidates grow with the larger table.
    """
    codes = _check_codes(codes)
    variants = np.ascontiguousarray(variants, dtype=np.uint8)
    if variants.ndim != 3 or variants.shape[0] != codes.shape[0] or variants.shape[2] != codes.shape[1]:
        raise ValueError(f"variants must be (n, v, nbytes) = ({codes.shape[0]}, v, {codes.shape[1]}), "
                         f"got {variants.shape}")
    return _range_pairs_dihedral(codes, variants, radius, method="auto")


# --- internals -----------------------------------------------------------------------------------


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be a uint8 array (n, nbytes), got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes)


def _empty() -> Pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)


def _words(codes: np.ndarray) -> np.ndarray:
    """(n, nbytes) uint8 -> (n, ceil(nbytes / 8)) uint64, zero padded (padding never adds distance)."""
    n, nbytes = codes.shape
    nw = -(-nbytes // 8)
    if nbytes != nw * 8:
        padded = np.zeros((n, nw * 8), np.uint8)
        padded[:, :nbytes] = codes
        codes = padded
    return np.ascontiguousarray(codes).view(np.uint64).reshape(n, nw)


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of two (k, nw) uint64 arrays."""
    return np.bitwise_count(a ^ b).sum(axis=1, dtype=np.int32)


def _brute_self(words: np.ndarray, radius: int) -> Pairs:
    n, nw = words.shape
    block = max(1, (1 << 22) // max(1, n * nw))
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        a = words[start : start + block]
        d = np.bitwise_count(a[:, None, :] ^ words[None, :, :]).sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(d <= radius)
        keep = cols > rows + start
        out_i.append(rows[keep] + start)
        out_j.append(cols[keep])
        out_d.append(d[rows[keep], cols[keep]])
    return _finish(out_i, out_j, out_d)


def _finish(out_i: list[np.ndarray], out_j: list[np.ndarray], out_d: list[np.ndarray]) -> Pairs:
    if not out_i:
        return _empty()
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    d = np.concatenate(out_d).astype(np.int32)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


@dataclass
class _Plan:
    starts: list[int]  # first bit of each chunk (bit 0 = the most significant bit of byte 0)
    widths: list[int]
    radii: list[int]

    def patterns(self, c: int) -> np.ndarray:
        """Every value of `widths[c]` bits with at most `radii[c]` bits set (0 first)."""
        return self.patterns_h(c, self.radii[c])

    def patterns_h(self, c: int, s: int) -> np.ndarray:
        """Every value of `widths[c]` bits with at most `s` bits set (0 first)."""
        w = self.widths[c] if self.widths[c] <= KEY_BITS else 0
        out = [0]
        for k in range(1, s + 1):
            for bits in combinations(range(w), k):
                out.append(sum(1 << b for b in bits))
        return np.array(out, np.int64)


def _n_patterns(w: int, s: int) -> int:
    return sum(comb(w, k) for k in range(min(s, w) + 1))


def _layout(nbits: int, m: int, radius: int) -> _Plan:
    base, extra = divmod(nbits, m)
    widths = [base + (1 if c < extra else 0) for c in range(m)]
    starts = [int(x) for x in np.cumsum([0] + widths[:-1])]
    sbase, sextra = divmod(radius + 1, m)  # s_c + 1 sums to radius + 1; wider chunks get the larger radii
    radii = [sbase + (1 if c < sextra else 0) - 1 for c in range(m)]
    return _Plan(starts, widths, radii)


def _plan(nbits: int, radius: int, n_queries: int, n_table: int) -> _Plan | None:
    """The chunking with the lowest modelled cost (look-ups + expected candidates for uniform hashes)."""
    best, best_cost = None, np.inf
    for m in range(1, min(radius + 1, nbits) + 1):
        p = _layout(nbits, m, radius)
        if any(w > KEY_BITS and r > 0 for w, r in zip(p.widths, p.radii)):
            continue  # flip patterns need the chunk's real bits
        cost = 0.0
        for w, s in zip(p.widths, p.radii):
            v = _n_patterns(w, s)
            if v > MAX_PATTERNS:
                cost = np.inf
                break
            lookup = LOOKUP_COST * (1.0 if w <= DIRECT_TABLE_BITS else 4.0)
            cost += n_queries * v * (lookup + n_table / 2.0 ** min(w, 64))
        if cost < best_cost:
            best, best_cost = p, cost
    return best


def _chunk_keys(arrays: list[np.ndarray], start: int, width: int) -> list[np.ndarray]:
    """Bits [start, start + width) of every row of each array (MSB-first within bytes) as int64 keys.

    Chunks wider than KEY_BITS (only ever searched with radius 0) get dense ids instead, numbered
    jointly over all arrays so that equal chunks get equal keys.
    """
    if width <= KEY_BITS:
        return [_chunk_value(a, start, width) for a in arrays]
    b0, b1 = start // 8, (start + width - 1) // 8
    bits = [np.unpackbits(a[:, b0 : b1 + 1], axis=1)[:, start - 8 * b0 : start - 8 * b0 + width] for a in arrays]
    packed = np.packbits(np.concatenate(bits), axis=1)
    _, ids = np.unique(packed, axis=0, return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    return np.split(ids, np.cumsum([len(a) for a in arrays])[:-1])


def _chunk_value(codes: np.ndarray, start: int, width: int) -> np.ndarray:
    b0, b1 = start // 8, (start + width - 1) // 8
    acc = np.zeros(len(codes), np.uint64)
    for b in range(b0, b1 + 1):
        acc = (acc << np.uint64(8)) | codes[:, b].astype(np.uint64)
    shift = (b1 + 1) * 8 - (start + width)
    acc >>= np.uint64(shift)
    acc &= np.uint64((1 << width) - 1)
    return acc.astype(np.int64)


class _Table:
    """Rows sorted by one chunk's value, with a lookup from a value to its run of rows."""

    def __init__(self, keys: np.ndarray, width: int):
        self.order = np.argsort(keys)  # not stable: the pairs are sorted and made unique at the end
        self.direct = width <= DIRECT_TABLE_BITS
        if self.direct:
            counts = np.bincount(keys, minlength=1 << width)
            self.offsets = np.zeros(len(counts) + 1, np.int64)
            np.cumsum(counts, out=self.offsets[1:])
            # most look-ups find nothing: they read only these counts, kept narrow so that their
            # random reads stay in cache
            self.counts = counts.astype(np.uint16) if counts.max(initial=0) < 1 << 16 else counts
        else:
            self.uniq, first = np.unique(keys[self.order], return_index=True)
            self.bounds = np.r_[first, len(keys)].astype(np.int64)

    def lookup(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(which values have rows, and their [lo, hi) positions in sorted order)."""
        if self.direct:
            cnt = self.counts[values]
            found = np.flatnonzero(cnt)
            lo = self.offsets[values[found]]
            return found, lo, lo + cnt[found]
        pos = np.minimum(np.searchsorted(self.uniq, values), len(self.uniq) - 1)
        found = np.flatnonzero(self.uniq[pos] == values)
        pos = pos[found]
        return found, self.bounds[pos], self.bounds[pos + 1]


def _expand(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, order: np.ndarray):
    """Yield (query row, table row) candidate arrays in batches of at most CANDIDATE_BATCH pairs: row q[k]
    with order[lo[k]:hi[k]]."""
    cnt = hi - lo
    nz = np.flatnonzero(cnt > 0)
    if not len(nz):
        return
    q, lo, cnt = q[nz], lo[nz], cnt[nz]
    ends = np.cumsum(cnt)
    start = 0
    while start < len(cnt):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + CANDIDATE_BATCH, side="right"))
        stop = max(stop, start + 1)
        c = cnt[start:stop]
        if c.sum() <= CANDIDATE_BATCH:
            total = int(c.sum())
            offs = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
            at = np.repeat(lo[start:stop], c) + offs
            yield np.repeat(q[start:stop], c), order[at]
        else:  # one run larger than a batch (many identical chunks): walk it in slices
            for a in range(int(lo[start]), int(lo[start] + c[0]), CANDIDATE_BATCH):
                b = min(a + CANDIDATE_BATCH, int(lo[start] + c[0]))
                yield np.full(b - a, q[start]), order[a:b]
        start = stop


def _candidates(plan: _Plan, c: int, qkeys: np.ndarray, table: _Table):
    """(query row, table row) pairs whose chunk c values are within radii[c], in bounded batches."""
    patterns = plan.patterns(c)
    nq = len(qkeys)
    block = max(1, LOOKUP_BATCH // len(patterns))
    for qs in range(0, nq, block):
        vals = (qkeys[qs : qs + block][:, None] ^ patterns[None, :]).reshape(-1)
        found, lo, hi = table.lookup(vals)
        yield from _expand(qs + found // len(patterns), lo, hi, table.order)


def _self_plan(nbits: int, radius: int, n: int) -> _Plan | None:
    """Chunking for the self-join: each chunk is met in the middle (h = ceil(s / 2) flips on both sides),
    so its cost is sorting n * V(w, h) entries plus the pairs that share a sorted key."""
    item_bits = max(1, int(n - 1).bit_length())
    best, best_cost = None, np.inf
    for m in range(1, min(radius + 1, nbits) + 1):
        p = _layout(nbits, m, radius)
        cost = 0.0
        for w, s in zip(p.widths, p.radii):
            h = -(-s // 2)
            v = _n_patterns(w, h)
            key_bits = w if w <= KEY_BITS else item_bits
            if (w > KEY_BITS and s > 0) or v > MAX_PATTERNS or key_bits + item_bits + (v - 1).bit_length() > 63:
                cost = np.inf
                break
            entries = float(n) * v
            cost += SORT_COST * entries + entries * entries / 2.0 / 2.0 ** min(key_bits, 64)
        if cost < best_cost:
            best, best_cost = p, cost
    return best


def _range_pairs(codes: np.ndarray, radius: int, method: str) -> Pairs:
    """Self-join: for each chunk, every hash enters a sorted list once per flip pattern of at most
    h = ceil(s / 2) bits (its chunk value XOR the pattern); two hashes within 2h bits on that chunk
    meet under a common key (a ^ p == b ^ q). Only the candidates that share a key are verified."""
    n, nbytes = codes.shape
    if n < 2 or radius < 0:
        return _empty()
    nbits = nbytes * 8
    words = _words(codes)
    radius = min(radius, nbits)
    plan = None if method == "brute" else _self_plan(nbits, radius, n)
    if plan is None or (method == "auto" and n * (n - 1) // 2 <= BRUTE_PAIRS):
        return _brute_self(words, radius)
    logger.debug("Hamming range search: %d chunks, widths %s, radii %s", len(plan.widths), plan.widths, plan.radii)
    keys = [_chunk_keys([codes], s, w)[0] for s, w in zip(plan.starts, plan.widths)]
    reach = [2 * (-(-s // 2)) for s in plan.radii]  # chunk distance each chunk's join finds
    hashes = words[:, 0] if words.shape[1] == 1 else words  # 64-bit hashes: one word, no row sums
    # (chunk, key range) tasks are independent (a pair is kept by the first chunk that finds it,
    # decided from the keys alone), so they run in threads: numpy releases the GIL in the sorts,
    # gathers and array operations that are all of the work. Each thread sorts a share of
    # ENTRY_BATCH, so memory stays the same.
    workers = _cpu_count()
    entry_batch = max(1, ENTRY_BATCH // workers)
    joins = [_Meet(keys[c], plan.patterns_h(c, -(-plan.radii[c] // 2)), n, entry_batch)
             for c in range(len(plan.widths))]
    tasks = [(c, r) for c in range(len(joins)) for r in range(joins[c].parts)]
    workers = max(1, min(workers, len(tasks)))

    def run(task: tuple[int, int]) -> Pairs:
        c, r = task
        return _self_range(c, r, joins[c], keys, reach, hashes, radius)

    if workers == 1:
        out = [run(t) for t in tasks]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(run, tasks))
    return _finish([o[0] for o in out], [o[1] for o in out], [o[2] for o in out])


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Meet:
    """One chunk's sorted list of (key, item, pattern) entries, built one key range at a time.

    An entry is packed into one int64 (key | item | pattern index); key = chunk value ^ pattern. The
    key space is cut into `parts` ranges by its top bits, so that each holds about `entry_batch`
    entries. Since (value ^ p) >> s == (value >> s) ^ (p >> s), the items whose value ^ p falls in a
    range are one slice of the items sorted by value >> s: building a range touches only its own
    entries."""

    def __init__(self, keys: np.ndarray, patterns: np.ndarray, n: int, entry_batch: int):
        self.keys, self.patterns = keys, patterns
        self.item_bits = max(1, int(n - 1).bit_length())
        self.pat_bits = max(0, int(len(patterns) - 1).bit_length())
        self.shift = self.item_bits + self.pat_bits
        key_bits = max(1, int(keys.max() | patterns.max()).bit_length()) if len(keys) else 1
        want = max(1, -(-n * len(patterns) // entry_batch))
        part_bits = min(key_bits, int(want - 1).bit_length())
        self.parts = 1 << part_bits
        self.range_shift = key_bits - part_bits
        prefix = keys >> self.range_shift
        self.order = np.argsort(prefix, kind="stable")  # items by prefix, ascending within one
        self.sorted_keys = keys[self.order]
        self.bounds = np.searchsorted(prefix[self.order], np.arange(self.parts + 1))

    def entries(self, r: int) -> np.ndarray:
        """The sorted entries whose key lies in range r."""
        chunks = []
        for pi, p in enumerate(self.patterns.tolist()):
            src = r ^ (p >> self.range_shift)
            lo, hi = self.bounds[src], self.bounds[src + 1]
            chunks.append(((self.sorted_keys[lo:hi] ^ p) << self.shift) | (self.order[lo:hi] << self.pat_bits) | pi)
        packed = np.concatenate(chunks)
        del chunks
        packed.sort()
        return packed


def _self_range(c: int, r: int, join: _Meet, keys: list[np.ndarray], reach: list[int], hashes: np.ndarray,
                radius: int) -> Pairs:
    """The pairs within `radius` that chunk c finds in key range r and is the first chunk to find."""
    patterns = join.patterns
    h = int(np.bitwise_count(patterns).max()) if len(patterns) else 0
    item_mask, pat_mask = (1 << join.item_bits) - 1, (1 << join.pat_bits) - 1
    out_i, out_j, out_d = [], [], []

    def keep(e_a: np.ndarray, e_b: np.ndarray, d: np.ndarray) -> None:
        # entries of one run are sorted by item, so e_a's item is the smaller one
        i_lo, i_hi = (e_a >> join.pat_bits) & item_mask, (e_b >> join.pat_bits) & item_mask
        p_lo = e_a & pat_mask
        # one (p, q) per pair: the smaller item takes the lowest ceil(t / 2) differing bits
        x = keys[c][i_lo] ^ keys[c][i_hi]
        take = (np.bitwise_count(x).astype(np.int64) + 1) // 2
        low = np.zeros_like(x)
        rest = x.copy()
        for step in range(h):
            bit = rest & -rest
            use = step < take
            low |= np.where(use, bit, 0)
            rest ^= np.where(use, bit, 0)
        ok = patterns[p_lo] == low
        for e in range(c):  # only the first chunk that finds a pair reports it
            ok &= np.bitwise_count(keys[e][i_lo] ^ keys[e][i_hi]) > reach[e]
        out_i.append(i_lo[ok])
        out_j.append(i_hi[ok])
        out_d.append(d[ok].astype(np.int32))

    for e_a, e_b, d in _run_pairs(join.entries(r), join.shift, join.pat_bits, item_mask, hashes, radius):
        keep(e_a, e_b, d)
    return _finish(out_i, out_j, out_d)


def _run_pairs(packed: np.ndarray, shift: int, pat_bits: int, item_mask: int, hashes: np.ndarray, radius: int):
    """Yield (entry a, entry b, distance) for the entries a before b of one run of equal keys whose
    hashes are within `radius`, handed on in batches of CANDIDATE_BATCH to twice that.

    Runs of equal length L are laid side by side as an (L, runs) matrix of their hashes (one gather
    per entry), and row u is compared with rows u + 1 .. L - 1 at once: streaming XOR and popcount,
    a few calls per block of candidates. Blocks are sized to stay in cache; a run longer than a
    batch is compared in slices of CANDIDATE_BATCH."""
    k = packed >> shift
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    del k
    lens = np.diff(np.r_[starts, len(packed)])
    shared = lens > 1  # entries alone under their key meet nothing
    starts, lens = starts[shared], lens[shared]
    if not len(starts):
        return
    by_len = np.argsort(lens, kind="stable")
    starts, lens = starts[by_len], lens[by_len]
    cuts = np.flatnonzero(np.r_[True, lens[1:] != lens[:-1], True])
    found_a, found_b, found_d, found = [], [], [], 0
    batch = max(1, CANDIDATE_BATCH)
    for g0, g1 in pairwise(cuts.tolist()):
        size = int(lens[g0])
        width = max(1, min(BLOCK, batch) // size)  # runs compared together
        step = max(1, batch // width)  # rows of the run compared with row u at once
        rows = np.arange(size)[:, None]
        for s0 in range(g0, g1, width):
            at = starts[s0 : min(g1, s0 + width)][None, :] + rows  # (size, runs) positions
            ent = packed[at]
            hh = hashes[(ent >> pat_bits) & item_mask]
            for u in range(size - 1):
                for v0 in range(u + 1, size, step):
                    v1 = min(size, v0 + step)
                    d = np.bitwise_count(hh[v0:v1] ^ hh[u])
                    if d.ndim == 3:  # multi-word hashes
                        d = d.sum(axis=2, dtype=np.int16)
                    hit = np.flatnonzero(d <= radius)  # (much faster than a 2-d np.nonzero)
                    if not len(hit):
                        continue
                    rr, cc = np.divmod(hit, d.shape[1])
                    found_a.append(ent[u, cc])
                    found_b.append(ent[v0 + rr, cc])
                    found_d.append(d[rr, cc])
                    found += len(rr)
                    if found >= batch:
                        yield np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)
                        found_a, found_b, found_d, found = [], [], [], 0
    if found:
        yield np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)


def _brute_dihedral(codes: np.ndarray, variants: np.ndarray, radius: int) -> Pairs:
    n = len(codes)
    words = _words(codes)
    vwords = _words(variants.reshape(n * variants.shape[1], -1)).reshape(n, variants.shape[1], -1)
    block = max(1, (1 << 21) // max(1, n * vwords.shape[1] * vwords.shape[2]))
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        v = vwords[start : start + block]  # (b, 8, nw)
        d = np.bitwise_count(v[:, :, None, :] ^ words[None, None, :, :]).sum(axis=3, dtype=np.int32).min(axis=1)
        rows, cols = np.nonzero(d <= radius)
        keep = cols != rows + start
        out_i.append(rows[keep] + start)
        out_j.append(cols[keep])
        out_d.append(d[rows[keep], cols[keep]])
    return _merge_directions(_finish(out_i, out_j, out_d), words, vwords)


def _merge_directions(found: Pairs, words: np.ndarray, vwords: np.ndarray) -> Pairs:
    """Directed hits (i, j) -> unordered pairs i < j with the distance taken over both directions."""
    i, j, _ = found
    a, b = np.minimum(i, j), np.maximum(i, j)
    n = len(words)
    key = np.unique(a * n + b)
    a, b = key // n, key % n
    d = np.empty(len(a), np.int32)
    for s in range(0, len(a), CANDIDATE_BATCH // 8):
        aa, bb = a[s : s + CANDIDATE_BATCH // 8], b[s : s + CANDIDATE_BATCH // 8]
        ab = np.bitwise_count(vwords[aa] ^ words[bb][:, None, :]).sum(axis=2, dtype=np.int32).min(axis=1)
        ba = np.bitwise_count(vwords[bb] ^ words[aa][:, None, :]).sum(axis=2, dtype=np.int32).min(axis=1)
        d[s : s + len(aa)] = np.minimum(ab, ba)
    return a.astype(np.int64), b.astype(np.int64), d


def _range_pairs_dihedral(codes: np.ndarray, variants: np.ndarray, radius: int, method: str) -> Pairs:
    n, nbytes = codes.shape
    if n < 2 or radius < 0:
        return _empty()
    nv = variants.shape[1]
    nbits = nbytes * 8
    radius = min(radius, nbits)
    plan = None if method == "brute" else _plan(nbits, radius, n, n * nv)
    if plan is None or (method == "auto" and n * n * nv <= 2 * BRUTE_PAIRS):
        return _brute_dihedral(codes, variants, radius)
    words = _words(codes)
    flat = variants.reshape(n * nv, nbytes)
    vwords = _words(flat)
    out_i, out_j = [], []
    for c in range(len(plan.widths)):
        qkeys, tkeys = _chunk_keys([codes, flat], plan.starts[c], plan.widths[c])
        table = _Table(tkeys, plan.widths[c])
        for q, t in _candidates(plan, c, qkeys, table):
            if words.shape[1] > 2:  # two words (one 8-byte read each) rule out nearly every candidate
                d = np.bitwise_count(vwords[:, 0][t] ^ words[:, 0][q])
                d += np.bitwise_count(vwords[:, 1][t] ^ words[:, 1][q])
                near = np.flatnonzero(d <= radius)
                q, t = q[near], t[near]
            owner = t // nv
            ok = np.flatnonzero((owner != q) & (_distance(vwords[t], words[q]) <= radius))
            out_i.append(owner[ok])
            out_j.append(q[ok])
        del table
    if not out_i:
        return _empty()
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    return _merge_directions((i, j, np.zeros(len(i), np.int32)), words, vwords.reshape(n, nv, -1))
