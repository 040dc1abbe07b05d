"""Streaming reader for shard sets (see :mod:`robustbench_ft.data.shards` for the format).

Shards, not samples, are the unit of work: shard ``i`` goes to rank ``i % world_size``, and a
rank's shards go round-robin to its DataLoader workers. Every sample is therefore read exactly once
across all ranks and workers, each process reads whole tar files sequentially, and no process needs
to know what the others read.

The price is order: with several workers (or ranks) batches interleave shards. Evaluation that
needs manifest order, or gathers logits from ranks, asks for ``with_index=True`` and puts each
sample back at its index, the position of the sample in manifest order (shard by shard, as stored).

Training asks for ``shuffle=True``: the shard order is permuted by ``seed`` (identically on every
rank, before the split, so ranks still partition the set), and each worker passes its samples,
still encoded, through a shuffle buffer. The buffer only mixes nearby samples, so shards should
not be sorted by class (``write_imagefolder_shards(..., shuffle_seed=0)`` for training splits).
"""
from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .shards import REBUILD_HINT, Manifest, RawSample, ShardError, check_shard_files, read_shard


def decode_image(data: bytes, shard: Path, key: str) -> Image.Image:
    """Decode stored bytes to an RGB PIL image; any decoder failure names the shard and key."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    # PIL signals bad data through many types (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError...); all of them mean the same thing here: this sample is corrupt.
    except Exception as e:  # noqa: BLE001
        raise ShardError(f"shard {shard}: sample {key!r} does not decode as an image ({e}); {REBUILD_HINT}") from e


class ShardDataset(IterableDataset):
    """Iterate the samples of a shard set, split across ranks and DataLoader workers by shard.

    Yields ``(image, label)``; with ``with_index=True`` ``(image, label, index)``, where ``index`` is
    the sample's position in manifest order (0..num_samples-1, stable across runs, ranks and worker
    counts); with ``with_meta=True`` the key and metadata dict (``{}`` when the sample has none) follow:
    ``(image, label, key, meta)`` or, with both, ``(image, label, index, key, meta)``.
    ``image`` is an RGB PIL image, or whatever ``transform`` makes of it.

    ``verify`` is checked at construction, so a broken set fails before any work starts: "size"
    (default) checks that every shard exists with the recorded byte size, "hash" also its sha256,
    "none" only existence. Damage found later while streaming still raises :class:`ShardError`.
    ``len()`` is the number of samples this rank reads (over all its workers); a rank may get no shard
    at all when the set has fewer shards than ``world_size``.

    ``shuffle``: permute the shard order with ``seed`` and mix samples in a buffer of
    ``shuffle_buffer`` encoded samples per worker (see the module docstring); the order is a
    function of (seed, rank, worker), so pass a new seed per epoch.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        verify: str = "size",
        rank: int = 0,
        world_size: int = 1,
        with_meta: bool = False,
        with_index: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        check_shard_files(self.manifest, self.directory, verify)
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.with_meta = with_meta
        self.with_index = with_index
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._offsets: list[int] = []
        offset = 0
        for info in self.manifest.shards:
            self._offsets.append(offset)
            offset += info.num_samples

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def rank_shards(self) -> list[int]:
        """Indices (into ``manifest.shards``) of the shards this rank reads, in reading order."""
        order = list(range(len(self.manifest.shards)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return sum(self.manifest.shards[i].num_samples for i in self.rank_shards())

    def _raw_samples(self, shards: list[int]) -> Iterator[tuple[int, Path, RawSample]]:
        """(manifest index, shard path, encoded sample) for the given shards, as stored."""
        num_classes = len(self.manifest.classes)
        for i in shards:
            info = self.manifest.shards[i]
            path = self.directory / info.name
            for position, sample in enumerate(read_shard(path, num_classes, expected_samples=info.num_samples)):
                yield self._offsets[i] + position, path, sample

    def __iter__(self) -> Iterator[tuple]:
        shards = self.rank_shards()
        worker = get_worker_info()
        worker_id = 0
        if worker is not None:
            worker_id = worker.id
            shards = shards[worker.id :: worker.num_workers]
        samples = self._raw_samples(shards)
        if self.shuffle:
            # a str seed is hashed deterministically (not by PYTHONHASHSEED), so runs repeat exactly
            rng = random.Random(f"{self.seed}-{self.rank}-{worker_id}")
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for index, path, sample in samples:
            image = decode_image(sample.image_bytes, path, sample.key)
            if self.transform is not None:
                image = self.transform(image)
            item: tuple = (image, sample.label)
            if self.with_index:
                item += (index,)
            if self.with_meta:
                item += (sample.key, sample.meta if sample.meta is not None else {})
            yield item


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Emit ``items`` in random order, holding at most ``size`` of them at a time."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate_with_meta(batch: list[tuple]) -> list:
    """Collate samples whose last two fields are key and metadata: those stay plain lists, since
    metadata dicts differ in keys from sample to sample and cannot be stacked."""
    head = default_collate([item[:-2] for item in batch])
    return [*head, [item[-2] for item in batch], [item[-1] for item in batch]]


def make_loader(
    directory: str | os.PathLike,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    verify: str = "size",
    with_index: bool = False,
    with_meta: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader of batches ``[images, labels]`` (+ ``indices`` with ``with_index``, + ``keys``
    and ``metas`` lists with ``with_meta``) over a shard set; see :class:`ShardDataset`.

    ``transform`` must turn a PIL image into a tensor so that batches stack. ``shuffle``, ``seed``
    and ``shuffle_buffer`` are :class:`ShardDataset`'s (the DataLoader's own shuffle does not apply
    to a stream). Memory is pinned when
    CUDA is available unless ``pin_memory`` is given; other ``loader_kwargs`` go to the DataLoader.
    Each worker ends with its own partial batch, so with ``num_workers > 1`` there can be up to
    ``num_workers - 1`` more batches than ``len(loader)`` (which counts ``len(dataset) / batch_size``);
    use ``len(loader.dataset)`` (samples on this rank) for progress bars.
    """
    if transform is None:
        raise ValueError("make_loader needs a transform that turns PIL images into tensors (batches are stacked)")
    dataset = ShardDataset(
        directory, transform, verify=verify, rank=rank, world_size=world_size,
        with_meta=with_meta, with_index=with_index, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer,
    )
    loader_kwargs.setdefault("pin_memory", torch.cuda.is_available())
    if with_meta:
        loader_kwargs.setdefault("collate_fn", collate_with_meta)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **loader_kwargs)
