"""Index quality and cost: our automatic index choice side by side with `autofaiss.build_index` at
equal memory, on seeded synthetic clustered unit vectors.

For each dimension d and size N: build time, peak RSS of the build, bytes per vector, recall@1 and
recall@10 against exact search, p50/p99 latency of single queries and of batches of 64.
Goal (per d, N): at equal memory our recall@10 >= autofaiss's and >= 0.95, latency no worse.

Usage: python -m benchmarks.index_quality [--quick] [--sizes 100000 1000000] [--dims 384 768] [--nominal]
  --quick: d=384, N=100k, autofaiss at our index bytes only: ~10 min on 2 shared cores, of which
  our build is ~70 s and the autofaiss build 8-9 min (its OPQ training and its HNSW-assigned
  k-means; a smaller N would not help: both tools cap their training samples near this size, and
  below 50k we build an exact index). The full mode adds autofaiss at our index + fp16 store bytes.
  Full: d in {384, 768} x N in {100k, 1M}: hours, dominated by autofaiss's 1M builds (16384 lists
  trained on up to 1M points); results are saved after every (d, N) case, so a stopped run keeps
  what it finished. Nothing else here takes long: data, ground truth and our builds are minutes.

Choices, and why:

* Data. No embedding model is available here, so no real embeddings: the numbers are for synthetic
  data only. Vectors are drawn from a two-level mixture on the unit sphere: `--centres` (4096)
  Gaussian cluster centres grouped under centres/20 "super" centres (so some clusters are close to
  each other, as related subjects are), cluster weights log-normal (cluster sizes vary a lot, a
  few very large, many tiny), per-cluster spread uniform in [0.5, 1.0] (noise norm relative to the
  unit centre: point-to-centre cosine 0.71-0.89), then L2-normalised, float32. Seeded by (seed, d,
  N). Queries (2048) are drawn the same way from their own stream, so they are never in the base.
  Ground truth: exact inner-product top-10 over the float32 base (faiss IndexFlatIP per chunk,
  merged with a ResultHeap). Our re-rank reads the fp16 copy, so rounding can cost us a little
  against this float32 truth; that is counted, not hidden.
* Ours = exactly what `retrieval index` does: a temporary index directory (SQLite store with N
  image rows, ids 1..N, and the fp16 vector file holding row id = vector), then
  `retrieval.sync.sync_index` with the Settings defaults (memory budget, exact threshold, recall
  target), as indexer/pipeline.py calls it. So the choice (choose_index_spec), the training sample,
  nprobe tuning for the recall target on held-out base vectors, and the precise fallbacks when PQ
  misses the target are the library's own code, not a re-implementation. Filling the store is not
  timed; the build is the sync_index call, in a child process of its own (peak RSS = that process's
  VmHWM, not ru_maxrss, which Linux carries over fork + exec from the parent; its RSS after imports
  is reported beside it). The same holds for autofaiss's build and for each evaluation process.
* Our search path is `ann.search_reranked` (ANN candidates re-ranked with exact cosine from the
  memory-mapped fp16 vectors) with the index loaded memory-mapped as the API loads it: what users
  get. autofaiss's index is searched the way its README shows (faiss.read_index, then its own
  `index_param` applied with faiss.ParameterSpace, index.search for k=10). Both are measured by the
  same code (benchmarks/index_eval.py), each in its own process, with the same faiss (1.15, ours:
  it reads the 1.9 files autofaiss writes) and the same OpenMP thread count. Searches run on one
  thread by default (--search-threads; the ann-benchmarks convention): on a shared 2-core machine a
  2-thread OpenMP region waits for a descheduled thread, and a 0.3 ms flat search measured 35 ms.
  Builds use every core for both tools (--build-threads). autofaiss's index is also timed with its
  own faiss 1.9 (`latency_peer_faiss`) in case the library version matters.
* Equal memory, honestly. Our memory is the index (in RAM) plus the fp16 store (2*d bytes per
  vector, memory-mapped from disk: only the rows a query re-ranks are read, but they are needed).
  Both are reported separately, per vector. The budget the indexer uses is Settings.memory_budget
  (4 GB by default at every N; it is a cap: the index chosen at 100k-1M uses a small part of it).
  autofaiss gets two budgets: (1) our index file's size (equal index memory), (2) our index plus
  fp16 store (equal total memory: its fairest configuration, since it has no re-rank store).
  `--nominal` adds (3): the same nominal budget as ours (4 GB), where autofaiss picks HNSW or
  IVF-Flat using far more memory than we do (slow to build at 1M: off by default).
  autofaiss sizes its choice by codes + ids only (not centroids, OPQ matrix, HNSW quantizer), so its
  index can come out larger than the budget it was given: `within_budget` says so (and the table
  marks it with *); we leave that in its favour rather than shrink its budget by hand.
* autofaiss settings: its defaults (10 ms per query target, >= 20 neighbours), our thread count,
  current_memory_available = 75 % of this machine's RAM. Its build time is the whole build_index
  call (it includes its own parameter search and speed metrics, as ours includes nprobe tuning).
* Goal checks are recorded with the measured values; "latency no worse" compares p50 of single
  queries and of batches of 64, with 10 % allowance for noise on a shared machine (the ratio is
  recorded too). These are measurements, never test assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result
from benchmarks.index_eval import peak_rss_bytes

HERE = Path(__file__).parent
EVAL_SCRIPT = HERE / "index_eval.py"
PEER_SCRIPT = HERE / "peers" / "autofaiss_build.py"
K = 10
BATCH = 64
LATENCY_SLACK = 1.10
RECALL_GOAL = 0.95
CHUNK = 65_536


# --- data ---------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Mixture:
    """Seeded clustered unit vectors: super-centres -> centres -> points (see the module docstring)."""

    def __init__(self, d: int, centres: int, seed: int):
        rng = np.random.default_rng([seed, d, 0])
        n_super = max(1, centres // 20)
        sup = _unit(rng.standard_normal((n_super, d)))
        parent = rng.integers(n_super, size=centres)
        self.centres = _unit(sup[parent] + 0.8 * _unit(rng.standard_normal((centres, d))))
        w = rng.lognormal(0.0, 1.0, centres)
        self.weights = w / w.sum()
        self.spread = rng.uniform(0.5, 1.0, centres)
        self.d = d

    def draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        c = rng.choice(len(self.centres), size=m, p=self.weights)
        noise = rng.standard_normal((m, self.d)) * (self.spread[c, None] / math.sqrt(self.d))
        return _unit(self.centres[c] + noise).astype(np.float32)


def make_data(root: Path, n: int, d: int, n_queries: int, centres: int, seed: int) -> dict[str, Any]:
    """base (root/emb/base.npy, float32, written in chunks), queries, exact top-K truth."""
    import faiss

    mix = Mixture(d, centres, seed)
    (root / "emb").mkdir(parents=True)
    t = time.perf_counter()
    base = np.lib.format.open_memmap(root / "emb" / "base.npy", mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng([seed, d, n, 1])
    for start in range(0, n, CHUNK):
        base[start : start + CHUNK] = mix.draw(rng, min(CHUNK, n - start))
    base.flush()
    queries = mix.draw(np.random.default_rng([seed, d, n, 2]), n_queries)
    np.save(root / "queries.npy", queries)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    heap = faiss.ResultHeap(n_queries, K, keep_max=True)
    for start in range(0, n, 4 * CHUNK):
        flat = faiss.IndexFlatIP(d)
        flat.add(np.ascontiguousarray(base[start : start + 4 * CHUNK]))
        dist, ids = flat.search(queries, K)
        heap.add_result(dist, ids + start)
    heap.finalize()
    np.save(root / "truth.npy", heap.I)
    truth_s = time.perf_counter() - t
    del base
    top1 = heap.D[:, 0]
    return {"generate_s": round(gen_s, 1), "truth_s": round(truth_s, 1),
            "query_top1_cosine_mean": round(float(top1.mean()), 4),
            "query_top10_cosine_mean": round(float(heap.D[:, K - 1].mean()), 4)}


# --- ours ---------------------------------------------------------------------------------------
def fill_index_dir(root: Path, base_path: Path) -> dict[str, Any]:
    """An index directory as `retrieval index` leaves it before sync: N image rows + fp16 vectors."""
    from sqlalchemy import insert

    from retrieval.layout import IndexLayout
    from retrieval.store import Image, Store, utcnow
    from retrieval.vectors import VectorStore

    base = np.load(base_path, mmap_mode="r")
    n, d = base.shape
    layout = IndexLayout(root)
    root.mkdir(parents=True)
    t = time.perf_counter()
    store = Store(layout.default_db_url())
    now = utcnow()
    try:
        with store.session() as s, s.begin():
            for start in range(1, n + 1, CHUNK):
                s.execute(insert(Image), [
                    {"id": i, "path": f"img/{i:08d}.jpg", "size": 1, "mtime_ns": 0, "sha256": f"{i:064x}",
                     "width": 1, "height": 1, "format": "JPEG", "phash": 0, "indexed": False,
                     "added_at": now, "updated_at": now}
                    for i in range(start, min(start + CHUNK, n + 1))])
            store.set_meta(s, dim=d)
    finally:
        store.close()
    vectors = VectorStore(layout.vectors_path, d)
    for start in range(0, n, CHUNK):
        chunk = np.asarray(base[start : start + CHUNK])
        vectors.write(np.arange(start + 1, start + 1 + len(chunk)), chunk)
    return {"fill_s": round(time.perf_counter() - t, 1)}


def build_ours(root: Path, threads: int | None) -> dict[str, Any]:
    """Child process: sync_index on a filled index directory, as indexer/pipeline.py calls it."""
    import faiss

    from retrieval.layout import IndexLayout
    from retrieval.settings import Settings
    from retrieval.store import Store
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    if threads:
        faiss.omp_set_num_threads(threads)
    baseline = peak_rss_bytes()  # after imports
    s = Settings()
    layout = IndexLayout(root)
    store = Store(layout.default_db_url())
    dim = store.get_meta("dim")
    t = time.perf_counter()
    synced = sync_index(store, VectorStore(layout.vectors_path, dim), layout, SyncOptions(
        memory_budget=s.memory_budget, exact_threshold=s.exact_threshold, recall_target=s.recall_target))
    build_s = time.perf_counter() - t
    store.close()
    assert synced.spec is not None
    return {"build_s": round(build_s, 3), "peak_rss_bytes": peak_rss_bytes(),
            "baseline_rss_bytes": baseline, "spec": synced.spec.to_dict(), "timings": synced.timings,
            "memory_budget": s.memory_budget, "exact_threshold": s.exact_threshold, "recall_target": s.recall_target,
            "threads": faiss.omp_get_max_threads()}


# --- subprocesses -------------------------------------------------------------------------------
def _run_child(cmd: list[str], timeout: float | None) -> dict[str, Any]:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


def _eval_args(root: Path, threads: int, single: int) -> list[str]:
    return ["--queries", str(root / "queries.npy"), "--truth", str(root / "truth.npy"), "--k", str(K),
            "--batch", str(BATCH), "--single", str(single), "--threads", str(threads)]


def run_ours(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.layout import IndexLayout

    layout = IndexLayout(root / "ours")
    built = _run_child([sys.executable, "-m", "benchmarks.index_quality", "--build-ours", str(layout.root),
                        "--threads", str(args.build_threads)], args.timeout)
    spec = built["spec"]
    nprobe = spec["params"].get("nprobe")
    evaluated = _run_child([sys.executable, str(EVAL_SCRIPT), "--index", str(layout.faiss_path),
                            "--rerank", str(layout.vectors_path), "--id-offset", "1", "--mmap",
                            *(["--nprobe", str(nprobe)] if nprobe else []),
                            *_eval_args(root, args.search_threads, args.single)], args.timeout)
    return {"tool": "ours", "label": "ours (auto)", "budget_bytes": built["memory_budget"],
            "index": spec["factory"], "search_params": f"nprobe={nprobe}" if nprobe else "",
            "index_bytes": layout.faiss_path.stat().st_size, "store_bytes": layout.vectors_path.stat().st_size,
            "build": built, "eval": evaluated}


def run_autofaiss(root: Path, label: str, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.peers import PeerUnavailable, ensure_env, run_json

    row: dict[str, Any] = {"tool": "autofaiss", "label": label, "budget_bytes": budget}
    out = root / f"autofaiss-{budget}"
    out.mkdir()
    try:
        built = run_json("autofaiss", PEER_SCRIPT, [
            "--embeddings", str(root / "emb"), "--index", str(out / "knn.index"), "--infos", str(out / "infos.json"),
            "--max-index-memory", str(budget), "--current-memory", str(int(0.75 * _total_ram())),
            "--threads", str(args.build_threads)], timeout=args.timeout)
        row["build"] = built
        if built.get("error"):
            row["error"] = built["error"]
            return row
        row.update(index=built["index_key"], search_params=built["index_param"] or "",
                   index_bytes=built["index_bytes"], store_bytes=0)
        cmd = ["--index", str(out / "knn.index"), "--params", row["search_params"],
               *_eval_args(root, args.search_threads, args.single)]
        row["eval"] = _run_child([sys.executable, str(EVAL_SCRIPT), *cmd], args.timeout)
        try:  # the same measurement with autofaiss's own faiss (1.9)
            peer = _run_child([str(ensure_env("autofaiss")), str(EVAL_SCRIPT), *cmd], args.timeout)
            row["latency_peer_faiss"] = {k: peer[k] for k in ("faiss", "recall_at_10", "latency_single",
                                                              f"latency_batch{BATCH}")}
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["latency_peer_faiss"] = {"error": str(exc)}
    except (PeerUnavailable, RuntimeError, subprocess.TimeoutExpired) as exc:
        row["error"] = str(exc)
    return row


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- one case -----------------------------------------------------------------------------------
def _per_vector(row: dict[str, Any], n: int) -> None:
    if "index_bytes" in row:
        row["within_budget"] = row["index_bytes"] + row["store_bytes"] * (row["tool"] != "ours") <= row["budget_bytes"]
        row["index_bytes_per_vector"] = round(row["index_bytes"] / n, 1)
        row["store_bytes_per_vector"] = round(row["store_bytes"] / n, 1)
        row["total_bytes_per_vector"] = round((row["index_bytes"] + row["store_bytes"]) / n, 1)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours = rows[0]
    if "eval" not in ours:
        return {"error": "our index was not measured"}
    r10 = ours["eval"]["recall_at_10"]
    out: dict[str, Any] = {"recall_at_10": r10, f"recall_at_10_ge_{RECALL_GOAL}": r10 >= RECALL_GOAL, "vs_autofaiss": []}
    for row in rows[1:]:
        if "eval" not in row:
            out["vs_autofaiss"].append({"label": row["label"], "error": row.get("error", "not measured")})
            continue
        check = {"label": row["label"], "equal_memory": row["label"] != "autofaiss @ nominal budget",
                 "recall_at_10": [r10, row["eval"]["recall_at_10"]],
                 "recall_ok": r10 >= row["eval"]["recall_at_10"]}
        for lat in ("latency_single", f"latency_batch{BATCH}"):
            a, b = ours["eval"][lat]["p50_ms"], row["eval"][lat]["p50_ms"]
            check[f"{lat}_p50_ms"] = [a, b]
            check[f"{lat}_ratio"] = round(a / b, 3) if b else None
            check[f"{lat}_ok"] = a <= LATENCY_SLACK * b
        check["all_ok"] = check["recall_ok"] and check["latency_single_ok"] and check[f"latency_batch{BATCH}_ok"]
        out["vs_autofaiss"].append(check)
    equal = [c for c in out["vs_autofaiss"] if c.get("equal_memory", True)]
    out["goal_met"] = bool(out[f"recall_at_10_ge_{RECALL_GOAL}"] and equal and all(c.get("all_ok") for c in equal))
    return out


def run_case(n: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"bench-iq-{d}-{n}-", dir=args.tmp))
    case: dict[str, Any] = {"n": n, "dim": d}
    try:
        print(f"[d={d} N={n:,}] generating data and exact ground truth", flush=True)
        case["data"] = make_data(root, n, d, args.queries, args.centres, args.seed)
        case["data"].update(fill_index_dir(root / "ours", root / "emb" / "base.npy"))
        print(f"[d={d} N={n:,}] ours: sync_index", flush=True)
        try:
            ours = run_ours(root, args)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            ours = {"tool": "ours", "label": "ours (auto)", "error": str(exc)}
        rows = [ours]
        budgets = []
        if "index_bytes" in ours:
            budgets = [("autofaiss @ our index bytes", ours["index_bytes"])]
            if not args.quick:  # quick mode keeps the equal-index-memory comparison only: half the time
                budgets.append(("autofaiss @ our index + fp16 store bytes", ours["index_bytes"] + ours["store_bytes"]))
            if args.nominal:
                budgets.append(("autofaiss @ nominal budget", ours["budget_bytes"]))
        if args.no_peer:
            budgets = []
        for label, budget in budgets:
            print(f"[d={d} N={n:,}] {label} ({budget / 1e6:.1f} MB)", flush=True)
            rows.append(run_autofaiss(root, label, budget, args))
        case["rows"] = rows
        for row in rows:
            _per_vector(row, n)
        case["goals"] = goals(rows)
        print(table([case]), flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    case["wall_s"] = round(time.perf_counter() - started, 1)
    return case


# --- report -------------------------------------------------------------------------------------
def table(cases: list[dict[str, Any]]) -> str:
    head = (f"{'d':>4} {'N':>9}  {'tool/budget':<42} {'index':<34} {'params':<32} {'build s':>8} {'peak RSS':>9} "
            f"{'idx B/v':>8} {'+fp16':>6} {'R@1':>6} {'R@10':>6} {'1q p50/p99 ms':>14} {'64q p50/p99 ms':>15}")
    lines = [head, "-" * len(head)]
    for case in cases:
        for row in case.get("rows", []):
            prefix = f"{case['dim']:>4} {case['n']:>9,}  {row['label']:<42} "
            if "eval" not in row:
                lines.append(prefix + f"ERROR: {row.get('error', '?')[:120]}")
                continue
            e, b = row["eval"], row["build"]
            s, bt = e["latency_single"], e[f"latency_batch{BATCH}"]
            lines.append(
                prefix + f"{row['index'][:34]:<34} {row['search_params'][:32]:<32} {b['build_s']:>8.1f} "
                f"{b['peak_rss_bytes'] / 2**20:>7.0f}Mi {row['index_bytes_per_vector']:>7.1f}{' *'[not row['within_budget']]} "
                f"{row['store_bytes_per_vector']:>6.0f} {e['recall_at_1']:>6.3f} {e['recall_at_10']:>6.3f} "
                f"{s['p50_ms']:>6.2f}/{s['p99_ms']:<7.2f} {bt['p50_ms']:>7.1f}/{bt['p99_ms']:<7.1f}")
        g = case.get("goals", {})
        if "goal_met" in g:
            checks = "; ".join(f"{c['label'].removeprefix('autofaiss @ ')}: "
                               + (f"recall {'ok' if c['recall_ok'] else 'LOW'}, latency x{c['latency_single_ratio']}/"
                                  f"x{c[f'latency_batch{BATCH}_ratio']} {'ok' if c['latency_single_ok'] and c[f'latency_batch{BATCH}_ok'] else 'SLOWER'}"
                                  if "recall_ok" in c else "n/a")
                               for c in g["vs_autofaiss"])
            lines.append(f"{'':>16}goal {'MET' if g['goal_met'] else 'NOT MET'}: recall@10 {g['recall_at_10']:.3f} "
                         f"(>= {RECALL_GOAL}: {g[f'recall_at_10_ge_{RECALL_GOAL}']}); {checks}")
    lines.append("idx B/v: index file bytes per vector (* = over the budget it was given); +fp16: our re-rank store, "
                 "memory-mapped; latency: one search thread")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="d=384, N=100k, autofaiss at our index bytes only (~10 min on 2 cores)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N values (default 100k 1M; quick 100k)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="d values (default 384 768; quick 384)")
    parser.add_argument("--queries", type=int, default=2048, help="held-out queries (recall, batch latency)")
    parser.add_argument("--single", type=int, default=500, help="queries timed one at a time")
    parser.add_argument("--centres", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1, help="faiss threads for builds")
    parser.add_argument("--search-threads", type=int, default=1, help="faiss threads for searches (both tools)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # --build-ours child
    parser.add_argument("--nominal", action="store_true", help="also run autofaiss at our nominal budget (4 GB)")
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per build/eval subprocess")
    parser.add_argument("--tmp", default=None, help="folder for the temporary data (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data")
    parser.add_argument("--out", default=None, help="result name (default index_quality[_quick])")
    parser.add_argument("--build-ours", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_ours is not None:  # child process: one build, one JSON line
        print(json.dumps(build_ours(args.build_ours, args.threads)))
        return
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000])
    dims = args.dims or ([384] if args.quick else [384, 768])
    from retrieval.settings import Settings

    s = Settings()
    started = time.perf_counter()
    name = args.out or ("index_quality_quick" if args.quick else "index_quality")
    cases: list[dict[str, Any]] = []
    for d in dims:
        for n in sizes:
            cases.append(run_case(n, d, args))
            path = save_result(name, _result(args, s, sizes, dims, cases, started))  # partial results survive
    print(table(cases))
    print(f"total {time.perf_counter() - started:.0f} s -> {path}")


def _result(args: argparse.Namespace, s: Any, sizes: list[int], dims: list[int], cases: list[dict[str, Any]],
            started: float) -> dict[str, Any]:
    return {
        "config": {"sizes": sizes, "dims": dims, "queries": args.queries, "single_queries": args.single,
                   "batch": BATCH, "k": K, "centres": args.centres, "seed": args.seed,
                   "build_threads": args.build_threads, "search_threads": args.search_threads,
                   "nominal_row": args.nominal, "latency_slack": LATENCY_SLACK, "recall_goal": RECALL_GOAL,
                   "settings": {"memory_budget": s.memory_budget, "exact_threshold": s.exact_threshold,
                                "recall_target": s.recall_target}},
        "data": "synthetic clustered unit vectors (no embedding model available here: no real embeddings)",
        "cases": cases,
        "complete": len(cases) == len(sizes) * len(dims),
        "wall_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
