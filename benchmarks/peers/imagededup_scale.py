"""imagededup's find_duplicates(encoding_map=...) on N precomputed vectors or hashes; prints one JSON line.

Runs inside the imagededup peer environment (benchmarks/peers/imagededup-requirements.txt).

Usage (peer python):
    imagededup_scale.py VECTORS.npy THRESHOLD cnn
    imagededup_scale.py VECTORS.npy THRESHOLD hash [--hashes HASHES.npy] [--max-distance 10]

VECTORS.npy: float32 (N, d), L2-normalised. Keys of the encoding map are the row numbers as strings.

cnn: imagededup's CNN duplicate search with min_similarity_threshold=THRESHOLD over
    {row: vector}. CNN() would build MobileNetV3 and download its weights in the constructor (not
    possible here, and not part of the search), so the object is made through imagededup's public
    custom-model hook, `CNN(model_config=CustomModel(name=..., model=torch.nn.Identity(),
    transform=...))`: the real constructor runs, nothing is downloaded, and the model is never
    called, because find_duplicates(encoding_map=...) only searches. That call is the unmodified
    `CNN.find_duplicates` -> `CNN._find_duplicates_dict` -> `imagededup.handlers.search.retrieval.
    get_cosine_similarity` (sklearn cosine_similarity on the whole N x N matrix up to N = 10,000;
    above that, float16 chunks of 1,000 rows in a multiprocessing pool of all cores, then
    np.vstack into one N x N float16 matrix), then one Python-level threshold pass per row.
    Default num_sim_workers (all cores).
hash: PHash().find_duplicates(encoding_map={row: 16-hex-digit hash}, max_distance_threshold=
    --max-distance), imagededup's defaults (brute_force_cython search, all cores). The hashes come
    from HASHES.npy (int64 or uint64, one per row); without it they are derived from the vectors by
    64 seeded random hyperplanes (sign bits, SimHash), so similar vectors get near hashes.
    THRESHOLD is unused in this mode.

Output: n, d, mode, threshold, wall_s (the find_duplicates call only; importing imagededup, which
imports torch, is import_s, and loading the .npy and building the encoding map is setup_s),
peak_rss_mb (getrusage of this process; peak_rss_before_search_mb is the same just before the call,
so the search's own growth is the difference; largest_worker_rss_mb: the largest pool worker),
pairs (unordered duplicate pairs found).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings

import numpy as np


def simhash(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    planes = np.random.default_rng(seed).standard_normal((vectors.shape[1], 64)).astype(np.float32)
    bits = (vectors @ planes) > 0
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("vectors")
    parser.add_argument("threshold", type=float)
    parser.add_argument("mode", choices=["cnn", "hash"])
    parser.add_argument("--hashes", default=None)
    parser.add_argument("--max-distance", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    from importlib.metadata import version

    t = time.perf_counter()
    import imagededup.methods  # noqa: F401 - imports torch and torchvision (seconds): timed apart

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    vectors = np.load(args.vectors, mmap_mode="r")
    n, d = vectors.shape
    keys = [str(i) for i in range(n)]
    if args.mode == "cnn":
        import torch
        from imagededup.methods import CNN
        from imagededup.utils.models import CustomModel

        method = CNN(verbose=False, model_config=CustomModel(name="precomputed-embeddings",
                                                               model=torch.nn.Identity(), transform=lambda im: im))
        encoding_map = {k: np.asarray(vectors[i], dtype=np.float32) for i, k in enumerate(keys)}
        setup_s = time.perf_counter() - t
        rss_before = _maxrss_mb()
        t = time.perf_counter()
        dup = method.find_duplicates(encoding_map=encoding_map, min_similarity_threshold=args.threshold)
        params = {"min_similarity_threshold": args.threshold, "hash_source": None}
    else:
        from imagededup.methods import PHash

        if args.hashes:
            hashes = np.load(args.hashes).astype(np.int64).view(np.uint64)
            source = "file"
        else:
            hashes = simhash(np.asarray(vectors, dtype=np.float32))
            source = "simhash of the vectors (64 seeded hyperplanes)"
        encoding_map = {k: f"{int(h):016x}" for k, h in zip(keys, hashes)}
        method = PHash(verbose=False)
        setup_s = time.perf_counter() - t
        rss_before = _maxrss_mb()
        t = time.perf_counter()
        dup = method.find_duplicates(encoding_map=encoding_map, max_distance_threshold=args.max_distance)
        params = {"max_distance_threshold": args.max_distance, "hash_source": source}
    wall = time.perf_counter() - t
    pairs = sum(len(v) for v in dup.values()) // 2  # the map is symmetric: each pair is listed twice
    print(json.dumps({
        "tool": "imagededup", "version": version("imagededup"), "n": int(n), "d": int(d), "mode": args.mode,
        **params, "import_s": round(import_s, 1), "setup_s": round(setup_s, 3),
        "wall_s": round(wall, 3), "peak_rss_mb": _maxrss_mb(), "peak_rss_before_search_mb": rss_before,
        "largest_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "pairs": int(pairs),
    }))


if __name__ == "__main__":
    main()
