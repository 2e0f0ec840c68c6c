"""Test-only Pillow plugins whose decoder crashes its process, or never returns, as a C codec can on a hostile file.

`register()` adds them to Pillow in the calling process; processes forked afterwards (DataLoader
workers, isolated decoders) inherit them. A file starting with MAGIC then "decodes" by sending
SIGSEGV to its own process: a real crash, not an exception, so nothing in Python can catch it. A
file starting with HANG_MAGIC "decodes" forever (sleeping, so a hung test costs no CPU): nothing
but a time limit gets the decoding process out of it.
"""

from __future__ import annotations

import os
import signal
import time

from PIL import Image, ImageFile

MAGIC = b"CRASHME\x00"
HANG_MAGIC = b"HANGME\x00\x00"


class CrashingImageFile(ImageFile.ImageFile):
    format = "CRASHTEST"
    format_description = "test-only: crashes the decoding process"

    def _open(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


class HangingImageFile(ImageFile.ImageFile):
    format = "HANGTEST"
    format_description = "test-only: never finishes decoding"

    def _open(self) -> None:
        while True:
            time.sleep(0.05)


def register() -> None:
    Image.register_open(CrashingImageFile.format, CrashingImageFile, lambda prefix: prefix.startswith(MAGIC))
    Image.register_open(HangingImageFile.format, HangingImageFile, lambda prefix: prefix.startswith(HANG_MAGIC))


def write_crasher(path: os.PathLike[str] | str, magic: bytes = MAGIC) -> None:
    """A file the scanner takes for an image (by its extension) that crashes whoever decodes it."""
    with open(path, "wb") as f:
        f.write(magic + b"\x00" * 64)


def write_hanger(path: os.PathLike[str] | str) -> None:
    """A file the scanner takes for an image that hangs whoever decodes it."""
    write_crasher(path, HANG_MAGIC)
