"""PDQ perceptual hashes with their dihedral variants, computed from the decode the embedders use.

PDQ (Meta's 256-bit perceptual hash, via the `pdqhash` binding) is stored as its 8 dihedral
variants (the identity first, then the rotations and flips in pdqhash's order), so a flipped or
rotated copy is found by comparing one image's variants with another's identity hash
(retrieval.curation.hamming.range_pairs_dihedral).
"""

from __future__ import annotations

import numpy as np

PDQ_BYTES = 32
PDQ_VARIANTS = 8
# PDQ reduces the image to a 64x64 summary (Jarosz box filters) before its DCT; its cost grows with
# the pixels it is given, so the decode (already reduced by JPEG draft mode) is cut to this long
# edge first: still 4x the summary's resolution, at a fraction of the cost on the decode workers.
PDQ_MAX_EDGE = 256


def pdq_dihedral(image) -> tuple[bytes, int]:  # noqa: ANN001 - a PIL RGB image
    """(8 x 32 bytes of hashes, identity first; PDQ quality 0-100) of an RGB image."""
    import pdqhash
    from PIL import Image

    if max(image.size) > PDQ_MAX_EDGE:
        scale = PDQ_MAX_EDGE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    hashes, quality = pdqhash.compute_dihedral(rgb)
    bits = np.asarray(hashes, dtype=np.uint8).reshape(PDQ_VARIANTS, 256)
    return np.packbits(bits, axis=1).tobytes(), int(quality)


def pdq_variants(blobs: list[bytes]) -> np.ndarray:
    """Stored PDQ blobs -> uint8 (n, 8, 32) codes; row v of an image is its v-th dihedral variant."""
    if not blobs:
        return np.empty((0, PDQ_VARIANTS, PDQ_BYTES), np.uint8)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), PDQ_VARIANTS, PDQ_BYTES)
