"""Thumbnails for the report: the few bytes of one tar member (its manifest byte range), decoded with
a size bound and re-encoded small, so a page of examples stays a few hundred kB."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from manifests.storage import RunStorage

THUMB_PX = 112
# A member larger than this is not an image we should decode for a thumbnail.
MAX_MEMBER_BYTES = 32 << 20
MAX_PIXELS = 64_000_000


def thumbnail_uri(store: RunStorage, loc: dict[str, Any] | None, px: int = THUMB_PX) -> str | None:
    """A data: URI of the image at ``loc`` ({shard, off, size, ext}), or None when it cannot be read."""
    if not loc or loc.get("shard") is None or loc.get("off") is None or loc.get("size") is None:
        return None
    size = int(loc["size"])
    if not 0 < size <= MAX_MEMBER_BYTES:
        return None
    try:
        data = store.read_range(str(loc["shard"]), int(loc["off"]), size)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return None
            img.draft("RGB", (px, px))
            rgb = img.convert("RGB")
            rgb.thumbnail((px, px))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
