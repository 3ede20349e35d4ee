"""Ingest: folders and WebDataset tars become samples; bad files become error rows, never crashes."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from facekit.imaging import encode_jpeg, encode_png
from manifests.names import name_bytes, name_text
from manifests.shards import check_key
from manifests.storage import RunStorage
from stages.base import InputError, StageContext
from stages.sources.ingest import IngestParams, IngestStage, folder_key


def rgb(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path) -> Path:
    """Where a folder source writes its listing (the runner's run directory)."""
    global CTX
    CTX = StageContext(run_dir=str(tmp_path / "run"), stage_id="ingest", seed=0)
    return tmp_path / "run"


CTX = StageContext(run_dir="/nonexistent", stage_id="ingest", seed=0)


def stage(**params: Any) -> IngestStage:
    st = IngestStage(IngestParams(**params), CTX)
    st.prepare(RunStorage(CTX.run_dir))
    return st


def rows_of(st: IngestStage, shard_size: int = 4) -> list[dict[str, Any]]:
    rows = []
    for shard in st.plan(shard_size):
        json.dumps(shard)  # shard descriptions are frozen in the run: JSON-able
        for batch in st.read(shard):
            n = len(batch["sample_id"])
            assert all(len(v) == n for v in batch.values())
            rows += [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return rows


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good images under identity folders, and one of each kind of bad file."""
    root = tmp_path / "corpus"
    (root / "alice").mkdir(parents=True)
    (root / "bob" / "holiday").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "alice" / "a1.png").write_bytes(encode_png(rgb(1)))
    (root / "alice" / "a 2.final.JPG").write_bytes(encode_jpeg(rgb(2)))
    (root / "bob" / "holiday" / "b1.jpeg").write_bytes(encode_jpeg(rgb(3)))
    (root / "bob" / "b2.webp").write_bytes(_webp(rgb(4)))
    (root / "loose.bmp").write_bytes(_bmp(rgb(5)))
    (root / "bob" / "zero.jpg").write_bytes(b"")
    (root / "bob" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    full = encode_jpeg(rgb(6, 128))
    (root / "alice" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "alice" / "tiny.png").write_bytes(encode_png(np.zeros((1, 1, 3), dtype=np.uint8)))
    huge = io.BytesIO()
    Image.new("1", (12000, 12000)).save(huge, format="PNG")  # 144 MP, a few KB on disk
    (root / "bob" / "huge.png").write_bytes(huge.getvalue())
    (root / "alice" / "readme.txt").write_text("not an image extension: not a sample")
    (root / ".cache" / "thumb.png").write_bytes(encode_png(rgb(7)))
    (root / "alice" / ".hidden.png").write_bytes(encode_png(rgb(8)))
    return root


def _webp(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _bmp(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="BMP")
    return buf.getvalue()


def test_folder_ingest_gives_one_error_row_with_a_reason_per_bad_file(messy_folder: Path) -> None:
    rows = rows_of(stage(root=str(messy_folder), labels_from_dirs=True))
    by_path = {r["source_path"]: r for r in rows}

    assert sorted(by_path) == sorted(
        [
            "alice/a1.png",
            "alice/a 2.final.JPG",
            "bob/holiday/b1.jpeg",
            "bob/b2.webp",
            "loose.bmp",
            "bob/zero.jpg",
            "bob/notes.jpg",
            "alice/truncated.jpg",
            "alice/tiny.png",
            "bob/huge.png",
            "alice/readme.txt",
        ]
    )  # hidden files are not listed; a file of an unlisted extension is a row that says so, never read
    bad = {
        "alice/readme.txt": "unsupported_extension",
        "bob/zero.jpg": "empty_file",
        "bob/notes.jpg": "not_an_image",
        "alice/truncated.jpg": "corrupt_image",
        "alice/tiny.png": "image_too_small",
        "bob/huge.png": "image_too_large",
    }
    for path, row in by_path.items():
        if path in bad:
            assert row["status"] == "error" and row["keep"] is False, path
            assert row["reason"] == bad[path] and row["detail"], (path, row["reason"], row["detail"])
            assert row["image"] is None
        else:
            assert row["status"] == "ok" and row["keep"] is True and row["reason"] is None, path
            assert row["image"] == (messy_folder / path).read_bytes()  # bytes as they are, never re-encoded
    assert by_path["alice/a1.png"]["identity_id"] == "alice"
    assert by_path["bob/holiday/b1.jpeg"]["identity_id"] == "bob"
    assert by_path["loose.bmp"]["identity_id"] is None
    assert by_path["alice/a 2.final.JPG"]["image_ext"] == "jpg"
    assert by_path["bob/b2.webp"]["image_ext"] == "webp" and by_path["loose.bmp"]["image_ext"] == "bmp"
    assert (by_path["alice/a1.png"]["width"], by_path["alice/a1.png"]["height"]) == (64, 64)


def test_keys_are_valid_unique_and_ids_deterministic(messy_folder: Path) -> None:
    (messy_folder / "alice__a1.png").write_bytes(encode_png(rgb(9)))  # sanitises like alice/a1.png
    (messy_folder / "alice" / "a1.jpg").write_bytes(encode_jpeg(rgb(10)))  # same stem, other extension
    first = rows_of(stage(root=str(messy_folder)))
    again = rows_of(stage(root=str(messy_folder)), shard_size=3)

    keys = [r["key"] for r in first]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert check_key(key) == key and "." not in key and "/" not in key
    assert [(r["sample_id"], r["key"]) for r in first] == [(r["sample_id"], r["key"]) for r in again]
    assert len({r["sample_id"] for r in first}) == len(first)
    assert folder_key("../../etc/passwd.jpg").startswith("etc__passwd-")


def test_plan_is_row_ranges_of_a_sorted_listing_frozen_in_the_run(messy_folder: Path, run_dir: Path) -> None:
    st = stage(root=str(messy_folder))
    plan = st.plan(3)
    assert [(s["start"], s["stop"]) for s in plan] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert all(set(s) == {"root", "listing", "start", "stop"} for s in plan)  # no paths in the plan
    listing = pq.read_table(run_dir / plan[0]["listing"]).column("path").to_pylist()
    assert listing == sorted(listing) and len(listing) == 11
    paths = [r["source_path"] for r in rows_of(st, 3)]
    assert paths == listing
    (messy_folder / "alice" / "aaa-new.png").write_bytes(encode_png(rgb(30)))  # after the first run
    again = stage(root=str(messy_folder))
    assert again.plan(3) == plan  # a resumed run cuts the same shards
    assert [r["source_path"] for r in rows_of(again, 3)] == paths
    other = stage(root=str(messy_folder), extensions=["png"])  # another source: its own listing
    assert other.plan(100)[0]["listing"] != plan[0]["listing"]


def test_a_file_that_vanishes_after_planning_is_an_error_row(messy_folder: Path) -> None:
    st = stage(root=str(messy_folder))
    shard = st.plan(100)[0]
    (messy_folder / "alice" / "a1.png").unlink()
    rows = [
        r
        for b in st.read(shard)
        for r in (dict(zip(b, v, strict=True)) for v in zip(*b.values(), strict=True))
    ]
    row = next(r for r in rows if r["source_path"] == "alice/a1.png")
    assert row["status"] == "error" and row["reason"] == "unreadable_file"
    assert row["detail"].startswith("FileNotFoundError")
    assert len(rows) == 11


def test_fsspec_memory_folder_ingests_like_a_local_one() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/ff-ingest/p1/x.png": encode_png(rgb(11)), "/ff-ingest/p2/y.jpg": encode_jpeg(rgb(12))})
    try:
        rows = rows_of(stage(root="memory://ff-ingest", labels_from_dirs=True))
    finally:
        fs.rm("/ff-ingest", recursive=True)
    assert [(r["identity_id"], r["status"]) for r in rows] == [("p1", "ok"), ("p2", "ok")]
    assert rows[0]["source_uri"] == "memory:///ff-ingest"


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def tars(tmp_path: Path) -> list[Path]:
    good = _tar(
        tmp_path / "shard-000.tar",
        [
            ("000001.png", encode_png(rgb(20))),
            ("000001.json", json.dumps({"identity_id": "carol"}).encode()),
            ("train/000002.jpg", encode_jpeg(rgb(21))),
            ("../evil.png", encode_png(rgb(22))),
            ("/abs/root.png", encode_png(rgb(23))),
            ("000003.json", b"{}"),
            ("000004.png", b"garbage"),
            ("we ird.key.png", encode_png(rgb(24))),
        ],
    )
    whole = _tar(tmp_path / "tmp.tar", [("a.png", encode_png(rgb(25))), ("b.png", encode_png(rgb(26, 256)))])
    data = whole.read_bytes()
    cut = tmp_path / "shard-001.tar"
    cut.write_bytes(data[: 1024 + 512 + len(encode_png(rgb(25))) + 600])  # inside member b's data
    whole.unlink()
    return [good, cut]


def test_tar_ingest_keeps_keys_and_turns_unsafe_or_truncated_members_into_error_rows(
    tars: list[Path],
) -> None:
    rows = rows_of(stage(tars=[str(tars[0].parent / "shard-*.tar")]))
    ok = {r["key"]: r for r in rows if r["status"] == "ok"}
    errors = [r for r in rows if r["status"] == "error"]

    assert set(ok) == {"000001", "train/000002", "a"} | {k for k in ok if k.startswith("we_ird")}
    assert ok["000001"]["identity_id"] == "carol" and ok["000001"]["image"] == encode_png(rgb(20))
    assert ok["train/000002"]["image_ext"] == "jpg"
    reasons = sorted(r["reason"] for r in errors)
    assert reasons.count("unsafe_member_name") == 2
    assert {r["source_path"] for r in errors if r["reason"] == "unsafe_member_name"} == {
        "../evil.png",
        "/abs/root.png",
    }
    assert "no_image_in_sample" in reasons  # 000003: only a json
    assert "not_an_image" in reasons  # 000004.png holds garbage
    truncated = [r for r in errors if r["reason"] == "truncated_tar"]  # shard-001 ends inside b.png
    assert len(truncated) == 1 and "b.png" in truncated[0]["detail"]
    assert len(errors) == 5
    for r in rows:
        assert check_key(r["key"]) == r["key"]
        if r["status"] == "error":
            assert r["image"] is None


def test_tar_split_cuts_member_ranges_that_cover_each_sample_once(tars: list[Path]) -> None:
    whole = rows_of(stage(tars=[str(t) for t in tars]), shard_size=100)
    st = stage(tars=[str(t) for t in tars], tar_split=True)
    plan = st.plan(2)
    assert all({"tar", "offset", "stop"} <= set(s) for s in plan)
    assert len(plan) > len(tars)
    split = rows_of(st, shard_size=2)
    assert [r["sample_id"] for r in split] == [r["sample_id"] for r in whole]
    # Each image is recorded where its bytes lie in the plain source tar, whichever range read it.
    located = [r for r in split if r["image_source"]]
    assert len(located) == sum(r["status"] == "ok" for r in split) > 0
    for r in located:
        at = r["image_source"]
        data = Path(at["tar"].removeprefix("file://")).read_bytes()[at["offset"]:at["offset"] + at["size"]]
        assert data == bytes(r["image"]) and zlib.crc32(data) == at["crc32"]


def test_params_need_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        IngestParams()
    with pytest.raises(ValidationError, match="exactly one"):
        IngestParams(root="/x", tars=["/y.tar"])


def test_an_fsspec_folder_listing_skips_hidden_folders_and_is_streamed_into_the_run(run_dir: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/ff-list/a/x.png": encode_png(rgb(13)), "/ff-list/.hidden/y.png": encode_png(rgb(14)),
             "/ff-list/a/.b/z.png": encode_png(rgb(15)), "/ff-list/b/c/w.png": encode_png(rgb(16))})
    try:
        st = stage(root="memory://ff-list")
        plan = st.plan(1)
        rows = rows_of(st, 1)
    finally:
        fs.rm("/ff-list", recursive=True)
    assert [r["source_path"] for r in rows] == ["a/x.png", "b/c/w.png"]
    assert [(s["start"], s["stop"]) for s in plan] == [(0, 1), (1, 2)]
    assert (run_dir / plan[0]["listing"]).is_file()


def _encoded(x: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format=fmt)
    return buf.getvalue()


def test_folder_names_that_are_not_utf8_are_rows_read_by_their_exact_bytes(tmp_path: Path) -> None:
    top = os.fsencode(tmp_path / "bytes")
    files = {b"p\xe9rson/bad\xff\xfe.png": encode_png(rgb(40)), b"p\xe9rson/bad\xfe\xff.png": encode_png(rgb(41)),
             b"p\xe9rson/caf\xe9.jpg": encode_jpeg(rgb(42)), b"plain/a\\xff.png": encode_png(rgb(43)),
             b"plain/a\xff.png": encode_png(rgb(44))}
    for name, data in files.items():
        os.makedirs(os.path.dirname(top + b"/" + name), exist_ok=True)
        with open(top + b"/" + name, "wb") as f:
            f.write(data)
    rows = rows_of(stage(root=os.fsdecode(top), labels_from_dirs=True), shard_size=2)

    by_name = {name_bytes(r["source_path"]): r for r in rows}
    assert len(rows) == len(by_name) == len(files) and set(by_name) == set(files)  # each file once
    for name, data in files.items():
        row = by_name[name]
        assert row["status"] == "ok" and row["image"] == data, (name, row["reason"], row["detail"])
        assert row["source_path"] == name_text(name) and row["source_path"].encode()  # plain UTF-8 text
        assert check_key(row["key"]) == row["key"]
    assert {r["identity_id"] for r in rows} == {"p\\xe9rson", "plain"}
    assert len({r["key"] for r in rows}) == len({r["sample_id"] for r in rows}) == len(files)


def _bytes_tar(path: Path, members: list[tuple[bytes, bytes]], fmt: int) -> Path:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(os.fsdecode(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_members_whose_names_are_not_utf8_are_samples_beside_the_good_ones(tmp_path: Path) -> None:
    members = [(b"ok.png", encode_png(rgb(50))), (b"p\xff.png", encode_png(rgb(51))),
               (b"p\xfe.png", encode_png(rgb(52))), (b"d\xe9/x.png", encode_png(rgb(53))),
               (b"d\xe9/x.json", json.dumps({"identity_id": "dee"}).encode()), (b"z.png", encode_png(rgb(54)))]
    tars = [_bytes_tar(tmp_path / "gnu.tar", members, tarfile.GNU_FORMAT),
            _bytes_tar(tmp_path / os.fsdecode(b"pax\xff.tar"), members, tarfile.PAX_FORMAT)]  # its own name too
    whole = rows_of(stage(tars=[str(t) for t in tars]), shard_size=100)
    split = rows_of(stage(tars=[str(t) for t in tars], tar_split=True), shard_size=2)

    assert [r["sample_id"] for r in split] == [r["sample_id"] for r in whole]
    assert len({r["sample_id"] for r in whole}) == len(whole) == 10
    images = [(n, d) for n, d in members if n.endswith(b".png")]
    for tar in tars:
        got = {name_bytes(r["source_path"]): r for r in whole if r["source_uri"].endswith(name_text(tar.name))}
        assert set(got) == {n for n, _ in images}
        for name, data in images:
            assert got[name]["status"] == "ok" and got[name]["image"] == data
            assert check_key(got[name]["key"]) == got[name]["key"]
        assert got[b"d\xe9/x.png"]["identity_id"] == "dee"


def test_gif_and_tif_files_are_images_and_every_other_file_is_a_row_that_says_why(tmp_path: Path) -> None:
    root = tmp_path / "formats"
    root.mkdir()
    images = {"a.gif": _encoded(rgb(60), "GIF"), "b.tif": _encoded(rgb(61), "TIFF"),
              "c.TIFF": _encoded(rgb(62), "TIFF"), "d.png": encode_png(rgb(63))}
    others = {"notes.txt": b"text", "README": b"no extension", "e.heic": b"\0\0\0\x18ftypheic"}
    for name, data in {**images, **others}.items():
        (root / name).write_bytes(data)
    rows = {r["source_path"]: r for r in rows_of(stage(root=str(root)))}

    assert set(rows) == set(images) | set(others)
    for name, data in images.items():
        assert rows[name]["status"] == "ok" and rows[name]["image"] == data, rows[name]["detail"]
    assert [rows[n]["image_ext"] for n in sorted(images)] == ["gif", "tiff", "tiff", "png"]
    for name in others:
        assert rows[name]["reason"] == "unsupported_extension" and rows[name]["image"] is None
        assert "params.extensions" in rows[name]["detail"]
    assert rows["README"]["detail"].startswith("no extension")


def test_a_missing_or_imageless_root_is_an_input_error_and_leaves_no_listing(tmp_path: Path, run_dir: Path) -> None:
    root = tmp_path / "later"
    st = IngestStage(IngestParams(root=str(root)), CTX)
    for step in (st.check_input, lambda: st.prepare(RunStorage(CTX.run_dir))):
        with pytest.raises(InputError, match="does not exist") as missing:
            step()
        assert missing.value.key == "params.root" and str(root) in str(missing.value)
    root.mkdir()
    for step in (st.check_input, lambda: st.prepare(RunStorage(CTX.run_dir))):
        with pytest.raises(InputError, match="it is empty"):
            step()
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"its 1 file\(s\) have other extensions"):
        st.prepare(RunStorage(CTX.run_dir))
    assert not list(run_dir.rglob("*.parquet"))  # nothing frozen: the next run walks again
    (root / "a.png").write_bytes(encode_png(rgb(70)))
    st.check_input()
    assert [(r["source_path"], r["reason"]) for r in rows_of(stage(root=str(root)))] == [
        ("a.png", None), ("notes.txt", "unsupported_extension")]
    with pytest.raises(InputError, match="is a file"):
        IngestStage(IngestParams(root=str(root / "a.png")), CTX).check_input()
    with pytest.raises(InputError, match="no file matches") as tars:
        IngestStage(IngestParams(tars=[str(root / "a.png"), str(tmp_path / "*.tar")]), CTX).check_input()
    assert tars.value.key == "params.tars[1]"


# ---------------------------------------------------------------- tar ingest by byte range, through runs


def _range_corpus(folder: Path, n: int = 12) -> list[tuple[str, bytes]]:
    """Members of a WebDataset tar: noise images (they do not compress) with their identities."""
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        members += [(f"s{i:03d}.png", encode_png(rgb(100 + i, 224))),
                    (f"s{i:03d}.json", json.dumps({"identity_id": f"p{i % 3}"}).encode())]
    folder.mkdir(parents=True, exist_ok=True)
    return members


def _range_run(out: Path, tars: list[str], extra: tuple[str, ...] = (), **ingest: Any) -> Any:
    from pipeline.config import load_config
    from pipeline.engine.runner import Runner

    raw = {"name": "by-range", "run": {"seed": 0, "shard_size": 6},
           "stages": [{"stage": "ingest", "params": {"tars": tars, **ingest}}, {"stage": "fingerprint"},
                      *({"stage": s} for s in extra)],
           "export": {"min_images_per_identity": 1, "val_fraction": 0.0}}
    cfg, stages = load_config(raw=raw)
    return Runner(cfg, stages, str(out), show_progress=False).run()


def _exported_images(out: Path) -> dict[str, bytes]:
    images: dict[str, bytes] = {}
    for path in sorted(out.glob("export/v-*/*/shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    f = tar.extractfile(m)
                    assert f is not None
                    images[m.name[: -len(".png")]] = f.read()
    return images


def _bytes_under(folder: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.relative_to(folder).parts[0] not in skip)


@pytest.mark.usefixtures("ray_session")
def test_a_plain_tar_is_ingested_by_byte_range_exports_what_a_packed_run_exports_and_a_changed_tar_is_refused(
        tmp_path: Path) -> None:
    members = _range_corpus(tmp_path / "src")
    plain = _tar(tmp_path / "src" / "data.tar", members)
    packed = tmp_path / "src" / "data.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    by_range, copied = tmp_path / "by-range", tmp_path / "copied"
    for out, tar in ((by_range, plain), (copied, packed)):
        res = _range_run(out, [str(tar)])
        assert res.complete, res.failures

    # No pixel written into the run: no shard tar, and the run (less its export and report) is a fraction
    # of the source.
    assert not (by_range / "shards").exists()
    assert _bytes_under(by_range, skip=("export", "report")) < plain.stat().st_size / 4
    assert _bytes_under(copied / "shards") > plain.stat().st_size / 2  # a compressed tar is packed
    rows = pq.read_table(by_range / "manifests" / "ingest").to_pylist()
    assert {r["output_shard"] for r in rows} == {f"file://{plain}"}
    source = plain.read_bytes()
    for r in rows:  # each row names its member's bytes in the source tar, checksummed
        assert source[r["tar_offset"]:r["tar_offset"] + r["tar_size"]] == dict(members)[f"{r['key']}.png"]
    assert {r["input_shard"] for r in pq.read_table(by_range / "manifests" / "fingerprint").to_pylist()} == {
        f"file://{plain}"}

    exported = _exported_images(by_range)
    assert exported == _exported_images(copied) == {k[:-4]: v for k, v in members if k.endswith(".png")}

    # The source tar changes after ingest (same size, one image's bytes differ): a stage reading it refuses,
    # naming the tar, and never runs on other pixels.
    first = min(rows, key=lambda r: r["tar_offset"])
    damaged = bytearray(source)
    damaged[first["tar_offset"] + 100] ^= 0xFF
    plain.write_bytes(bytes(damaged))
    res = _range_run(by_range, [str(plain)], extra=("image_stats",))
    assert not res.complete
    said = " ".join(f["error"] if "error" in f else str(f) for f in res.failures)
    assert f"source tar file://{plain} changed after ingest" in said, res.failures
    assert not list((by_range / "manifests").glob("image_stats/000000.parquet"))


@pytest.mark.usefixtures("ray_session")
def test_a_tar_on_s3_is_ingested_by_byte_range_with_the_options_the_run_kept_for_its_bucket(tmp_path: Path) -> None:
    from tests.fixtures.s3 import moto_s3

    members = _range_corpus(tmp_path / "src", n=6)
    plain = _tar(tmp_path / "src" / "data.tar", members)
    out = tmp_path / "run"
    with moto_s3() as s3:
        bucket = s3.new_bucket()
        fs = fsspec.filesystem("s3", **s3.storage_options, skip_instance_cache=True)
        fs.put_file(str(plain), f"{bucket}/in/data.tar")
        res = _range_run(out, [f"s3://{bucket}/in/*.tar"], storage_options=s3.storage_options)
        assert res.complete, res.failures
        exported = _exported_images(out)
    assert exported == {k[:-4]: v for k, v in members if k.endswith(".png")}
    assert not (out / "shards").exists()
    rows = pq.read_table(out / "manifests" / "ingest").to_pylist()
    assert {r["output_shard"] for r in rows} == {f"s3://{bucket}/in/data.tar"}
    # The bucket's options live in the run beside its config, never in a manifest.
    kept = json.loads((out / "sources" / "storage.json").read_text())
    assert kept == {f"s3://{bucket}": json.loads(json.dumps(s3.storage_options))}
    assert not any(b"endpoint_url" in p.read_bytes() for p in (out / "manifests").rglob("*.parquet"))
