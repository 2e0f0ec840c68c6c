"""imagededup's find_duplicates(encoding_map=...) on N precomputed vectors or hashes; prints one JSON line.

Runs inside the imagededup peer environment (benchmarks/peers/imagededup-requirements.txt).

Usage (peer python):
    imagededup_scale.py --vectors VECTORS.npy --threshold 0.9 --mode cnn      (or: VECTORS.npy 0.9 cnn)
    imagededup_scale.py --vectors VECTORS.npy --mode hash [--hashes HASHES.npy] [--max-distance 10]

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
so the search's own growth is the difference; largest_worker_rss_mb: the largest pool worker;
peak_tree_pss_mb: the peak of this process plus its workers, by PSS sampled every 0.2 s during the
search, i.e. what the machine actually had to hold), pairs (unordered duplicate pairs found).
With --pairs-out PATH the pairs themselves are saved (so groups can be compared with ours).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
import warnings
from typing import Self

import numpy as np


def simhash(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    planes = np.random.default_rng(seed).standard_normal((vectors.shape[1], 64)).astype(np.float32)
    bits = (vectors @ planes) > 0
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TreeMemory:
    """Samples the summed PSS of this process and its descendants (pool workers) every 0.2 s.

    getrusage's peak RSS counts pages a forked worker shares with its parent once per process;
    PSS splits shared pages among their sharers, so the sum is the tree's real footprint.
    """

    def __init__(self, interval: float = 0.2):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        return out

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self, interval: float) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._pss(p) for p in self._descendants(me)))
            self._stop.wait(interval)


def _maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pos", nargs="*", help="VECTORS THRESHOLD MODE, or give them as options")
    parser.add_argument("--vectors")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--mode", choices=["cnn", "hash"], default="cnn")
    parser.add_argument("--hashes", default=None)
    parser.add_argument("--max-distance", type=int, default=10)
    parser.add_argument("--pairs-out", default=None,
                        help="also write the duplicate pairs found as an (m, 2) int64 .npy of row numbers, i < j")
    parser.add_argument("--max-memory-fraction", type=float, default=0.8,
                        help="refuse (JSON with an error, exit 0) when the search would need more than this "
                             "fraction of MemAvailable")
    args = parser.parse_args()
    if args.pos:
        if len(args.pos) != 3 or args.pos[2] not in ("cnn", "hash"):
            parser.error("positional form: VECTORS THRESHOLD cnn|hash")
        args.vectors, args.threshold, args.mode = args.pos[0], float(args.pos[1]), args.pos[2]
    if not args.vectors:
        parser.error("give the vectors (.npy)")
    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    from importlib.metadata import version

    t = time.perf_counter()
    import imagededup.methods  # noqa: F401 - imports torch and torchvision (seconds): timed apart

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    vectors = np.load(args.vectors, mmap_mode="r")
    n, d = vectors.shape
    if args.mode == "cnn":
        # Its search holds the whole N x N similarity matrix: float32 up to 10,000 rows; above that
        # float16 chunks from a pool of workers plus their np.vstack copy, and the workers grow too.
        # Measured here (d=384, 2 cores), peak PSS of process + workers above the ~0.85 GB after
        # import: +0.43 GB at 10k, +2.4 GB at 20k, +9.3 GB at 40k, i.e. ~6 N^2 bytes. Refuse
        # rather than let the OOM killer pick a process on a shared machine.
        need = 6 * n * n
        avail = _mem_available()
        if avail is not None and need > args.max_memory_fraction * avail:
            print(json.dumps({"tool": "imagededup", "n": int(n), "d": int(d), "mode": args.mode,
                              "error": f"not run: its dense N x N similarity matrix needs ~{need / 2**30:.1f} GiB, "
                                       f"{avail / 2**30:.1f} GiB available (O(N^2) memory)",
                              "estimated_bytes": need, "mem_available_bytes": avail}))
            return
    keys = [str(i) for i in range(n)]
    if args.mode == "cnn":
        import torch
        from imagededup.methods import CNN
        from imagededup.utils.models import CustomModel

        method = CNN(verbose=False, model_config=CustomModel(name="precomputed-embeddings",
                                                               model=torch.nn.Identity(), transform=lambda im: im))
        encoding_map = {k: np.asarray(vectors[i], dtype=np.float32) for i, k in enumerate(keys)}
        search = {"min_similarity_threshold": args.threshold}
        params = {**search, "hash_source": None}
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
        search = {"max_distance_threshold": args.max_distance}
        params = {**search, "hash_source": source}
    setup_s = time.perf_counter() - t
    rss_before = _maxrss_mb()

    def cpu_now() -> float:  # this process and its reaped workers (its pool is joined inside the call)
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    cpu0 = cpu_now()
    t = time.perf_counter()
    with TreeMemory() as tree:
        dup = method.find_duplicates(encoding_map=encoding_map, **search)
    wall = time.perf_counter() - t
    cpu = cpu_now() - cpu0
    pairs = sum(len(v) for v in dup.values()) // 2  # the map is symmetric: each pair is listed twice
    if args.pairs_out:
        found = {(min(int(a), int(b)), max(int(a), int(b))) for a, others in dup.items()
                 for b in (o[0] if isinstance(o, tuple) else o for o in others)}
        np.save(args.pairs_out, np.array(sorted(found), dtype=np.int64).reshape(-1, 2))
    print(json.dumps({
        "tool": "imagededup", "version": version("imagededup"), "n": int(n), "d": int(d), "mode": args.mode,
        **params, "import_s": round(import_s, 1), "setup_s": round(setup_s, 3),
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 2), "peak_rss_mb": _maxrss_mb(), "peak_rss_before_search_mb": rss_before,
        "largest_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "peak_tree_pss_mb": round(tree.peak / 2**20, 1),
        "pairs": int(pairs),
    }))


if __name__ == "__main__":
    main()
