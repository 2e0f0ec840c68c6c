"""Per-role preprocessing that runs in the decode workers: a DecodedImage -> that model's input.

Picklable and free of heavy imports, so DataLoader workers and the crash-isolated decoder can run
it. The search role uses retrieval.imaging.preprocess (DINOv2's resize + centre crop); a copy
model gets its own (SSCD: the short edge resized to 288, aspect kept, no crop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from retrieval.imaging.preprocess import DecodedImage, PreprocessConfig, preprocess

SSCD_SHORT_EDGE = 288  # SSCD's README: resize the short edge to 288 for copy detection


@dataclass(frozen=True)
class ShortEdgeResize:
    """Resize so the short edge is `short_edge` (aspect kept, no crop) -> uint8 (H, W, 3).

    Images of different aspect ratios give inputs of different shapes; the copy embedder batches
    equal shapes together. The box is defined on the original (oriented) size, so a JPEG decoded
    at a reduced DCT scale lands on the same grid as a full decode.
    """

    short_edge: int = SSCD_SHORT_EDGE
    resample: int = 3  # bicubic, like torchvision's Resize on PIL images

    @property
    def min_source_edge(self) -> int:
        return self.short_edge

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, with torchvision's rounding (int of the long edge)."""
        if width <= height:
            return self.short_edge, int(self.short_edge * height / width)
        return int(self.short_edge * width / height), self.short_edge

    def __call__(self, decoded: DecodedImage) -> np.ndarray:
        out_w, out_h = self.size_for(decoded.width, decoded.height)
        sx = sy = decoded.scale
        ox, oy = decoded.offset
        box = (ox, oy, decoded.width * sx + ox, decoded.height * sy + oy)
        image = decoded.image.resize((out_w, out_h), resample=self.resample, box=box)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "short_edge", **asdict(self)}


@dataclass(frozen=True)
class CropPreprocess:
    """A transformers checkpoint used as the copy model: its own resize + centre crop -> uint8 (3, H, W)."""

    config: PreprocessConfig

    @property
    def min_source_edge(self) -> int:
        return self.config.min_source_edge

    def __call__(self, decoded: DecodedImage) -> np.ndarray:
        return preprocess(decoded, self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "crop", **self.config.to_dict()}
