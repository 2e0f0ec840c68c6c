"""Image file signatures ("magic numbers"), to tell image content from anything else cheaply."""

from __future__ import annotations

SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (0, b"qoif", "QOI"),
)


def sniff_format(head: bytes) -> str | None:
    """The format whose signature `head` (the first 16 bytes of a file) starts with, if any."""
    for offset, sig, name in SIGNATURES:
        if head[offset : offset + len(sig)] == sig:
            return name
    return None


def looks_like_image(head: bytes) -> bool:
    return sniff_format(head) is not None
