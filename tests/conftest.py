"""Test-wide guards: no network, no hub downloads."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import pytest

from tests.fixtures import engine_stage, pattern_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_real_connect = socket.socket.connect


def _own_addresses() -> set[str]:
    """This machine's own addresses: Ray's processes talk to each other on the node IP."""
    try:
        return set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return set()


_OWN = _own_addresses()


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):
        return True  # unix sockets
    host = str(address[0])
    if host in ("localhost", "") or host in _OWN:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        raise RuntimeError(f"test tried to open a network connection to {address!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(scope="session")
def ray_session():  # type: ignore[no-untyped-def]
    """One local Ray for every in-process pipeline test (starting Ray costs seconds)."""
    import tempfile

    import ray

    from pipeline.engine import embedded

    if not ray.is_initialized():  # started as a run starts its own Ray
        embedded.start(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"), configure_logging=False,
                       log_to_driver=False)
    yield ray
    embedded.stop()


ENGINE_CONFIG = pattern_config(
    "engine-test", seed=3, shard_size=8, identities=(6, 4, 64, 0.5),
    stages=[engine_stage("MeanFilter", "meanf", params={"min_mean": 60})],
    export={"shard_size": 5, "val_fraction": 0.34, "min_images_per_identity": 2})


@pytest.fixture
def engine_config() -> dict:
    import copy

    return copy.deepcopy(ENGINE_CONFIG)


@pytest.fixture(scope="module")
def photo() -> Any:
    """insightface's group photo (t1.jpg, six faces) as RGB; skips where insightface (the models extra) is
    not installed."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return np.asarray(Image.open(path).convert("RGB"))
