"""From graph edges to reviewed duplicate groups: components, keep policy, chain safety, scores.

Nodes are positions: 0..n-1 are corpus images, n..n+m-1 reference files.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, overload

import numpy as np

from retrieval.curation.graph import Edges
from retrieval.curation.hashing import hamming
from retrieval.curation.policy import Candidate, choose

logger = logging.getLogger(__name__)

PAIRWISE_BLOCK = 4096


class PathColumn(Sequence[str]):
    """Strings packed into one UTF-8 buffer with int64 offsets, decoded one at a time on access.

    At ten million images a list of Python str objects costs ~75 bytes a path beyond its text; here
    a path costs its UTF-8 bytes plus an 8-byte offset. Lone surrogates (undecodable file names)
    round-trip (surrogatepass). Contiguous slices share the buffer.
    """

    __slots__ = ("_buf", "_offsets")

    def __init__(self, buf: np.ndarray, offsets: np.ndarray) -> None:
        self._buf = buf  # uint8
        self._offsets = offsets  # int64, len(self) + 1 entries, ascending

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> PathColumn:
        encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    @classmethod
    def of(cls, strings: Sequence[str]) -> PathColumn:
        """`strings` itself when it is a PathColumn already (no copy)."""
        return strings if isinstance(strings, PathColumn) else cls.from_strings(strings)

    @classmethod
    def concat(cls, parts: Sequence[Sequence[str]]) -> PathColumn:
        """One new column holding every part in order (reference paths after the corpus's)."""
        cols = [cls.of(p) for p in parts]
        bufs = [c._buf[c._offsets[0] : c._offsets[-1]] for c in cols]
        shifts = np.cumsum([0] + [len(b) for b in bufs])
        offsets = np.concatenate([np.zeros(1, np.int64)]
                                 + [c._offsets[1:] - c._offsets[0] + shift for c, shift in zip(cols, shifts)])
        return cls(np.concatenate(bufs) if bufs else np.empty(0, np.uint8), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> PathColumn: ...

    def __getitem__(self, i: int | slice) -> str | PathColumn:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return PathColumn.from_strings(self[j] for j in range(start, stop, step))
            return PathColumn(self._buf, self._offsets[start : max(start, stop) + 1])
        n = len(self)
        j = operator.index(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"path {i} of {n}")
        a, b = self._offsets[j], self._offsets[j + 1]
        return self._buf[a:b].tobytes().decode("utf-8", "surrogatepass")

    def __add__(self, other: Sequence[str]) -> PathColumn:
        return PathColumn.concat([self, other])

    def __eq__(self, other: object) -> bool:
        """Element-wise against any sequence of strings (a list compares equal to its PathColumn)."""
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        head = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"PathColumn([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"

    @property
    def nbytes(self) -> int:
        """Bytes held for the strings of this column (a slice counts only its share)."""
        return int(self._offsets[-1] - self._offsets[0]) + self._offsets.nbytes

    def parked(self) -> PathColumn:
        """The same column in memory-mapped temporary files (Nodes.parked)."""
        return PathColumn(parked_array(self._buf), parked_array(self._offsets))


@dataclass
class Nodes:
    """Facts about every node; arrays indexed by position.

    Compact, because at ten million images this table stays resident for the whole run: paths in
    a PathColumn (a list of str works too, e.g. in tests), sha256 as fixed-width content keys
    (retrieval.curation.hashing.content_keys; object arrays of hex text work too), width and
    height as int32.
    """

    image_id: np.ndarray  # -1 for references
    path: Sequence[str]  # a PathColumn (or list) relative to `root`; full paths / URIs for references
    sha256: np.ndarray  # equal values <=> identical bytes (content keys: a missing digest equals nothing)
    phash: np.ndarray  # signed int64
    width: np.ndarray
    height: np.ndarray
    size: np.ndarray
    mtime_ns: np.ndarray
    is_ref: np.ndarray
    root: Path | None = None  # the corpus folder, where members can be symbolic links (None: not local)

    def __len__(self) -> int:
        return len(self.path)

    def parked(self) -> Nodes:
        """The same table with its columns (image ids aside) in temporary files, memory-mapped read-only.

        A stage that needs none of the table (the k-NN graph) then runs beside it without holding
        it: its pages come back as they are touched, and until then are the kernel's to drop, not
        this process's memory. The caller drops the unparked table. Where the temporary folder
        cannot take it (full, read-only), the table stays as it is."""
        try:
            path = self.path.parked() if isinstance(self.path, PathColumn) else self.path
            arrays = {name: parked_array(getattr(self, name))
                      for name in ("sha256", "phash", "width", "height", "size", "mtime_ns", "is_ref")}
        except OSError as exc:
            logger.warning("the node table stays in memory during the graph: its temporary files failed (%s)", exc)
            return self
        return Nodes(image_id=self.image_id, path=path, root=self.root, **arrays)

    def candidate(self, p: int) -> Candidate:
        # A link is looked at only for group members: a link never wins over a real file (moving the
        # real file out would leave the kept link dangling).
        is_link = self.root is not None and not self.is_ref[p] and os.path.islink(self.root / self.path[p])
        return Candidate(int(self.image_id[p]), self.path[p], int(self.size[p]), int(self.width[p]),
                         int(self.height[p]), int(self.mtime_ns[p]), is_link)


def parked_array(a: np.ndarray) -> np.ndarray:
    """A read-only memory map of a copy of `a` in an unlinked temporary file: the mapping keeps the
    file alive and nothing is left on disk, whatever ends the process."""
    import tempfile

    a = np.ascontiguousarray(a)
    if not a.nbytes:
        return a
    with tempfile.TemporaryFile(prefix="retrieval-nodes-") as f:
        a.tofile(f)
        f.flush()
        return np.memmap(f, dtype=a.dtype, mode="r", shape=a.shape)


@dataclass
class Member:
    pos: int
    action: str  # keep or remove
    similarity: float  # exact cosine to the representative (to the nearest reference in reference groups)
    reason: str  # representative, exact, phash, pdq, copy, verified, embedding, reference


@dataclass
class Group:
    members: list[Member]
    representative: int | None  # position; None when a reference wins
    weakest_edge: float
    min_pairwise: float
    touches_reference: bool
    reasons: list[str] = field(default_factory=list)


def components(n_nodes: int, edges: Edges) -> list[np.ndarray]:
    """Connected components with at least two nodes, largest first, then by smallest node; nodes ascending.

    scipy's connected_components over the edge list (compiled), restricted to the nodes that have
    an edge, so a split of a small group does not pay for every node of the corpus.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(edges):
        return []
    src, dst = np.asarray(edges.src, np.int64), np.asarray(edges.dst, np.int64)
    if len(src) and max(int(src.max()), int(dst.max())) >= n_nodes:
        raise ValueError(f"an edge names node {max(int(src.max()), int(dst.max()))} of {n_nodes}")
    nodes, local = np.unique(np.r_[src, dst], return_inverse=True)
    m = len(nodes)
    graph = coo_matrix((np.ones(len(src), np.int8), (local[: len(src)], local[len(src) :])), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")  # nodes ascending within a label
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    groups = [nodes[g] for g in np.split(order, starts[1:]) if len(g) >= 2]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def weakest_edge(nodes: np.ndarray, edges: Edges) -> float:
    """The bottleneck of the group: the lowest similarity on its maximum spanning tree."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    if len(nodes) < 2 or not len(edges):
        return 1.0
    local = {int(p): i for i, p in enumerate(nodes)}
    a = np.array([local[int(x)] for x in edges.src])
    b = np.array([local[int(x)] for x in edges.dst])
    w = 2.0 - edges.sim.astype(np.float64)  # positive weights; the minimum tree of 2-s is the maximum tree of s
    mst = minimum_spanning_tree(coo_matrix((w, (a, b)), shape=(len(nodes), len(nodes))))
    return float(2.0 - mst.data.max()) if mst.nnz else 1.0


def min_pairwise(vectors: np.ndarray) -> float:
    """Lowest cosine between any two rows, in blocks so a big group stays in bounded memory."""
    if len(vectors) < 2:
        return 1.0
    low = np.inf
    for start in range(0, len(vectors), PAIRWISE_BLOCK):
        block = vectors[start : start + PAIRWISE_BLOCK] @ vectors.T
        for i in range(len(block)):
            block[i, start + i] = np.inf
        low = min(low, float(block.min()))
    return min(low, 1.0)


def _member_reason(nodes: Nodes, p: int, rep: int, phash_distance: int) -> str:
    if nodes.sha256[p] == nodes.sha256[rep]:
        return "exact"
    if phash_distance >= 0 and hamming(int(nodes.phash[p]), int(nodes.phash[rep])) <= phash_distance:
        return "phash"
    return "embedding"


def _sub_edges(edges: Edges, keep: np.ndarray) -> Edges:
    mask = np.isin(edges.src, keep) & np.isin(edges.dst, keep)
    return Edges(edges.src[mask], edges.dst[mask], edges.sim[mask])


def build_groups(nodes: Nodes, edges: Edges, vectors_of: Callable[[np.ndarray], np.ndarray], policy: str,
                 phash_distance: int, max_group_diameter: float | None = None,
                 exact_links: set[tuple[int, int]] | None = None) -> list[Group]:
    """Components of the graph, each split until every member is within the diameter of its representative."""
    edges = edges.canonical()
    comps = components(len(nodes), edges)
    if not comps:
        return []
    labels = np.full(len(nodes), -1, dtype=np.int64)
    for i, c in enumerate(comps):
        labels[c] = i
    order = np.argsort(labels[edges.src], kind="stable")
    edge_labels = labels[edges.src][order]
    bounds = np.searchsorted(edge_labels, np.arange(len(comps) + 1))
    groups: list[Group] = []
    for i, comp in enumerate(comps):
        sel = order[bounds[i] : bounds[i + 1]]
        todo = [(np.sort(comp), Edges(edges.src[sel], edges.dst[sel], edges.sim[sel]))]
        while todo:
            members, sub = todo.pop()
            group, rest = _one_group(nodes, members, sub, vectors_of, policy, phash_distance, max_group_diameter,
                                     exact_links or set())
            if group.members:
                groups.append(group)
            if len(rest):
                rest_edges = _sub_edges(sub, rest)
                for c in components(len(nodes), rest_edges) if len(rest_edges) else []:
                    todo.append((np.sort(c), _sub_edges(rest_edges, c)))
    groups.sort(key=lambda g: (-len(g.members), min(m.pos for m in g.members)))
    return groups


def _one_group(nodes: Nodes, members: np.ndarray, sub: Edges, vectors_of: Callable[[np.ndarray], np.ndarray],
               policy: str, phash_distance: int, max_diameter: float | None,
               exact_links: set[tuple[int, int]]) -> tuple[Group, np.ndarray]:
    vecs = vectors_of(members)
    refs = members[nodes.is_ref[members]]
    touches = len(refs) > 0
    if touches:
        ref_rows = np.flatnonzero(nodes.is_ref[members])
        sims = np.minimum((vecs @ vecs[ref_rows].T).max(axis=1), 1.0)
        rep = None
    else:
        rep = choose([nodes.candidate(int(p)) for p in members], policy)
        rep_pos = int(members[[nodes.image_id[p] == rep.id for p in members].index(True)])
        sims = np.minimum(vecs @ vecs[int(np.flatnonzero(members == rep_pos)[0])], 1.0)
        rep = rep_pos
    rest = np.empty(0, np.int64)
    if max_diameter is not None:
        far = (1.0 - sims) > max_diameter
        if touches:
            far &= ~nodes.is_ref[members]
        else:
            far &= members != rep
        rest, members, vecs, sims = members[far], members[~far], vecs[~far], sims[~far]
        sub = _sub_edges(sub, members)
    out: list[Member] = []
    for p, s in zip(members.tolist(), sims.tolist()):
        if nodes.is_ref[p]:
            out.append(Member(p, "keep", 1.0, "reference"))
        elif touches:
            out.append(Member(p, "remove", float(s), "reference"))
        elif p == rep:
            out.append(Member(p, "keep", 1.0, "representative"))
        else:
            linked = (min(p, rep), max(p, rep)) in exact_links
            out.append(Member(p, "remove", float(s), "exact" if linked else _member_reason(nodes, p, rep, phash_distance)))
    if len(out) < 2:  # everything else split off: a single image is not a group
        out = []
    group = Group(members=out, representative=rep, weakest_edge=weakest_edge(members, sub) if out else 1.0,
                  min_pairwise=min_pairwise(vecs) if out else 1.0, touches_reference=touches,
                  reasons=sorted({m.reason for m in out if m.action == "remove"}))
    return group, rest
