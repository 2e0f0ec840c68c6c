"""retrieval: turn a folder of images into a searchable, de-duplicated, clustered dataset.

The Python API is one handle, `retrieval.Index`, and the typed results its methods return::

    import retrieval

    index = retrieval.Index.create("my-index", model="facebook/dinov2-small")
    index.update("photos/")                        # embed new and changed files, drop deleted ones
    hits = index.search("photos/cat.jpg", k=5)     # a file, an image id, a vector or a PIL image
    groups = index.dedup(threshold=0.95)           # duplicate groups, stored as a run
    index.export("dataset/")                       # Parquet + .npy, loadable anywhere

Attributes are imported on first access (module `__getattr__`), so `import retrieval` stays cheap
and the command line starts fast; torch, FAISS and SQLAlchemy load only when a method needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Index": "retrieval.index",
    "Settings": "retrieval.settings",
    "RetrievalError": "retrieval.errors",
    "Hit": "retrieval.results",
    "SearchResult": "retrieval.results",
    "DedupResult": "retrieval.results",
    "DedupGroup": "retrieval.results",
    "DedupMember": "retrieval.results",
    "ClusterResult": "retrieval.results",
    "CurationResult": "retrieval.results",
    "CuratedImage": "retrieval.results",
    "ExportResult": "retrieval.results",
}

__all__ = [  # a literal, for linters and IDEs; the same names as _EXPORTS
    "__version__", "Index", "Settings", "RetrievalError", "Hit", "SearchResult", "DedupResult", "DedupGroup",
    "DedupMember", "ClusterResult", "CurationResult", "CuratedImage", "ExportResult",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from retrieval.errors import RetrievalError
    from retrieval.index import Index
    from retrieval.results import (
        ClusterResult,
        CuratedImage,
        CurationResult,
        DedupGroup,
        DedupMember,
        DedupResult,
        ExportResult,
        Hit,
        SearchResult,
    )
    from retrieval.settings import Settings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
