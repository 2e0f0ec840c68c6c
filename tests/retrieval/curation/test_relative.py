"""`retrieval dedup --against REFERENCE_DIR`: reference files win, touched groups go whole, broken files are recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image as PILImage


def test_relative_dedup_against_a_reference_folder(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    ref = tmp_path / "benchmark"
    ref.mkdir()
    shutil.copy(corpus / "a" / "img0011.jpg", ref / "test_0001.jpg")  # contaminated: exact copy
    PILImage.open(corpus / "a" / "img0005.jpg").save(ref / "test_0002.png")  # lossless re-save of a group member
    (ref / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out_dir = tmp_path / "rel"
    _, out = cli("dedup", "--index-dir", index_dir, "--against", ref, "-t", "0.9995", "-o", out_dir,
                 "--no-progress", "--json")
    result = json.loads(out)
    doc = json.loads((out_dir / "duplicates.json").read_text())
    assert doc["run"]["mode"] == "relative"
    assert [f["path"] for f in doc["reference_failures"]] == ["broken.jpg"]
    assert result["summary"]["reference_files"] == 2 and result["summary"]["reference_failed"] == 1
    removed = sorted((out_dir / "remove.txt").read_text().split())
    # a/img0005.jpg's whole group goes, its resized copy included; groups without a reference stay untouched
    assert removed == ["a/img0005.jpg", "a/img0011.jpg", "resized/img0005_small.jpg"]
    assert (out_dir / "keep.txt").read_text() == ""
    for g in doc["groups"]:
        assert g["touches_reference"] and g["representative_id"] is None
        for m in g["members"]:
            assert (m["action"] == "keep") == m["reference"] and m["reason"] == "reference"
            if m["reference"]:
                assert Path(m["path"]).is_file()
