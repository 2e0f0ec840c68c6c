"""An IVF index built across a Ray cluster: trained on a sample in one task, filled in shards, merged.

Why this shape (autofaiss's recipe): training needs only a sample, so one task does it; adding
is embarrassingly parallel once the coarse quantizer is fixed, so each task adds one contiguous
range of ids (read from the memory-mapped vector file on shared storage) to a copy of the trained
empty index and hands back its inverted lists; the driver merges them in shard order. Merging
appends every list's entries in that order, so each inverted list holds the same (id, code)
entries in the same order as a local build with the same trained index: searches return the
same results.

When the merged lists would not fit the memory budget, they are merged instead into
OnDiskInvertedLists (as faiss.contrib.ondisk.merge_ondisk does) in a `.ivfdata` file beside the
FAISS file, which the index then maps instead of holding in RAM; each shard is written to disk as
its task finishes, so the driver never holds more than one. A local build past the memory budget
takes the same path, its shards added one after the other in this process.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np

from retrieval import ann
from retrieval.vectors import VectorStore

logger = logging.getLogger(__name__)

ADD_SHARD = 262_144  # ids per add task: a few seconds of work each, few enough tasks to merge


def is_ivf(index: Any) -> bool:
    """An index whose contents live in inverted lists (IVF-*, also behind a pre-transform)."""
    import faiss

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> Any:
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def train_task(sample_ids: np.ndarray, spec: ann.IndexSpec, vectors: VectorStore) -> bytes:
    """A Ray task: the empty index of `spec` trained on the stored vectors of `sample_ids`."""
    index = ann.new_index(spec)  # made here: FAISS does not serialise the training parameters it sets
    index.train(vectors.read(sample_ids))  # on the node's GPUs when it has some (see ann.new_index)
    return serialize(index)  # the GPU clustering index, if any, is not part of what FAISS writes


def add_task(ids: np.ndarray, trained: bytes, vectors: VectorStore) -> bytes:
    """A Ray task: the trained index with the vectors of `ids` added, in the order of `ids`."""
    index = deserialize(trained)
    for chunk_ids, chunk in vectors.iter_batches(ids):
        ann.add(index, chunk_ids, chunk)
    return serialize(index)


def train_on_ray(address: str, spec: ann.IndexSpec, sample_ids: np.ndarray, vectors: VectorStore) -> Any:
    """The trained empty index, trained in one task on whichever node Ray picks."""
    from retrieval.distributed import map_shards

    logger.info("training %s on %d vectors (one Ray task)", spec.factory, len(sample_ids))
    (data,) = map_shards(address, train_task, [np.asarray(sample_ids, np.int64)], spec, vectors, desc="training")
    return deserialize(data)


def merged_bytes(index: Any, n: int) -> int:
    """What the inverted lists of `n` vectors take in RAM: a code and an id per vector."""
    import faiss

    return n * (faiss.extract_index_ivf(index).code_size + 8)


def add_in_shards(address: str | None, trained: Any, ids: np.ndarray, vectors: VectorStore,
                  ivfdata: Path | None = None, shard: int | None = None, progress: bool = False) -> Any:
    """`trained` filled with the vectors of `ids`, added in shards and merged in shard order.

    Each shard is a Ray task on `address`, or, when `address` is None, added in this process one
    after the other. `ivfdata`, when given, is where the merged lists go on disk
    (OnDiskInvertedLists) instead of RAM: each shard is then written to a work folder as soon as
    it arrives, so the driver holds one shard at a time, never all of them.
    """
    from retrieval.distributed import imap_shards, shards

    ids = np.asarray(ids, dtype=np.int64)
    pieces = [ids[a:b] for a, b in shards(len(ids), shard or ADD_SHARD)]
    blob = serialize(trained)
    if address is not None:
        results = imap_shards(address, add_task, pieces, blob, vectors, progress=progress, desc="adding")
    else:
        results = ((i, add_task(piece, blob, vectors)) for i, piece in enumerate(pieces))
    if ivfdata is not None:
        return merge_on_disk(trained, results, ivfdata)
    parts: list[bytes] = [b""] * len(pieces)
    for i, data in results:
        parts[i] = data
    return merge(trained, parts)


def add_on_ray(address: str, trained: Any, ids: np.ndarray, vectors: VectorStore, ivfdata: Path | None = None,
               shard: int | None = None, progress: bool = False) -> Any:
    """`add_in_shards` with every shard a Ray task on `address`."""
    return add_in_shards(address, trained, ids, vectors, ivfdata, shard, progress)


def merge(trained: Any, parts: list[bytes]) -> Any:
    """The shards' lists appended in order into `trained` (which must be empty), in RAM."""
    import faiss

    index = trained
    for i in range(len(parts)):
        shard = deserialize(parts[i])
        parts[i] = b""  # let each shard's bytes go as soon as it is merged
        faiss.merge_into(index, shard, False)
    return index


def merge_on_disk(trained: Any, results: Iterable[tuple[int, bytes]], ivfdata: Path) -> Any:
    """The shards (`(position, serialised index)` in any order) merged in position order into
    OnDiskInvertedLists in the new file `ivfdata`; the index then maps that file.

    Each shard goes to a temporary file in a work folder beside `ivfdata` as it arrives (memory-mapped
    while merging, so the shards never sit in RAM together). Each build writes a new lists file (see
    `ivfdata_path`): the previous index keeps its own until the new one is renamed into place.
    """
    ivfdata = Path(ivfdata).resolve()
    work = Path(tempfile.mkdtemp(prefix=f".{ivfdata.name}.shards-", dir=ivfdata.parent))
    try:
        files: dict[int, Path] = {}
        for i, data in results:
            files[i] = work / f"shard-{i:05d}.faiss"
            files[i].write_bytes(data)
            del data  # one shard's bytes at a time in the driver
        merge_files_on_disk(trained, [files[i] for i in sorted(files)], ivfdata)
    except BaseException:
        ivfdata.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return trained


def merge_files_on_disk(trained: Any, files: list[Path], ivfdata: Path) -> None:
    """faiss.contrib.ondisk.merge_ondisk, except that the shard indexes are freed right after the
    merge: merge_ondisk keeps their lists mapped until the process exits, so the deleted shard
    files would hold their disk space for as long as the driver lives."""
    import faiss

    ivf = faiss.extract_index_ivf(trained)
    if ivf.ntotal != 0:
        raise ValueError("the trained index must be empty before merging shards into it")
    shard_indexes = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in files]
    lists = faiss.InvertedListsPtrVector()
    for shard_index in shard_indexes:
        lists.push_back(faiss.extract_index_ivf(shard_index).invlists)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ntotal = invlists.merge_from_multiple(lists.data(), lists.size(), False, False)
    del lists, shard_indexes  # unmaps the shard files (each index owns its lists)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # the index owns it now
    ivf.ntotal = trained.ntotal = ntotal


def ivfdata_path(faiss_path: Path) -> Path:
    """A new lists file for an on-disk build of `faiss_path` (the FAISS file records its name)."""
    return faiss_path.with_name(f"{faiss_path.name}.{time.time_ns()}.ivfdata")


def remove_stale_ivfdata(faiss_path: Path, keep: str | None) -> None:
    """Delete the lists files of earlier on-disk builds of `faiss_path` (all of them when `keep` is None).

    Safe once the new FAISS file is in place: a reader still mapping an old file keeps its pages.
    """
    for f in faiss_path.parent.glob(f"{faiss_path.name}.*.ivfdata"):
        if keep is None or f.resolve() != Path(keep).resolve():
            f.unlink(missing_ok=True)
