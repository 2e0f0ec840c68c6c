"""A test-only Pillow plugin whose decoder never returns, as a C codec can on a hostile file.

`register()` adds it to Pillow in the calling process; processes forked afterwards inherit it. A
file starting with MAGIC then "decodes" forever: a loop that never returns (it sleeps, so a hung
test costs no CPU). Nothing but a time limit gets the decoding process out of it.
"""

from __future__ import annotations

import os
import time

from PIL import Image, ImageFile

MAGIC = b"HANGME\x00\x00"


class HangingImageFile(ImageFile.ImageFile):
    format = "HANGTEST"
    format_description = "test-only: never finishes decoding"

    def _open(self) -> None:
        while True:
            time.sleep(0.05)


def _accept(prefix: bytes) -> bool:
    return prefix.startswith(MAGIC)


def register() -> None:
    Image.register_open(HangingImageFile.format, HangingImageFile, _accept)


def write_hanger(path: os.PathLike[str] | str) -> None:
    """A file the scanner takes for an image (by its extension) that hangs whoever decodes it."""
    with open(path, "wb") as f:
        f.write(MAGIC + b"\x00" * 64)
