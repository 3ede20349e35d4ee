"""File names as text, losslessly, and which names are images: the one place these rules live.

A POSIX file name or a tar member name is bytes, and need not be UTF-8 (``bad\\xff\\xfe.png``). Every
name a run records (listings, ``source_path``, tar member names, keys and sample ids derived from
them) is the text ``name_text`` gives, and every re-read of the file uses the bytes ``name_bytes``
gives back from that text:

- a name that is valid UTF-8 is its own text, byte for byte;
- any other name has each byte that is not part of valid UTF-8 written as ``\\xHH`` (two lower-case
  hex digits) and each backslash written as ``\\x5c``, so that every ``\\xHH`` in the text is an
  escape and the text decodes to exactly the original bytes;
- a valid UTF-8 name that itself holds ``\\x`` and two hex digits is escaped the same way (its
  backslashes become ``\\x5c``), so it is never mistaken for an escape.

The text is plain UTF-8 that Parquet, JSON and DuckDB take, and distinct byte names give distinct
texts, so whatever hashes the text (keys, sample ids) is distinct too.
"""

from __future__ import annotations

import re

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "avif", "jp2")
"""Extensions of the formats Pillow's own wheels decode that photo collections hold. HEIC is not
among them: it needs a plugin (pillow-heif) that is not installed, so such files get a row that says so."""

_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}")
_SMUGGLED = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes


def name_text(name: str | bytes) -> str:
    """The recorded text of a name given as bytes, or as the str ``os.fsdecode`` or ``tarfile`` (with
    ``errors="surrogateescape"``) makes of them."""
    if isinstance(name, bytes):
        raw = name
    else:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate no decoder made: its UTF-8 form is escaped below
            raw = name.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if not _ESCAPE.search(text):
            return text
    smuggled = raw.decode("utf-8", "surrogateescape").replace("\\", "\\x5c")
    return _SMUGGLED.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", smuggled)


def name_bytes(text: str) -> bytes:
    """The original bytes of a name recorded by ``name_text``."""
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group()[2:], 16))
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def name_str(text: str) -> str:
    """The name as the str that ``open``, ``os`` and fsspec take for its original bytes (undecodable
    bytes as surrogate escapes, as Python itself passes them to the OS)."""
    return name_bytes(text).decode("utf-8", "surrogateescape")


def extension(name: str) -> str:
    """The extension of a name's last part (after its last dot), lower-cased; '' when it has none."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1].lower() if "." in base else ""
