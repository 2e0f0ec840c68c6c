"""The search role: the DINOv2 embedder of retrieval.model, under the role's name."""

from retrieval.model import Embedder as SearchEmbedder
from retrieval.model import load_embedder as load_search_embedder

__all__ = ["SearchEmbedder", "load_search_embedder"]
