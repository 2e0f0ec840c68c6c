"""Corpus scanning: extensions, content sniffing, determinism, symlinks, hidden files, exclusions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retrieval.errors import CorpusError
from retrieval.imaging.scan import scan_corpus
from retrieval.imaging.signatures import looks_like_image
from tests.images import encode, photo, write


def _paths(root: Path, **kw) -> list[str]:
    return [e.path for e in scan_corpus(root, **kw)]


def test_finds_images_by_extension_and_by_content(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write(root / "a.jpg", photo(20, 20))
    write(root / "deep" / "er" / "b.PNG", photo(20, 20), "PNG")
    (root / "no_extension").write_bytes(encode(photo(20, 20), "JPEG"))
    (root / "webp_blob.bin").write_bytes(encode(photo(20, 20), "WEBP"))
    (root / "notes.txt").write_text("not an image")
    (root / "random.dat").write_bytes(os.urandom(64))
    found = _paths(root)
    assert sorted(found) == ["a.jpg", "deep/er/b.PNG", "no_extension", "webp_blob.bin"]


def test_order_is_deterministic_and_stat_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for name in ["z.jpg", "m/k.jpg", "a.jpg", "m/a.jpg"]:
        write(root / name, photo(10, 10))
    first = list(scan_corpus(root))
    assert [e.path for e in first] == [e.path for e in scan_corpus(root)]
    entry = next(e for e in first if e.path == "a.jpg")
    st = (root / "a.jpg").stat()
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_hidden_entries_and_excluded_folders_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write(root / "keep.jpg", photo(10, 10))
    write(root / ".hidden.jpg", photo(10, 10))
    write(root / ".cache" / "x.jpg", photo(10, 10))
    write(root / "retrieval-index" / "thumb.jpg", photo(10, 10))
    assert _paths(root, exclude=(root / "retrieval-index",)) == ["keep.jpg"]


def test_symlinks_are_not_followed_out_of_the_corpus(tmp_path: Path) -> None:
    root = tmp_path / "c"
    outside = tmp_path / "outside"
    write(outside / "secret.jpg", photo(10, 10))
    write(root / "real.jpg", photo(10, 10))
    (root / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "link_in.jpg").symlink_to(root / "real.jpg")
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    assert sorted(_paths(root)) == ["link_in.jpg", "real.jpg"]


def test_missing_corpus_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        list(scan_corpus(tmp_path / "nope"))
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(CorpusError, match="not a folder"):
        list(scan_corpus(tmp_path / "file.jpg"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_signatures(fmt: str) -> None:
    assert looks_like_image(encode(photo(8, 8), fmt)[:16])


def test_non_image_signature() -> None:
    assert not looks_like_image(b"%PDF-1.7\n")
    assert not looks_like_image(b"")
