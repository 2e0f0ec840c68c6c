"""Dataset curation after the DINOv2 data pipeline (Oquab et al. 2023, section 3, appendix A.3/A.4).

Stages: exact and near-exact duplicates (sha256, identical pixels, perceptual hash), copy detection
on a k-NN graph of the embeddings with union-find components, relative deduplication against a
reference set, spherical k-means clustering, and retrieval-based curation from a query set.
Every similarity is an exact cosine of the stored fp16 vectors, never a PQ approximation.
"""
