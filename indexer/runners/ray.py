"""The Ray runner: the index update's stages (retrieval.indexer.stages) as a Ray Data pipeline; the driver commits.

    plan on the driver (as a local run) -> model batches, one shard (Ray Data block) each
    -> read + hash + decode (fractional-CPU tasks, on the nodes that hold the files)
    -> embed the search role (an actor pool: the model loaded once per actor, one GPU each when the
       cluster has GPUs) -> embed the copy role (a second pool, when the index has one)
    -> vectors and row data back to the driver, which commits batch by batch, in plan order.

Why the driver commits (rather than workers writing vector shards that the driver then adopts):
ids are handed out at commit time in plan order exactly as the local runner does, so both runners
give the same ids, the same rows and the same vector files, and today's crash safety (vectors
fsynced inside the transaction that makes their ids visible) holds unchanged, with the database and
the index folder on the driver's disk only: workers need read access to the source and the model,
no shared storage. Only fp16 vectors and row data travel back (a few KB per image), not pixels.

Resume: what was committed stays committed, so a rerun plans only the rest. Killing the driver
costs the batches in flight (decoded or embedded but not yet committed); losing a worker node
costs nothing but time: Ray retries its tasks and restarts its actors elsewhere. A block that
still fails after Ray's retries (a decoder that crashes its worker, say) is dropped by Ray Data
and its batches are done at the end on the driver, each file decoded in isolation, so the crash
costs one file as in a local run. Files whose last decoding crashed are done that way first.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from retrieval.indexer.overlap import add_counts
from retrieval.indexer.runners import local
from retrieval.indexer.stages import Commit, Decode, EmbedCopy, EmbedSearch, ReachWatch
from retrieval.indexer.writer import BatchCounts

from retrieval.distributed import connect
from retrieval.errors import RetrievalError
from retrieval.imaging.decode import DecodeResult, DecodeSpec, WorkItem
from retrieval.layout import IndexLayout
from retrieval.settings import Settings
from retrieval.sources import Source
from retrieval.store import Store
from retrieval.vectors import role_vectors

if TYPE_CHECKING:
    from retrieval.indexer.options import IndexOptions, IndexSummary

logger = logging.getLogger(__name__)

BATCHES_PER_SHARD = 1  # model batches per shard (one Ray Data block): the unit Ray schedules and retries
DECODE_CPUS = 0.25  # logical CPUs per decode task: never starve the tasks beside the embed actors
EMBED_CPUS = 0.25  # logical CPUs per embed actor on CPU-only clusters (its threads use the node's cores)

Row = dict[str, Any]


def update(corpus: Path | str, settings: Settings, *, rebuild: bool = False, retry_failed: bool = False,
           index_factory: str | None = None, progress: bool = True, address: str = "auto") -> IndexSummary:
    """Index (or update the index of) `corpus`, decoding and embedding on the Ray cluster at `address`.

    Registered as the `retrieval.updaters` entry point "ray" (retrieval.Index.update(..., ray=...)).
    """
    from retrieval.indexer.pipeline import IndexOptions, run_index

    return run_index(IndexOptions(corpus=corpus, settings=settings, rebuild=rebuild, retry_failed=retry_failed,
                                  index_factory=index_factory, progress=progress, ray=address),
                     runner=sys.modules[__name__])


# --- what runs on the workers (importable: Ray pickles these by reference) ----------------------

def decode_row(row: Row, decode: Decode) -> Row:
    """One model batch of work items -> its decoded results and uint8 pixels (failures as data)."""
    items: list[WorkItem] = pickle.loads(row["items"])
    results: list[DecodeResult] = []
    pixels: list[Any] = []
    for part, part_pixels in decode(items):
        results.extend(part)
        if part_pixels is not None:
            pixels.append(part_pixels.numpy())
    batch = np.concatenate(pixels) if len(pixels) > 1 else (pixels[0] if pixels else None)
    return {"chunk": row["chunk"], "data": pickle.dumps((results, batch, None, None), protocol=5)}


class EmbedRow:
    """Actor: one role's vectors (fp16: what the vector files store) for one decoded batch."""

    def __init__(self, role: str, model_ref: str, device: str, precision: str, fingerprint: str):
        _use_node_cores(device)
        self.role = role
        stage = EmbedSearch if role == "search" else EmbedCopy
        self.stage = stage(model_ref=model_ref, device=device, precision=precision, fingerprint=fingerprint)

    def __call__(self, row: Row) -> Row:
        results, pixels, vecs, copy_vecs = pickle.loads(row["data"])
        if self.role == "search":
            vecs = self.stage(pixels).astype(np.float16)
        else:
            copy_vecs = self.stage(results).astype(np.float16)
        return {"chunk": row["chunk"], "data": pickle.dumps((results, None, vecs, copy_vecs), protocol=5)}


def _use_node_cores(device: str) -> None:
    """On CPU, an actor's forward passes use every core of its node, like the local runner's."""
    import os

    if not device.startswith("cuda"):
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))


# --- the driver ---------------------------------------------------------------------------------

def shard_count(n_batches: int) -> int:
    """Ray Data blocks for `n_batches` model batches: BATCHES_PER_SHARD each.

    A block is what one task decodes and one actor embeds in a row, and what reaches the driver at
    once: one batch per block keeps every stage streaming (decoding beside embedding, commits as
    batches arrive); a 384-image run in one block was decoded by one task, embedded by one actor
    and committed at the very end.
    """
    return max(1, -(-n_batches // BATCHES_PER_SHARD))


def _embed_actors(ray: Any) -> tuple[int, float, float]:
    """(pool size, GPUs per actor, CPUs per actor): one actor per GPU, else one per node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, 1.0, 1.0
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(1, nodes), 0.0, EMBED_CPUS


def build_dataset(ray: Any, batches: list[list[WorkItem]], decode: Decode, search: dict[str, str],
                  copy: dict[str, str] | None) -> Any:
    """The Ray Data pipeline over `batches` (rows: one model batch each, in plan order)."""
    import functools

    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    rows = [{"chunk": i, "items": pickle.dumps(b, protocol=5)} for i, b in enumerate(batches)]
    ds = ray.data.from_items(rows, override_num_blocks=shard_count(len(batches)))
    # Ray's defaults do the retrying: a task is retried a few times, an actor restarted without limit.
    # At most one decode task per CPU of the cluster: each runs in a worker process that imports
    # torch, and more of them at once only delay the first batches (they share the same cores).
    ds = ds.map(functools.partial(decode_row, decode=decode), num_cpus=DECODE_CPUS,
                compute=TaskPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1)))))
    size, gpus, cpus = _embed_actors(ray)
    pool = dict(compute=ActorPoolStrategy(min_size=1, max_size=size), num_cpus=cpus, num_gpus=gpus,
                ray_remote_args_fn=functools.partial(dict, scheduling_strategy="SPREAD"))
    ds = ds.map(EmbedRow, fn_constructor_kwargs=dict(role="search", **search), **pool)
    if copy is not None:
        ds = ds.map(EmbedRow, fn_constructor_kwargs=dict(role="copy", **copy), **pool)
    return ds


def embed_all(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
              timings: dict[str, float], crashed: set[str], copy: Any = None) -> BatchCounts:
    """Decode and embed `items` on the cluster; commit here, batch by batch, in plan order."""
    from tqdm import tqdm

    s = opts.settings
    t = time.perf_counter()
    ray = connect(str(opts.ray))
    timings["ray_connect_s"] = time.perf_counter() - t
    layout = IndexLayout(Path(s.index_dir))
    spec = DecodeSpec(search=embedder.preprocess, copy=copy.prepare if copy is not None else None)
    commit = Commit(store, role_vectors(layout, "search", embedder.dim),
                    role_vectors(layout, "copy", copy.dim) if copy is not None else None)
    search_local = EmbedSearch(embedder)
    copy_local = EmbedCopy(copy) if copy is not None else None
    watch = ReachWatch(source.describe())
    total = BatchCounts()
    wait = write = 0.0

    def put(results: list[DecodeResult], vecs: np.ndarray, copy_vecs: np.ndarray | None) -> None:
        nonlocal write
        t1 = time.perf_counter()
        add_counts(total, commit(results, vecs, copy_vecs))
        write += time.perf_counter() - t1
        timings.setdefault("first_batch_s", t1 - loop_start)  # cluster warm-up: workers, models, first batch
        bar.update(len(results))
        if total.failed:
            bar.set_postfix(failed=total.failed, refresh=False)
        watch(results)

    def on_driver(part: list[WorkItem]) -> None:
        """Decode in isolation (each file in a helper process), embed with the driver's models, commit."""
        decode = Decode(source, spec, s.max_pixels, s.batch_size, suspects={it.path for it in part},
                        timeout_s=s.decode_timeout_s or None)
        for results, pixels in decode(part):
            put(results, search_local(pixels), copy_local(results) if copy_local is not None else None)

    # As the local loader does: files whose last decoding crashed go first, each in isolation.
    first = [it for it in items if it.path in crashed]
    rest = [it for it in items if it.path not in crashed]
    batches = [rest[i : i + s.batch_size] for i in range(0, len(rest), s.batch_size)]
    loop_start = time.perf_counter()
    with tqdm(total=len(items), unit="img", desc="indexing (ray)", disable=not opts.progress,
              dynamic_ncols=True, smoothing=0.1) as bar:
        if first:
            logger.warning("decoding %d file(s) in isolation on the driver first: their last decoding crashed "
                           "or was cut short", len(first))
            on_driver(first)
        if batches:
            remote_decode = Decode(source.uri, spec, s.max_pixels, s.batch_size,
                                   timeout_s=s.decode_timeout_s or None)
            search = dict(model_ref=embedder.model_ref, device=s.device, precision=s.precision,
                          fingerprint=embedder.fingerprint)
            copy_args = (dict(model_ref=copy.model_ref, device=s.device, precision=s.precision,
                              fingerprint=copy.fingerprint) if copy is not None else None)
            ready: dict[int, tuple[Any, ...]] = {}
            following = 0
            # A dataset copies the current DataContext when it is created, so these are set first:
            # a batch that still fails after Ray's retries is skipped (and redone on the driver below),
            # and rows arrive in plan order, so the driver commits as they come and holds few of them.
            context = ray.data.DataContext.get_current()
            errored_before, context.max_errored_blocks = context.max_errored_blocks, -1
            order_before = context.execution_options.preserve_order
            context.execution_options.preserve_order = True
            try:
                ds = build_dataset(ray, batches, remote_decode, search, copy_args)
                t = time.perf_counter()
                for row in ds.iter_rows():
                    wait += time.perf_counter() - t
                    ready[int(row["chunk"])] = pickle.loads(row["data"])
                    while following in ready:  # in plan order: the same ids as a local run
                        results, _, vecs, copy_vecs = ready.pop(following)
                        put(results, vecs, copy_vecs)
                        following += 1
                    t = time.perf_counter()
            except RetrievalError:
                raise
            except Exception as exc:  # Ray wraps our errors (UserCodeException ...): one line, ours if any
                raise _one_line(exc) from exc
            finally:
                context.max_errored_blocks = errored_before
                context.execution_options.preserve_order = order_before
            lost = [i for i in range(following, len(batches)) if i not in ready]
            if lost:
                logger.warning("%d batch(es) failed on the cluster after retries; decoding them on the driver, "
                               "each file in isolation", len(lost))
            for i in range(following, len(batches)):
                if i in ready:
                    results, _, vecs, copy_vecs = ready.pop(i)
                    put(results, vecs, copy_vecs)
                else:
                    on_driver(batches[i])
    timings.update(decode_wait_s=wait, write_s=write, embed_loop_s=time.perf_counter() - loop_start)
    return total


def _one_line(exc: BaseException) -> RetrievalError:
    """The RetrievalError a worker raised (Ray wraps it, maybe twice), or one line naming the failure."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, RetrievalError):
            return cause
        cause = cause.__cause__ or cause.__context__
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return RetrievalError(f"the Ray cluster failed to index: {type(exc).__name__}: {first}", kind="unavailable")


def add_copy_role(opts: IndexOptions, source: Source, copy: Any, store: Store, layout: IndexLayout) -> int:
    """Adding a copy model to an existing index embeds only that role: done on the driver (the local stages)."""
    return local.add_copy_role(opts, source, copy, store, layout)
