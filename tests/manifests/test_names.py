"""File names as recorded text: names that are not UTF-8 escaped losslessly, valid ones untouched."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from manifests.names import extension, name_bytes, name_str, name_text

NOT_UTF8 = [
    b"bad\xff\xfe.png",  # bytes that never start a UTF-8 sequence
    b"caf\xe9.jpg",  # Latin-1
    b"\xc3(x.png",  # a lead byte without its continuation
    b"cut\xe2\x82.png",  # a sequence cut short
    b"\xed\xa0\x80.png",  # an encoded surrogate (valid in CESU-8, not in UTF-8)
    b"dir\x80/sub\\dir/x\xff.png",  # a bad byte beside a backslash, in folders
    b"\xff",
]
VALID = ["café.png", "日本/写真.jpg", "a b\\c.png", "x\\y/z.PNG", "100%.png", "\\x4.png"]


@pytest.mark.parametrize("raw", NOT_UTF8)
def test_a_name_that_is_not_utf8_is_escaped_text_that_gives_back_its_exact_bytes(raw: bytes) -> None:
    text = name_text(raw)
    assert name_bytes(text) == raw
    assert name_text(os.fsdecode(raw)) == text  # as os.walk over str or tarfile gives it: the same text
    assert name_str(text) == os.fsdecode(raw)  # what open() takes for those bytes
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)  # no stand-ins left: plain UTF-8
    assert pa.array([text], pa.string()).to_pylist() == [text]  # Parquet takes it
    assert "\\x" in text


@pytest.mark.parametrize("text", VALID)
def test_a_utf8_name_is_its_own_text_byte_for_byte(text: str) -> None:
    assert name_text(text.encode()) == text == name_text(text)
    assert name_bytes(text) == text.encode()


def test_a_utf8_name_that_looks_like_an_escape_is_escaped_itself_so_it_stays_distinct() -> None:
    literal = b"a\\xff.png"  # valid UTF-8: a backslash, 'x', 'f', 'f'
    escaped = b"a\xff.png"
    assert name_text(literal) != name_text(escaped)
    for raw in (literal, escaped, b"\\x5c\xff", b"\\\\x41"):
        assert name_bytes(name_text(raw)) == raw


def test_names_that_differ_only_in_their_bad_bytes_get_distinct_texts() -> None:
    names = [b"p\xff.png", b"p\xfe.png", b"p\xff\xfe.png", b"p\xfe\xff.png", b"p\\xff.png", b"p\xc3.png",
             *NOT_UTF8, *(v.encode() for v in VALID)]
    texts = [name_text(n) for n in names]
    assert len(set(texts)) == len(names)


def test_the_extension_is_the_last_parts_after_its_last_dot() -> None:
    assert [extension(n) for n in ("a/b.c/d.JPG", "a.b/noext", "x.tar.gz", "bad\\xff.PnG")] == [
        "jpg", "", "gz", "png"]
