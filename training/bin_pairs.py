"""insightface verification pair files (lfw, cfp_fp, agedb_30, calfw, cplfw ``.bin``), read without mxnet.

The format is a pickle of ``(images, issame)``: ``images`` a list of 2N encoded images (JPEG/PNG
bytes; Python-2-era files hold them as ``str`` read back with ``encoding="bytes"``, newer ones may
hold uint8 numpy arrays), ``issame`` a list of N booleans (pair i is images 2i and 2i+1).

A pickle can run any callable it names, so these files are never given to ``pickle.load``. The
restricted unpickler resolves only the few globals such files contain — ``_codecs.encode`` (how
protocol 2 spells bytes, checked to be a latin-1 str->bytes), ``bytes()`` (how it spells empty
bytes, never ``bytes(n)``), numpy's array/scalar reconstructors and ``dtype`` (numeric dtypes
only) — and refuses everything else before anything runs.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import fsspec
import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


class PairFileError(ValueError):
    """Not a pair file, or one that asks the unpickler for something it refuses."""


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1" or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as a latin-1 str -> bytes conversion")
    return codecs.encode(text, "latin1")


def _bytes(*args: Any) -> bytes:
    """``bytes(...)``: how protocol 2 spells an empty bytes object, and how a bytes subclass (an
    encoded image that carries its pixels) reduces. ``bytes(n)`` is refused: it allocates n bytes."""
    if not args:
        return b""
    if len(args) == 2 and isinstance(args[0], str):
        return _latin1_encode(args[0], args[1])
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes(...) is allowed only empty or from a latin-1 str in a pair file")


def _numeric_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align=align, copy=copy)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"dtype {dtype} is not allowed in a pair file")
    return dtype


def _ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed in a pair file")
    return cast(np.ndarray, _multiarray._reconstruct(np.ndarray, shape, dtype))


def _scalar(dtype: Any, data: bytes = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy scalars are allowed in a pair file")
    return _multiarray.scalar(dtype, data)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``; any other global (os.system, builtins.eval,
    subprocess.Popen, ...) raises ``UnpicklingError`` when the pickle names it, before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"pair file refers to {module}.{name}, which is not allowed")
        return target


@dataclass(frozen=True)
class PairFile:
    name: str
    images: list[bytes]  # 2N encoded images
    issame: np.ndarray  # (N,) bool

    @property
    def pairs(self) -> np.ndarray:
        """(N, 2) indices into ``images``."""
        n = len(self.issame)
        return np.stack([np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2)], axis=1)


def _as_bytes(item: Any, i: int) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise PairFileError(f"image {i}: expected encoded image bytes, got {type(item).__name__}")


def _as_bool(item: Any, i: int) -> bool:
    if isinstance(item, bool | np.bool_) or (isinstance(item, int | np.integer) and item in (0, 1)):
        return bool(item)
    raise PairFileError(f"issame[{i}]: expected a boolean, got {item!r}")


def parse_pair_file(data: bytes, name: str = "pairs") -> PairFile:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise PairFileError(f"{name}: {exc}") from exc
    except Exception as exc:  # truncated or not a pickle at all
        raise PairFileError(f"{name}: not an insightface pair file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise PairFileError(f"{name}: expected a pickled (images, issame) pair")
    raw_images, raw_same = obj
    if isinstance(raw_same, np.ndarray):
        raw_same = raw_same.tolist()
    if not isinstance(raw_images, list | tuple) or not isinstance(raw_same, list | tuple):
        raise PairFileError(f"{name}: images and issame must be lists")
    images = [_as_bytes(x, i) for i, x in enumerate(raw_images)]
    issame = np.asarray([_as_bool(x, i) for i, x in enumerate(raw_same)], dtype=bool)
    if len(images) != 2 * len(issame):
        raise PairFileError(f"{name}: {len(images)} images for {len(issame)} pairs (expected twice as many)")
    return PairFile(name=name, images=images, issame=issame)


def read_pair_file(path: str, storage_options: dict[str, Any] | None = None) -> PairFile:
    """Read an insightface ``.bin`` pair file from a path or fsspec URL."""
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        data = f.read()
    stem = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".bin")
    return parse_pair_file(data, stem)


def write_pair_file(
    path: str, images: Sequence[bytes], issame: Sequence[bool], storage_options: dict[str, Any] | None = None
) -> None:
    """Write the same format (e.g. our held-out pairs, for tools that read insightface bins)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    payload = pickle.dumps(([bytes(b) for b in images], [bool(s) for s in issame]), protocol=4)
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(payload)
