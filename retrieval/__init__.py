"""retrieval: turn a folder of images into a searchable, de-duplicated, clustered dataset.

The core library. Heavy dependencies (torch, transformers, faiss) are imported lazily inside the
functions that need them so that the CLI starts fast.
"""

__version__ = "0.1.0"
