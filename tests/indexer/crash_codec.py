"""A test-only Pillow plugin whose decoder crashes its process, as a C codec can on a hostile file.

`register()` adds it to Pillow in the calling process; processes forked afterwards (DataLoader
workers, isolated decoders) inherit it. A file starting with MAGIC then "decodes" by sending
SIGSEGV to its own process: a real crash, not an exception, so nothing in Python can catch it.
"""

from __future__ import annotations

import os
import signal

from PIL import Image, ImageFile

MAGIC = b"CRASHME\x00"


class CrashingImageFile(ImageFile.ImageFile):
    format = "CRASHTEST"
    format_description = "test-only: crashes the decoding process"

    def _open(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


def _accept(prefix: bytes) -> bool:
    return prefix.startswith(MAGIC)


def register() -> None:
    Image.register_open(CrashingImageFile.format, CrashingImageFile, _accept)


def write_crasher(path: os.PathLike[str] | str) -> None:
    """A file the scanner takes for an image (by its extension) that crashes whoever decodes it."""
    with open(path, "wb") as f:
        f.write(MAGIC + b"\x00" * 64)
