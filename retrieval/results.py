"""The typed results of the Python API (`retrieval.Index`): plain dataclasses, DataFrames on request.

Each result is what the matching CLI command prints (as text or `--json`); `to_pandas()` turns
its rows into a pandas DataFrame when pandas is installed (it is not a dependency).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.search import Hit

__all__ = ["Hit", "SearchResult", "DedupMember", "DedupGroup", "DedupResult", "ClusterResult", "CuratedImage",
           "CurationResult", "ExportResult"]


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise RetrievalError("to_pandas() needs pandas: pip install pandas") from None
    return pd.DataFrame(rows, columns=columns)


def _columns(cls: type) -> list[str]:
    return [f for f in cls.__dataclass_fields__ if not f.startswith("_")]


@dataclass
class SearchResult:
    """The nearest indexed images of one query, best first; scores are exact cosines in [-1, 1].

    `answered_from` says how the query became a vector: "stored vector of id 7", "embedded file", ...
    """

    query: str
    answered_from: str
    hits: list[Hit]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.hits)

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]

    def to_pandas(self) -> Any:
        """One row per hit: rank (1 = nearest), id, path, score, width, height, format."""
        return _frame([{"rank": r, **asdict(h)} for r, h in enumerate(self.hits, 1)], ["rank", *_columns(Hit)])


@dataclass
class DedupMember:
    """One image (or reference file) of a duplicate group and what happens to it."""

    image_id: int | None  # None for a reference file (dedup against a folder)
    path: str
    reference: bool
    action: str  # keep or remove
    similarity: float  # exact cosine to the group's representative
    reason: str  # exact, phash, embedding, reference, or representative
    reviewed: bool = False  # the action is a person's decision from the review page, not the keep rule's


@dataclass
class DedupGroup:
    """A set of copies: one member is kept (none when the group touches a reference file)."""

    group: int  # 1-based within the run, largest first
    size: int
    representative_id: int | None
    reasons: list[str]
    weakest_edge: float
    min_pairwise_similarity: float
    touches_reference: bool
    members: list[DedupMember]


@dataclass
class DedupResult:
    """A stored dedup run: its groups, counts (`summary`) and the versioned duplicates.json `document`."""

    run_id: int
    reused: bool
    summary: dict[str, Any]
    groups: list[DedupGroup]
    reference_failures: list[Any]
    document: dict[str, Any] = field(repr=False)

    @classmethod
    def from_document(cls, doc: dict[str, Any], reused: bool) -> "DedupResult":
        groups = [DedupGroup(group=g["group"], size=g["size"], representative_id=g["representative_id"],
                             reasons=list(g["reasons"]), weakest_edge=g["weakest_edge"],
                             min_pairwise_similarity=g["min_pairwise_similarity"],
                             touches_reference=g["touches_reference"],
                             members=[DedupMember(**m) for m in g["members"]])
                  for g in doc["groups"]]
        return cls(run_id=doc["run"]["id"], reused=reused, summary=dict(doc["summary"]), groups=groups,
                   reference_failures=list(doc["reference_failures"]), document=doc)

    @property
    def to_remove(self) -> list[str]:
        """Corpus-relative paths of the images marked remove (what `--apply` moves away)."""
        return [m.path for g in self.groups for m in g.members if m.action == "remove" and not m.reference]

    def to_pandas(self) -> Any:
        """One row per group member, with its group's number, size and reasons."""
        rows = [{"group": g.group, "group_size": g.size, "reasons": ",".join(g.reasons), **asdict(m)}
                for g in self.groups for m in g.members]
        return _frame(rows, ["group", "group_size", "reasons", *_columns(DedupMember)])


@dataclass
class ClusterResult:
    """A stored clustering run: `sizes[c]` images in cluster c (spherical k-means over the embeddings)."""

    run_id: int
    k: int
    n_images: int
    reused: bool
    sizes: list[int]

    def to_pandas(self) -> Any:
        """One row per cluster: cluster, size."""
        return _frame([{"cluster": c, "size": s} for c, s in enumerate(self.sizes)], ["cluster", "size"])


@dataclass
class CuratedImage:
    """One curated image and how it got in (the manifest row)."""

    image_id: int
    path: str
    how: str  # sample (k-NN of a query) or cluster (sampled from a cluster)
    query: str | None  # the best query that retrieved it (sample mode)
    score: float | None  # cosine to that query
    times_retrieved: int
    cluster: int | None = None


@dataclass
class CurationResult:
    """A stored curation run: the curated images, counts, and the query files that failed."""

    run_id: int
    reused: bool
    counts: dict[str, Any]
    items: list[CuratedImage]
    failures: list[dict[str, str]]
    _outcome: Any = field(default=None, repr=False, compare=False)  # what the report writer reads

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.items]

    def to_pandas(self) -> Any:
        """One row per curated image (the manifest)."""
        return _frame([asdict(i) for i in self.items], _columns(CuratedImage))


@dataclass
class ExportResult:
    """What `Index.export` wrote: one Parquet row per image, and one .npy matrix per embedding role."""

    parquet: Path | None
    npy: dict[str, Path]  # role -> embeddings_<role>.npy (fp16, row i = Parquet row i)
    ids: Path | None  # ids.npy: the image id of each .npy row
    rows: int
    dedup_run: int | None
    cluster_run: int | None
