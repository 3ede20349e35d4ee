"""The export's one deterministic order: a sample's or identity's place in [0, 1) from a hash of a
tagged id. Splits, shard assignment, identity ranking and image picks all draw from it, each with its
own tag, so a rerun (or a run on another partition count) makes the same choices."""

from __future__ import annotations

import hashlib


def unit(text: str) -> float:
    """The first 48 bits of the text's SHA-256 as a fraction of 1."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(1 << 48)
