"""Embedder roles. `search`: the retrieval model (DINOv2, retrieval.model). `copy`: a copy-detection
descriptor (SSCD) for deduplication. Each role has its own loader, preprocessing, fp16 vector file,
FAISS index and model fingerprint; both share the image ids.
"""

ROLES = ("search", "copy")
