"""Thumbnails for the report: the few bytes of one tar member (its manifest byte range, read and checked
by manifests/ranges.py, in a shard tar or a source tar), decoded by the
project's one decode (facekit.imaging.decode: its pixel limit, EXIF orientation, any mode and bit
depth) and re-encoded small, so a page of examples stays a few hundred kB and shows what the stages
saw."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from facekit.imaging import ImageError, decode
from manifests.ranges import ByteRange, CorruptSourceError, fetch_ranges
from manifests.storage import RunStorage

THUMB_PX = 112
# A member larger than this is not an image we should decode for a thumbnail.
MAX_MEMBER_BYTES = 32 << 20


def thumbnail_uri(store: RunStorage, loc: dict[str, Any] | None, px: int = THUMB_PX) -> str | None:
    """A data: URI of the image at ``loc`` ({shard, off, size, crc, ext}), or None when it cannot be read
    or does not match its checksum (a tar changed since: no other pixels are shown in its place)."""
    if not loc or loc.get("shard") is None or loc.get("off") is None or loc.get("size") is None:
        return None
    size = int(loc["size"])
    if not 0 < size <= MAX_MEMBER_BYTES:
        return None
    try:
        crc = loc.get("crc")
        data = fetch_ranges(store, [ByteRange(str(loc["shard"]), int(loc["off"]), size,
                                              None if crc is None else int(crc))])[0]
        rgb = Image.fromarray(decode(data, min_side=1, draft=px).rgb)
    except (OSError, ImageError, CorruptSourceError):
        return None
    rgb.thumbnail((px, px))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
