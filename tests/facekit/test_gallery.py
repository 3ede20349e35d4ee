"""Gallery sources read from folders: names that are not UTF-8 are recorded as text and read by their bytes."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from facekit.gallery import gallery_sha256, iter_photos, photo_files
from facekit.imaging import encode_png
from manifests.names import name_bytes


def test_a_gallery_folder_whose_names_are_not_utf8_is_listed_hashed_and_read(tmp_path: Path) -> None:
    top = os.fsencode(tmp_path)
    files = {b"p\xff/a.png": encode_png(np.full((32, 32, 3), 90, np.uint8)),
             b"q/b\xfe.gif": encode_png(np.full((32, 32, 3), 160, np.uint8))}
    for name, data in files.items():
        os.makedirs(os.path.dirname(top + b"/" + name), exist_ok=True)
        with open(top + b"/" + name, "wb") as f:
            f.write(data)
    (tmp_path / "notes.txt").write_text("not an image")

    assert sorted(name_bytes(rel) for _, rel in photo_files(str(tmp_path))) == sorted(files)
    assert len(gallery_sha256(str(tmp_path), "photos")) == 64
    got = {name_bytes(rel): (identity, data) for rel, identity, data, _ in iter_photos(str(tmp_path))}
    assert got == {b"p\xff/a.png": ("p\\xff", files[b"p\xff/a.png"]), b"q/b\xfe.gif": ("q", files[b"q/b\xfe.gif"])}


def test_a_gallery_tar_whose_own_and_member_names_are_not_utf8_gives_text_item_names(tmp_path: Path) -> None:
    data = encode_png(np.full((32, 32, 3), 120, np.uint8))
    with tarfile.open(os.fsencode(tmp_path) + b"/g\xff.tar", "w", encoding="utf-8", errors="surrogateescape") as tar:
        info = tarfile.TarInfo(os.fsdecode(b"id\xfe/a.png"))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    items = list(iter_photos(str(tmp_path / "*.tar")))
    assert items == [("g\\xff.tar:id\\xfe/a.png", "id\\xfe", data, None)]
    assert len(gallery_sha256(str(tmp_path / "*.tar"), "photos")) == 64
