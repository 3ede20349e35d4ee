"""Streaming reader of exported WebDataset shards, split across DDP ranks and DataLoader workers.

Shards are read sequentially (tar streams through fsspec, so local disks and object stores behave
the same) and never loaded whole. Every consumer (rank x DataLoader worker) takes a disjoint part of
each epoch: whole shards when there are at least as many shards as consumers (no wasted reads), else
every n-th sample of a shared read, so a small export still feeds any number of workers. All
consumers agree on the epoch's shard order because it is drawn from (seed, epoch).

Training streams repeat forever; the loop counts steps, so DDP ranks never disagree on when an
epoch ends (a rank that runs out first would otherwise hang the others in all-reduce). A sample
that fails to decode is logged and skipped: a bad file never stops a run.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from facekit.imaging import decode_rgb

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # webdataset sample: "__key__", "__url__" and one bytes value per member suffix


def _warn_and_continue(exc: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exc)
    return True


def iter_shard_samples(
    urls: Iterable[str], storage_options: dict[str, Any] | None = None
) -> Iterator[Sample]:
    """Samples of the given tar shards, in order, one shard open at a time."""
    opts = storage_options or {}
    for url in urls:
        try:
            with fsspec.open(url, "rb", **opts) as stream:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=_warn_and_continue)
                yield from group_by_keys(files, handler=_warn_and_continue)
        except (OSError, ValueError, tarfile.TarError) as exc:
            log.warning("skipping shard %s (missing or truncated; the rest still trains): %s", url, exc)


def decode_rgb_tensor(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W), by the pipeline's own decode (facekit.imaging.decode_rgb), so
    training sees the pixels every stage saw: an exported JPEG keeps its EXIF orientation tag and a
    16-bit PNG its depth, and a decoder of its own would turn or clip them differently. Raises
    ImageError (a ValueError) for bytes that are not a usable image."""
    return torch.from_numpy(np.ascontiguousarray(decode_rgb(data).transpose(2, 0, 1)))


def image_member(sample: Sample, preferred: str = "png") -> bytes:
    for name in (preferred, "png", "jpg", "jpeg", "webp"):
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image member (members: {sorted(sample)})")


class ShardStream(IterableDataset):
    """Decoded samples from a list of shards: ``decode(sample)`` returns the item or raises to skip it."""

    def __init__(
        self,
        shards: list[str] | tuple[str, ...],
        decode: Callable[[Sample], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        repeat: bool = True,
        start_epoch: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        self.shards = list(shards)
        self.decode = decode
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.repeat, self.start_epoch = repeat, start_epoch
        self.storage_options = storage_options or {}

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nworkers + wid, self.world_size * nworkers

    def epoch_samples(self, epoch: int) -> Iterator[Sample]:
        """This consumer's raw samples of one epoch."""
        consumer, consumers = self._consumer()
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if len(order) >= consumers:
            yield from iter_shard_samples(order[consumer::consumers], self.storage_options)
            return
        for i, sample in enumerate(iter_shard_samples(order, self.storage_options)):
            if i % consumers == consumer:
                yield sample

    def __iter__(self) -> Iterator[Any]:
        consumer, _ = self._consumer()
        epoch = self.start_epoch
        while True:
            rng = random.Random(f"{self.seed}:{epoch}:{consumer}")
            items = self._decoded(self.epoch_samples(epoch))
            if self.shuffle and self.shuffle_buffer > 1:
                items = buffer_shuffle(items, self.shuffle_buffer, rng)
            yield from items
            if not self.repeat:
                return
            epoch += 1

    def _decoded(self, samples: Iterator[Sample]) -> Iterator[Any]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except Exception as exc:  # corrupt bytes, missing member, bad label: skip, never crash
                log.warning(
                    "skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), exc
                )


def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle with bounded memory: what WebDataset's ``.shuffle(n)`` does."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class RecognitionDecoder:
    """(image float (3, S, S) normalised to [-1, 1], label, key) from an export sample."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], image_key: str = "png") -> None:
        self.transform = transform
        self.image_key = image_key

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, int, str]:
        image = decode_rgb_tensor(image_member(sample, self.image_key))
        label = int(sample["cls"].decode("ascii").strip())
        return self.transform(image), label, sample["__key__"]


def make_loader(
    dataset: IterableDataset,
    batch_size: int,
    num_workers: int = 0,
    prefetch_factor: int = 4,
    drop_last: bool = True,
) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
