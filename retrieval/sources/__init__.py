"""Where the images of a corpus come from: one notion of a source for every command that takes a corpus.

A source lists candidate images (`scan`), names each one by a stable path (relative for a local
folder, a URI otherwise), and reads their bytes with bounded, retried reads. See `open_source`.
"""

from retrieval.sources.base import ReadFailure, Source, SourceReader
from retrieval.sources.open import open_source, source_from_meta

__all__ = ["ReadFailure", "Source", "SourceReader", "open_source", "source_from_meta"]
