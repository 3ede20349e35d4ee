"""A hostile corpus through real pipeline runs (Ray, tars, Parquet, the export): a folder and a set of
tars holding links to /dev/zero, fifos, link and device members, 1 GiB members, a decompression bomb,
repeated keys, unsafe names, names that are not UTF-8, zero-byte, text-as-JPEG and truncated files,
GIF and TIFF images, files of unlisted extensions, photos stored turned with an EXIF orientation tag
and 16-bit PNGs. Every item ends as a row with its rule, no manifest has a duplicate sample_id,
nothing is doubled in the export, and the turned and deep images are scored as a viewer shows them.
The two whole corpora are ``faults`` runs (minutes on a shared machine); the names, formats and a
missing root run by default."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from facekit.imaging import encode_jpeg, encode_png
from manifests.layout import EXPORT_DIR, EXPORT_MANIFEST
from manifests.names import name_bytes, name_text
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.engine.runner import Runner
from stages.filters.image_stats import image_stats

pytestmark = pytest.mark.usefixtures("ray_session")
GIB = 1 << 30
STAGES = ("ingest", "fingerprint", "image_stats")


def image(seed: int) -> np.ndarray:
    """A smooth, bright-enough image that the image_stats defaults keep."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, 96, dtype=np.float32)[None, :, None] + rng.normal(0, 20, (96, 96, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def encoded(seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image(seed)).save(buf, format=fmt)
    return buf.getvalue()


def wide_image(seed: int) -> np.ndarray:
    """Like ``image``, 64 x 96: turned by a quarter it changes shape."""
    return image(seed)[16:80]


def turned(rgb: np.ndarray, orientation: int, fmt: str) -> bytes:
    """Stored turned the way a phone stores a portrait, with the tag that turns it back."""
    stored = Image.fromarray(rgb).transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def deep(rgb: np.ndarray, grey: bool) -> bytes:
    """The same picture at 16 bits per sample (grey: one channel)."""
    buf = io.BytesIO()
    if grey:
        Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257).save(buf, format="PNG")
        return buf.getvalue()
    ok, png = cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16) * 257)
    assert ok
    return png.tobytes()


# Turned and deep images in the hostile folder: (their 8-bit upright source, orientation, stored mode).
DECODED = {"p2/phone.jpg": (wide_image(31), 6, "RGB"), "p2/turned.png": (wide_image(32), 8, "RGB"),
           "p2/grey16.png": (image(33), 1, "I;16"), "p2/rgb16.png": (image(34), 1, "RGB")}


def member(tar: tarfile.TarFile, name: str | bytes, data: bytes = b"", **attrs: Any) -> None:
    info = tarfile.TarInfo(os.fsdecode(name))
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def build_folder(root: Path) -> dict[str, str | None]:
    """Files and the reason each must end with (None: a good sample)."""
    expected: dict[str, str | None] = {}
    for person in ("p1", "p2"):
        (root / person).mkdir(parents=True)
        for j in range(3):
            (root / person / f"{j}.png").write_bytes(encode_png(image(hash((person, j)) % 1000)))
            expected[f"{person}/{j}.png"] = None
    (root / "p2" / "phone.jpg").write_bytes(turned(DECODED["p2/phone.jpg"][0], 6, "JPEG"))
    (root / "p2" / "turned.png").write_bytes(turned(DECODED["p2/turned.png"][0], 8, "PNG"))
    (root / "p2" / "grey16.png").write_bytes(deep(DECODED["p2/grey16.png"][0], grey=True))
    (root / "p2" / "rgb16.png").write_bytes(deep(DECODED["p2/rgb16.png"][0], grey=False))
    expected.update(dict.fromkeys(DECODED))
    bad = root / "p1"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("plain text, not a JPEG")
    (bad / "cut.jpg").write_bytes(encode_jpeg(image(7))[:300])
    Image.new("1", (12000, 12000)).save(bad / "bomb.png")
    (bad / "devzero.png").symlink_to("/dev/zero")
    os.mkfifo(bad / "fifo.jpg")
    with open(bad / "huge.png", "wb") as f:
        f.truncate(GIB)  # sparse
    expected.update(build_names_and_formats(root))
    expected.update({"p1/zero.jpg": "empty_file", "p1/text.jpg": "not_an_image", "p1/cut.jpg": "corrupt_image",
                     "p1/bomb.png": "image_too_large", "p1/devzero.png": "not_a_regular_file",
                     "p1/fifo.jpg": "not_a_regular_file", "p1/huge.png": "file_too_large"})
    return expected


def build_names_and_formats(root: Path) -> dict[str, str | None]:
    """Names that are not UTF-8, GIF and TIFF images and files of unlisted extensions, beside good images
    (the source_path each must be recorded under, and its reason)."""
    files = {b"p1/n0.png": encode_png(image(1)), b"p1/bad\xff\xfe.png": encode_png(image(2)),
             b"p1/bad\xfe\xff.png": encode_png(image(3)), b"p\xe9/caf\xe9.jpg": encode_jpeg(image(4)),
             b"p\xe9/1.gif": encoded(5, "GIF"), b"p2/2.tif": encoded(6, "TIFF"), b"p2/3.TIFF": encoded(7, "TIFF"),
             b"p2/notes.txt": b"not an image", b"p2/README": b"no extension", b"p2/x.heic": b"\0\0\0\x18ftypheic"}
    top = os.fsencode(root)
    for name, data in files.items():
        os.makedirs(os.path.dirname(top + b"/" + name), exist_ok=True)
        with open(top + b"/" + name, "wb") as f:
            f.write(data)
    return {name_text(n): "unsupported_extension" if n.startswith(b"p2/") and n[-4:] not in (b".tif", b"TIFF")
            else None for n in files}


def build_name_tar(folder: Path) -> list[tuple[str, str, str | None]]:
    """Tars whose member names are not all UTF-8, in pax and GNU headers, beside good members; one tar's
    own name is not UTF-8 either."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [b"p6/0.png", b"p6/bad\xff.png", b"p6/bad\xfe.png", b"p\xe9/caf\xe9.png"]
    tars = ((tarfile.GNU_FORMAT, b"e.tar"), (tarfile.PAX_FORMAT, b"f\xff.tar"))
    for fmt, tar_name in tars:
        with tarfile.open(os.fsencode(folder) + b"/" + tar_name, "w", format=fmt, encoding="utf-8",
                          errors="surrogateescape") as tar:
            for i, name in enumerate(names):
                member(tar, name, encode_png(image(200 + i)))
    return [(name_text(t), name_text(n), None) for _, t in tars for n in names]


def build_tars(folder: Path) -> list[tuple[str, str, str | None]]:
    """(tar file, source_path, reason) for every item in the tars."""
    folder.mkdir(parents=True)
    png = [encode_png(image(100 + i)) for i in range(8)]
    with tarfile.open(folder / "a.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        member(tar, "p3/0.png", png[0])
        member(tar, "p3/1.png", png[1])
        member(tar, "p3/0.png", png[2])  # the key again, not adjacent
        member(tar, "p3/link.png", type=tarfile.SYMTYPE, linkname="/dev/zero")
        member(tar, "p3/hard.png", type=tarfile.LNKTYPE, linkname="p3/1.png")
        member(tar, "p3/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        member(tar, "../escape.png", png[3])
        member(tar, "p3/empty.png", b"")
        member(tar, "p3/2.png", png[4])
    with open(folder / "b.tar", "wb") as f:  # a 1 GiB member (sparse), then a good one
        big = tarfile.TarInfo("p4/big.png")
        big.size = GIB
        f.write(big.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(GIB, os.SEEK_CUR)
        for name, data in (("p4/0.png", png[5]), ("p4/1.png", png[6])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member(tar, "p5/0.png", png[7])
        member(tar, "p5/1.png", encode_png(image(120)))
    whole = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut_at = tar.getmember("p5/1.png").offset_data + 100
    (folder / "c.tar").write_bytes(whole[:cut_at])  # truncated inside p5/1.png
    with gzip.open(folder / "d.tar.gz", "wb", compresslevel=1) as gz:  # 64 MiB of zeros in a small .gz
        huge = tarfile.TarInfo("p5/zeros.png")
        huge.size = 64 << 20
        gz.write(huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(64 << 20))
        gz.write(bytes(1024))
    return [("a.tar", "p3/0.png", None), ("a.tar", "p3/1.png", None), ("a.tar", "p3/0.png", "duplicate_key"),
            ("a.tar", "p3/link.png", "not_a_regular_file"), ("a.tar", "p3/hard.png", "not_a_regular_file"),
            ("a.tar", "p3/dev.png", "not_a_regular_file"), ("a.tar", "../escape.png", "unsafe_member_name"),
            ("a.tar", "p3/empty.png", "empty_file"), ("a.tar", "p3/2.png", None),
            ("b.tar", "p4/big.png", "file_too_large"), ("b.tar", "p4/0.png", None), ("b.tar", "p4/1.png", None),
            ("c.tar", "p5/0.png", None), ("c.tar", "p5/1.png", "truncated_tar"),
            ("d.tar.gz", "p5/zeros.png", "file_too_large"), *build_name_tar(folder)]


def config(ingest: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "hostile",
        "run": {"seed": 0, "shard_size": 4},
        "stages": [{"stage": "ingest", "params": {"labels_from_dirs": True, "max_file_mb": 1, **ingest}},
                   {"stage": "fingerprint"}, {"stage": "image_stats"}],
        "export": {"min_images_per_identity": 1, "val_fraction": 0.0},
    }


def run(tmp_path: Path, ingest: dict[str, Any], out: Path | None = None) -> Path:
    cfg, stages = load_config(raw=config(ingest))
    out = out or tmp_path / "run"
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    return out


def check_nothing_doubled(out: Path) -> list[dict[str, Any]]:
    manifests: dict[str, list[dict[str, Any]]] = {}
    for stage in STAGES:
        rows = pq.read_table(out / "manifests" / stage).to_pylist()
        counts = Counter(r["sample_id"] for r in rows)
        assert max(counts.values()) == 1, (stage, counts.most_common(3))
        manifests[stage] = rows
    ids = {s: {r["sample_id"] for r in rows} for s, rows in manifests.items()}
    live = {r["sample_id"] for r in manifests["ingest"] if r["status"] == "ok"}
    for stage in STAGES[1:]:  # every live sample goes on, and nothing new appears
        assert live <= ids[stage] <= ids["ingest"], stage
    kept = set(ids["ingest"])
    for rows in manifests.values():
        kept -= {r["sample_id"] for r in rows if not r["keep"]}
    exported = pq.read_table(out / EXPORT_DIR / EXPORT_MANIFEST).column("sample_id").to_pylist()
    assert len(exported) == len(set(exported)) == len(kept) and set(exported) == kept
    return manifests["ingest"]


@pytest.mark.faults
def test_a_hostile_folder_gives_every_item_its_row_and_nothing_doubles(tmp_path: Path) -> None:
    expected = build_folder(tmp_path / "corpus")
    out = run(tmp_path, {"root": str(tmp_path / "corpus")})
    rows = check_nothing_doubled(out)
    assert {r["source_path"]: r["reason"] for r in rows} == expected
    assert all(r["detail"] for r in rows if r["reason"])
    # Turned and 16-bit images: upright size, what they were stored as, and scored on the viewer's
    # pixels (a 16-bit grey PNG clipped to white would score exposure 1.00 and be dropped).
    stats = {r["sample_id"]: r for r in pq.read_table(out / "manifests" / "image_stats").to_pylist()}
    for r in rows:
        if r["source_path"] in DECODED:
            source, orientation, mode = DECODED[r["source_path"]]
            assert (r["height"], r["width"], r["orientation"], r["pixel_mode"]) == (
                *source.shape[:2], orientation, mode), r["source_path"]
            exposure = image_stats(source if mode == "RGB" else np.asarray(
                Image.fromarray(source).convert("L").convert("RGB")))[1]
            got = stats[r["sample_id"]]
            assert got["keep"] and abs(got["exposure"] - exposure) < 0.01, (r["source_path"], got["exposure"], exposure)


@pytest.mark.faults
def test_hostile_tars_split_by_range_give_every_item_its_row_and_nothing_doubles(tmp_path: Path) -> None:
    expected = build_tars(tmp_path / "tars")
    rows = check_nothing_doubled(run(tmp_path, {"tars": [str(tmp_path / "tars" / "*.tar*")], "tar_split": True}))
    got = sorted((r["source_uri"].rsplit("/", 1)[-1], r["source_path"], r["reason"] or "") for r in rows)
    assert got == sorted((t, p, r or "") for t, p, r in expected)
    assert all(r["detail"] for r in rows if r["reason"])


def test_a_missing_root_is_refused_and_once_it_holds_files_a_plain_run_ingests_every_name(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(yaml.safe_dump(config({"root": str(corpus)})))
    refused = CliRunner().invoke(app, ["run", str(cfg), "--output", str(out), "--no-progress"])
    assert refused.exit_code == 2, refused.output
    said = "".join(refused.stderr.split())  # the console may wrap the one line at its width
    assert "error:invalidconfig:stages[0](ingest).params.root:" in said and f"'{corpus}'doesnotexist" in said
    assert not out.exists()  # refused before any work: no listing, no plan, nothing to reuse

    expected = build_names_and_formats(corpus)
    assert CliRunner().invoke(app, ["run", str(cfg), "--output", str(out), "--no-progress"]).exit_code == 0
    rows = check_nothing_doubled(out)
    assert {r["source_path"]: r["reason"] for r in rows} == expected  # every file once, by its exact name
    assert all((corpus / os.fsdecode(name_bytes(p))).is_file() for p in expected)
    first = {r["sample_id"]: r for r in rows}

    cfg_, stages = load_config(raw=config({"root": str(corpus)}))
    again = Runner(cfg_, stages, str(out), show_progress=False).run()  # resumed after completion: a no-op
    assert again.complete and all(s["computed"] == 0 for s in again.stages.values()), again.stages
    assert {r["sample_id"]: r for r in check_nothing_doubled(out)} == first


def test_tar_members_named_in_bytes_that_are_not_utf8_are_samples_and_their_tar_goes_on(tmp_path: Path) -> None:
    expected = build_name_tar(tmp_path / "tars")
    rows = check_nothing_doubled(run(tmp_path, {"tars": [str(tmp_path / "tars" / "*.tar")], "tar_split": True}))
    got = sorted((r["source_uri"].rsplit("/", 1)[-1], r["source_path"], r["reason"]) for r in rows)
    assert got == sorted(expected)
