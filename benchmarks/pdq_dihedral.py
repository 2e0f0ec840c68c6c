"""PDQ with flips and rotations: what matching the 8 dihedral variants costs over plain PDQ matching.

`retrieval dedup`'s PDQ stage pairs images whose 256-bit PDQ hashes are within 31 bits under any of
the 8 flips / 90-degree rotations (`hamming.range_pairs_dihedral`). Three ways of getting those pairs
are timed on the same hashes, CPU seconds (one thread, numpy) and wall:
* plain: `range_pairs(codes, 31)`, the self-join of the unrotated hashes (what a PDQ stage without
  flips costs; it misses every flipped or rotated copy);
* dihedral, as dedup runs it: the 8n variant hashes go into one multi-index table per chunk and the n
  plain hashes are looked up once each (equivalent: d(T a, b) = d(a, T^-1 b) for every dihedral T);
* 8 passes: the same multi-index search run once per variant (variant v of every image against the
  plain hashes), which is what "8x the cost" would be.
The hashes are synthetic: uniform random 256-bit codes (a real image's 8 variants are as far apart
as unrelated hashes), 1% of images with a planted copy that is a random variant of the original
with 0-24 bits flipped; the planted pairs found and the agreement of the methods are checked.

Usage: python -m benchmarks.pdq_dihedral [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.common import save_result

RADIUS = 31
NV = 8
PLANTED = 0.01


def make_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (n, 32), variants (n, 8, 32), planted pairs (m, 2)) with variants[:, 0] == codes."""
    rng = np.random.default_rng(seed)
    variants = rng.integers(0, 256, (n, NV, 32), dtype=np.uint8)
    m = int(n * PLANTED)
    pos = rng.permutation(n)[: 2 * m]
    orig, copy = pos[:m], pos[m:]
    for a, b in zip(orig.tolist(), copy.tolist()):
        v = int(rng.integers(1, NV))
        perm = np.r_[v, [u for u in range(NV) if u != v]]  # the copy's own variant 0 is the original's v
        flips = np.zeros(256, np.uint8)
        flips[rng.choice(256, int(rng.integers(0, 25)), replace=False)] = 1
        variants[b] = variants[a][perm] ^ np.packbits(flips)[None, :]
    return np.ascontiguousarray(variants[:, 0]), variants, np.stack([orig, copy], axis=1)


def timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, round(time.process_time() - c, 2), round(time.perf_counter() - w, 2)


def as_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    return np.unique(np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j))


def measure(n: int) -> dict[str, Any]:
    from retrieval.curation import hamming

    codes, variants, planted = make_hashes(n)
    (pi, pj, _), plain_cpu, plain_wall = timed(hamming.range_pairs, codes, RADIUS)
    (di, dj, _), dih_cpu, dih_wall = timed(hamming.range_pairs_dihedral, codes, variants, RADIUS)
    passes_cpu = passes_wall = 0.0
    found = []
    for v in range(NV):  # variant v of every image against every plain hash: one multi-index search each
        (i, j, _), c, w = timed(hamming._range_pairs_dihedral, codes, np.ascontiguousarray(variants[:, v : v + 1]),
                                RADIUS, "auto")
        passes_cpu += c
        passes_wall += w
        found.append(as_keys(i, j, n))
    plain, dihedral, passes = as_keys(pi, pj, n), as_keys(di, dj, n), np.unique(np.concatenate(found))
    want = as_keys(planted[:, 0], planted[:, 1], n)
    return {
        "n": n, "radius": RADIUS, "planted_pairs": int(len(want)),
        "plain": {"cpu_s": plain_cpu, "wall_s": plain_wall, "pairs": int(len(plain)),
                  "planted_found": round(float(np.isin(want, plain).mean()), 4)},
        "dihedral": {"cpu_s": dih_cpu, "wall_s": dih_wall, "pairs": int(len(dihedral)),
                     "planted_found": round(float(np.isin(want, dihedral).mean()), 4)},
        "eight_passes": {"cpu_s": round(passes_cpu, 2), "wall_s": round(passes_wall, 2), "pairs": int(len(passes)),
                         "planted_found": round(float(np.isin(want, passes).mean()), 4)},
        "dihedral_equals_eight_passes": bool(np.array_equal(dihedral, passes)),
        "dihedral_contains_plain": bool(np.isin(plain, dihedral).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        rows.append(measure(n))
        print(rows[-1], flush=True)
        save_result("pdq_dihedral", {"sizes": rows})


if __name__ == "__main__":
    main()
