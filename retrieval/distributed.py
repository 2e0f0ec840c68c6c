"""Curation work on a Ray cluster: connect once, run one function over shards, results in order.

Why plain Ray tasks (not Ray Data) here: curation shards are few and large (tens of thousands of
vectors each) and every task reads its rows from the index folder's memory-mapped files, which every
node sees on shared storage; only ids, small parameters and results cross the object store. A task
lost with its node is retried by Ray (tasks are pure: the same shard gives the same result), so a
run survives losing a worker node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from retrieval.errors import RetrievalError

logger = logging.getLogger(__name__)

ENV_ADDRESS = "RETRIEVAL_RAY_ADDRESS"
TASK_RETRIES = 3
_joined: str | None = None  # the address this process's connect() initialised Ray with


def resolve_address(option: str | None) -> str | None:
    """The cluster to use: the --ray option, else RETRIEVAL_RAY_ADDRESS, else None (run locally).

    "auto" joins the cluster this machine belongs to (`ray start` was run here); "local" starts a
    private one-machine Ray instance; anything else is a cluster address (host:port or ray://...).
    """
    value = option if option is not None else os.environ.get(ENV_ADDRESS)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def connect(address: str) -> Any:
    """Join (or start, for "local") the Ray cluster; one clear line if Ray is missing or unreachable, or
    if this process is already connected to another cluster (Ray holds one per process)."""
    try:
        import ray
    except ImportError:
        raise RetrievalError("--ray needs Ray: pip install 'retrieval[ray]'") from None
    global _joined
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        gcs = ray.get_runtime_context().gcs_address
        if address not in ("auto", gcs, _joined) and (_joined is not None or address != "local"):
            raise RetrievalError(f"this process already uses the Ray cluster at {gcs} and cannot also join "
                                 f"{address!r}: use one cluster per process", "conflict")
        return ray
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 logging_level=logging.WARNING, include_dashboard=False if address == "local" else None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetrievalError(f"cannot reach the Ray cluster at {address!r}: {first}") from None
    _joined = address
    resources = ray.cluster_resources()
    logger.info("Ray cluster: %d node(s), %s CPUs, %s GPUs", len(ray.nodes()), resources.get("CPU", 0),
                resources.get("GPU", 0))
    return ray


def shards(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in pieces of at most `size`."""
    if size < 1:
        raise ValueError(f"shard size must be positive, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def map_shards(address: str, fn: Callable[..., Any], pieces: Sequence[Any], *shared: Any,
               num_cpus: float = 1.0, progress: bool = False, desc: str = "shards") -> list[Any]:
    """[fn(piece, *shared) for piece in pieces], each call a Ray task; results in the order of `pieces`.

    `shared` arguments are put in the object store once, not shipped with every task. `fn` must be
    importable by the workers (defined in the installed package, not in a script or a test module).
    """
    results: list[Any] = [None] * len(pieces)
    for i, result in imap_shards(address, fn, pieces, *shared, num_cpus=num_cpus, progress=progress, desc=desc):
        results[i] = result
    return results


def imap_shards(address: str, fn: Callable[..., Any], pieces: Sequence[Any], *shared: Any,
                num_cpus: float = 1.0, progress: bool = False, desc: str = "shards") -> Iterator[tuple[int, Any]]:
    """(position, fn(piece, *shared)) for each piece, as the Ray tasks finish (in any order).

    Each result's object reference is dropped once it is handed out, so a caller that writes each
    result away holds one at a time, in the driver and in the object store.
    """
    from tqdm import tqdm

    ray = connect(address)
    remote = ray.remote(num_cpus=num_cpus, max_retries=TASK_RETRIES, retry_exceptions=False)(_call)
    refs_shared = [ray.put(x) for x in shared]
    index_of = {remote.remote(fn, piece, *refs_shared): i for i, piece in enumerate(pieces)}
    pending = list(index_of)
    with tqdm(total=len(pending), desc=desc, unit="shard", disable=not progress) as bar:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            i = index_of.pop(ref)
            result = ray.get(ref)
            del ref
            bar.update(1)
            yield i, result
            del result


def _call(fn: Callable[..., Any], piece: Any, *shared: Any) -> Any:
    """The task body: `fn` travels by reference (any importable callable, builtins included)."""
    return fn(piece, *shared)
