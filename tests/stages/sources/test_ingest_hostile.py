"""Ingest against hostile input: every read bounded, every bad item a row with its rule, nothing doubled.

Memory bounds are measured, not timed: a sampler thread records the process RSS while the stage
runs, and the growth over the start must stay far below what reading the hostile item would cost
(1 GiB members, /dev/zero, a 400-megapixel PNG of a few KB).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facekit.imaging import encode_png
from manifests.shards import check_key
from manifests.storage import RunStorage
from manifests.transient import is_transient
from stages.base import StageContext, TransientError
from stages.sources.ingest import IngestParams, IngestStage

GIB = 1 << 30
RSS_BOUND = 200 * 1024 * 1024


def png(seed: int, size: int = 32) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def make_stage(run_dir: Path, **params: Any) -> IngestStage:
    st = IngestStage(IngestParams(**params), StageContext(run_dir=str(run_dir), stage_id="ingest", seed=0))
    st.prepare(RunStorage(str(run_dir)))
    return st


def rows_of(st: IngestStage, shard_size: int = 4) -> list[dict[str, Any]]:
    rows = []
    for shard in st.plan(shard_size):
        json.dumps(shard)
        for batch in st.read(shard):
            rows += [dict(zip(batch, v, strict=True)) for v in zip(*batch.values(), strict=True)]
    return rows


def rss() -> int:
    """This process's resident set size now (Linux /proc; the test machines are Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and how far the process RSS rose above its start while it ran (sampled every 5 ms)."""
    start = rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, max(peak[0], rss()) - start


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def plain_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            add(tar, name, data)
    return path


def sparse_tar_with_a_huge_member(path: Path, size: int = GIB) -> Path:
    """A plain tar whose first member claims (and holds, sparsely) ``size`` bytes, then a good one."""
    with open(path, "wb") as f:
        big = tarfile.TarInfo("big.png")
        big.size = size
        f.write(big.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(size, os.SEEK_CUR)  # a hole: costs no disk
        data = png(1)
        good = tarfile.TarInfo("good.png")
        good.size = len(data)
        f.write(good.tobuf(format=tarfile.GNU_FORMAT))
        f.write(data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    return path


@pytest.fixture(scope="module")
def gz_bomb_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .tar.gz of well under 2 MB holding a 1 GiB member (zeros) and one good image."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    chunk = bytes(16 << 20)
    with gzip.open(path, "wb", compresslevel=1) as gz:  # the tar stream written directly: quick
        huge = tarfile.TarInfo("huge.png")
        huge.size = GIB
        gz.write(huge.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(GIB // len(chunk)):
            gz.write(chunk)
        data = png(2)
        ok = tarfile.TarInfo("ok.png")
        ok.size = len(data)
        gz.write(ok.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512) + bytes(1024))
    assert path.stat().st_size < 8 * 1024 * 1024
    return path


def by_reason(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["reason"] or "ok", []).append(r)
    return out


def assert_consistent(rows: list[dict[str, Any]]) -> None:
    ids = [r["sample_id"] for r in rows]
    assert len(set(ids)) == len(ids), "two rows share a sample_id"
    for r in rows:
        assert check_key(r["key"]) == r["key"]
        if r["status"] == "error":
            assert r["reason"] and r["detail"] and r["image"] is None and r["keep"] is False, r
        else:
            assert r["reason"] is None and r["image"]


# ---------------------------------------------------------------- tar members


def test_a_huge_member_of_a_small_tar_gz_is_a_file_too_large_row_and_never_read(
    gz_bomb_tar: Path, tmp_path: Path
) -> None:
    st = make_stage(tmp_path / "run", tars=[str(gz_bomb_tar)], max_file_mb=1, tar_split=True)
    (plan, grew_plan) = rss_growth(lambda: st.plan(1))
    assert plan == [{"tar": str(gz_bomb_tar), "offset": 0, "stop": None}]  # compressed: one shard, nothing read
    rows, grew = rss_growth(lambda: rows_of(st, 1))
    assert grew < RSS_BOUND and grew_plan < RSS_BOUND, (grew, grew_plan)
    assert [(r["source_path"], r["reason"]) for r in rows] == [("huge.png", "file_too_large"), ("ok.png", None)]
    assert str(GIB) in rows[0]["detail"]
    assert_consistent(rows)


def test_tar_split_indexes_headers_only_and_never_reads_a_huge_member(tmp_path: Path) -> None:
    tar = sparse_tar_with_a_huge_member(tmp_path / "sparse.tar")
    st = make_stage(tmp_path / "run", tars=[str(tar)], max_file_mb=1, tar_split=True)
    plan, grew_plan = rss_growth(lambda: st.plan(1))
    assert len(plan) == 2 and plan[1]["offset"] > GIB  # the second range starts past the 1 GiB member
    rows, grew = rss_growth(lambda: rows_of(st, 1))
    assert grew_plan < RSS_BOUND and grew < RSS_BOUND, (grew_plan, grew)
    assert [(r["source_path"], r["reason"]) for r in rows] == [("big.png", "file_too_large"), ("good.png", None)]


def test_link_device_and_fifo_tar_members_get_an_error_row_each_and_are_never_followed(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", png(3))
        add(tar, "zero.png", type=tarfile.SYMTYPE, linkname="/dev/zero")
        add(tar, "hard.png", type=tarfile.LNKTYPE, linkname="a.png")
        add(tar, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add(tar, "pipe.png", type=tarfile.FIFOTYPE)
        add(tar, "folder", type=tarfile.DIRTYPE)  # a directory entry is no sample
        add(tar, "b.png", png(4))
    rows = rows_of(make_stage(tmp_path / "run", tars=[str(path)]))
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("a", None), ("zero", "not_a_regular_file"), ("hard", "not_a_regular_file"),
        ("dev", "not_a_regular_file"), ("pipe", "not_a_regular_file"), ("b", None)]
    assert "symlink to '/dev/zero'" in rows[1]["detail"] and "hard link to 'a.png'" in rows[2]["detail"]
    assert_consistent(rows)


def test_a_repeated_key_gives_the_later_occurrence_a_duplicate_key_row_with_its_own_sample_id(
    tmp_path: Path,
) -> None:
    tar = plain_tar(tmp_path / "dup.tar", [("a.png", png(5)), ("b.png", png(6)), ("a.png", png(7)),
                                           ("a.json", b'{"identity_id": "x"}')])
    whole = rows_of(make_stage(tmp_path / "run1", tars=[str(tar)]))
    split_stage = make_stage(tmp_path / "run2", tars=[str(tar)], tar_split=True)
    plan = split_stage.plan(1)
    assert len(plan) == 3 and plan[2]["seen"] == ["a"]  # the third range knows "a" came before
    split = rows_of(split_stage, 1)
    for rows in (whole, split):
        assert [(r["key"].split("-dup-")[0], r["reason"]) for r in rows] == [
            ("a", None), ("b", None), ("a", "duplicate_key")]
        assert rows[0]["image"] == png(5)  # the first occurrence is the sample
        assert_consistent(rows)
    assert [r["sample_id"] for r in whole] == [r["sample_id"] for r in split]


def test_split_tars_are_read_by_byte_range_without_reading_the_start(tmp_path: Path) -> None:
    members = [(f"{i:04d}.png", png(10 + i)) for i in range(6)]
    tar = plain_tar(tmp_path / "six.tar", members)
    st = make_stage(tmp_path / "run", tars=[str(tar)], tar_split=True)
    plan = st.plan(2)
    assert [s["offset"] > 0 for s in plan] == [False, True, True]
    expected = [r for b in st.read(plan[1]) for r in b["sample_id"]] + [
        r for b in st.read(plan[2]) for r in b["sample_id"]]
    data = bytearray(tar.read_bytes())
    data[: plan[1]["offset"]] = b"\xff" * plan[1]["offset"]  # a reader that re-read the start would break
    tar.write_bytes(bytes(data))
    later = [r for s in plan[1:] for b in st.read(s) for r in zip(b["sample_id"], b["status"], strict=True)]
    assert [sid for sid, _ in later] == expected and {s for _, s in later} == {"ok"}


def test_unsafe_member_names_keep_their_error_rows_and_distinct_ids(tmp_path: Path) -> None:
    tar = plain_tar(tmp_path / "evil.tar", [("../x.png", png(1)), ("../x.png", png(2)), ("/etc/y.png", png(3)),
                                            ("noext", b"x"), ("ok.png", png(4))])
    rows = rows_of(make_stage(tmp_path / "run", tars=[str(tar)]))
    assert [r["reason"] for r in rows] == ["unsafe_member_name"] * 3 + ["member_without_extension", None]
    assert_consistent(rows)


def test_a_tar_cut_at_a_member_boundary_keeps_its_rows_and_gets_a_truncated_tar_row(tmp_path: Path) -> None:
    tar = plain_tar(tmp_path / "whole.tar", [("a.png", png(1)), ("b.png", png(2))])
    data = tar.read_bytes()
    with tarfile.open(tar) as t:
        b_offset = t.getmember("b.png").offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:b_offset])  # a ends cleanly; b and the end-of-archive blocks are gone
    rows = rows_of(make_stage(tmp_path / "run", tars=[str(cut)]))
    assert [r["reason"] for r in rows] == [None, "truncated_tar"]
    assert "a.png" in rows[1]["detail"]
    assert_consistent(rows)


def test_a_zero_byte_tar_and_a_text_file_named_tar_are_unreadable_tar_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_text("not a tar at all\n" * 100)
    rows = rows_of(make_stage(tmp_path / "run", tars=[str(tmp_path / "*.tar")]))
    assert [r["reason"] for r in rows] == ["unreadable_tar", "unreadable_tar"]
    assert_consistent(rows)


# ---------------------------------------------------------------- folders


def test_a_symlink_to_dev_zero_and_special_files_in_a_folder_are_error_rows_and_never_read(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "ok.png").write_bytes(png(1))
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "link.png").symlink_to(root / "ok.png")  # even a link to a good file: never followed
    os.mkfifo(root / "pipe.png")
    (root / "loop").symlink_to(root)  # a directory link loop is never walked
    rows, grew = rss_growth(lambda: rows_of(make_stage(tmp_path / "run", root=str(root))))
    assert grew < RSS_BOUND, grew
    got = {r["source_path"]: (r["reason"], r["detail"]) for r in rows}
    assert got.pop("loop")[0] == "unsupported_extension"  # listed as itself, never descended nor read
    assert got == {"ok.png": (None, None), "zero.png": ("not_a_regular_file", "symlink to '/dev/zero'"),
                   "link.png": ("not_a_regular_file", f"symlink to '{root / 'ok.png'}'"),
                   "pipe.png": ("not_a_regular_file", "fifo")}
    assert_consistent(rows)


def test_a_file_larger_than_max_file_mb_is_a_file_too_large_row_without_being_read(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    with open(root / "huge.png", "wb") as f:  # sparse: 1 GiB that costs no disk
        f.truncate(GIB)
    (root / "ok.png").write_bytes(png(2))
    rows, grew = rss_growth(lambda: rows_of(make_stage(tmp_path / "run", root=str(root), max_file_mb=1)))
    assert grew < RSS_BOUND, grew
    assert [(r["source_path"], r["reason"]) for r in rows] == [("huge.png", "file_too_large"), ("ok.png", None)]


def test_zero_byte_text_as_jpeg_and_a_decompression_bomb_are_rows_with_their_rules(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("<html>definitely not a JPEG</html>\n")
    Image.new("1", (12000, 12000)).save(root / "bomb.png")  # 144 MP (432 MB as RGB) in a few KB
    assert (root / "bomb.png").stat().st_size < 200_000
    rows, grew = rss_growth(lambda: rows_of(make_stage(tmp_path / "run", root=str(root))))
    assert grew < RSS_BOUND, grew
    assert {r["source_path"]: r["reason"] for r in rows} == {
        "zero.jpg": "empty_file", "text.jpg": "not_an_image", "bomb.png": "image_too_large"}
    assert_consistent(rows)


# ---------------------------------------------------------------- transient storage errors


class _Storage:
    """An HTTP object server on 127.0.0.1 (outside the project, at its protocol) that can fail."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bool) -> None:
                data = outer.files.get(self.path)
                status = outer.status if outer.status != 200 else (200 if data is not None else 404)
                payload = data if status == 200 and data is not None else b"unavailable"
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def do_GET(self) -> None:
                self._reply(True)

            def do_HEAD(self) -> None:
                self._reply(False)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[_Storage]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "a.png", png(1))
    server = _Storage({"/shard.tar": buf.getvalue()})
    yield server
    server.close()


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_storage_5xx_or_throttling_raises_transient_error_not_an_unreadable_row(
    storage: _Storage, tmp_path: Path, status: int
) -> None:
    st = make_stage(tmp_path / "run", tars=[storage.url("shard.tar")])
    plan = st.plan(8)
    storage.status = status
    with pytest.raises(TransientError, match="transient storage error"):
        rows_of(st)
    storage.status = 200  # the engine's retry of the shard
    rows = [r for s in plan for b in st.read(s) for r in b["reason"]]
    assert rows == [None]


def test_a_storage_server_that_is_down_raises_transient_error_and_a_missing_file_is_a_row(
    storage: _Storage, tmp_path: Path
) -> None:
    missing = rows_of(make_stage(tmp_path / "run1", tars=[storage.url("missing.tar")]))
    assert [r["reason"] for r in missing] == ["unreadable_tar"]  # a 404 is the file's own problem
    st = make_stage(tmp_path / "run2", tars=[storage.url("shard.tar")])
    storage.close()  # connection refused
    with pytest.raises(TransientError):
        rows_of(st)


def test_transient_classification_follows_the_exception_chain() -> None:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def client_error(code: str, status: int) -> BaseException:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))

    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("NoSuchKey", 404)) and not is_transient(client_error("AccessDenied", 403))
    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert not is_transient(OSError("a disk error")) and not is_transient(FileNotFoundError("x"))


def test_a_pax_header_claiming_a_huge_size_is_a_corrupt_tar_row_and_never_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "pax.tar.gz"
    size = 256 << 20
    with gzip.open(path, "wb", compresslevel=1) as gz:
        ok = png(9)
        good = tarfile.TarInfo("good.png")
        good.size = len(ok)
        gz.write(good.tobuf(format=tarfile.GNU_FORMAT) + ok + bytes(-len(ok) % 512))
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, size
        gz.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(size // (16 << 20)):
            gz.write(bytes(16 << 20))
        gz.write(bytes(1024))
    st = make_stage(tmp_path / "run", tars=[str(path)], max_file_mb=1)
    rows, grew = rss_growth(lambda: rows_of(st))
    assert grew < RSS_BOUND, grew
    assert [(r["source_path"], r["reason"]) for r in rows] == [("good.png", None), ("", "corrupt_tar")]
    assert "asks for" in rows[1]["detail"]
