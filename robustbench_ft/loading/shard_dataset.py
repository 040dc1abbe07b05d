"""Streaming reader for shard sets (see :mod:`robustbench_ft.shards` for the format).

Shards, not samples, are the unit of work: shard ``i`` goes to rank ``i % world_size``, and a
rank's shards go round-robin to its DataLoader workers. Every sample is therefore read exactly once
across all ranks and workers, each process reads whole tar files sequentially, and no process needs
to know what the others read.

The price is order: with several workers (or ranks) batches interleave shards. Evaluation that
needs manifest order, or gathers logits from ranks, asks for ``with_index=True`` and puts each
sample back at its index, the position of the sample in manifest order (shard by shard, as stored).

This reader is for passes over a whole set (evaluation, feature extraction). Training reads samples
by position instead, in an order fixed by (seed, epoch) whatever the worker count
(:mod:`robustbench_ft.loading.training_batches`).
"""
from __future__ import annotations

import bisect
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from robustbench_ft.shards.manifest import REBUILD_HINT, Manifest, ShardError, ShardInfo
from robustbench_ft.shards.reader import BadSample, RawSample, read_shard
from robustbench_ft.shards.verify import check_shard_files, shard_problem

ON_BAD_SAMPLE = ("error", "skip")
MAX_SKIP_EVENTS = 20  # skip events listed per dataset (all are counted)
SkipReport = Callable[[dict], None]


def decode_image(data: bytes, shard: Path, key: str,
                 draft: Callable[[int, int], tuple[int, int] | None] | None = None) -> Image.Image:
    """Decode stored bytes to an RGB PIL image; any decoder failure names the shard and key.

    ``draft(width, height)`` may return the smallest size a JPEG must keep, letting libjpeg decode
    at 1/2, 1/4 or 1/8 scale (``Image.draft``); the original size stays in ``info["original_size"]``.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            original = image.size
            size = draft(*original) if draft is not None and image.format == "JPEG" else None
            if size is not None:
                image.draft("RGB", size)
            rgb = image.convert("RGB")
            rgb.info["original_size"] = original
            return rgb
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
    ``image`` is an RGB PIL image, or whatever ``transform`` makes of it, or ``decoder`` makes of the
    encoded bytes (see :func:`make_loader`).

    ``verify`` is checked at construction, so a broken set fails before any work starts: "size"
    (default) checks that every shard exists with the recorded byte size, "hash" also its sha256,
    "none" only existence. Damage found later while streaming still raises :class:`ShardError`.
    ``len()`` is the number of samples this rank reads (over all its workers); a rank may get no shard
    at all when the set has fewer shards than ``world_size``.

    ``on_bad="skip"`` reads what is readable instead of raising: a sample that does not parse or
    decode is left out, a truncated shard (shorter than its manifest entry) is read up to the
    damage, and a shard that is missing or fails ``verify`` otherwise is left out whole. Skipped
    samples simply do not appear; :func:`describe_skipped` says which and why from their indices.
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
        on_bad: str = "error",
        decoder: Callable[[bytes, Path, str], Any] | None = None,
    ):
        super().__init__()
        if on_bad not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad must be one of {ON_BAD_SAMPLE}, got {on_bad!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.directory, self.manifest = self._open(directory)
        self.on_bad = on_bad
        # shard index -> what is wrong with its file (skip mode; error mode raises here instead)
        self.damaged: dict[int, str] = {}
        self._check_files(verify)
        self.transform = transform
        self.decoder = decoder
        self.rank = rank
        self.world_size = world_size
        self.with_meta = with_meta
        self.with_index = with_index
        self._offsets: list[int] = []
        offset = 0
        for info in self.manifest.shards:
            self._offsets.append(offset)
            offset += info.num_samples

    def _open(self, directory: str | os.PathLike) -> tuple[Any, Manifest]:
        """Where the set is and its manifest (a local directory here; a URL for the streaming reader)."""
        return Path(directory), Manifest.load(directory)

    def _check_files(self, verify: str) -> None:
        """The shard files against the manifest at ``verify`` level: raise (error mode) or note the damage."""
        if self.on_bad == "error":
            check_shard_files(self.manifest, self.directory, verify)
            return
        for i, info in enumerate(self.manifest.shards):
            problem = shard_problem(info, self.directory, verify)
            if problem is not None:
                self.damaged[i] = problem

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def rank_shards(self) -> list[int]:
        """Indices (into ``manifest.shards``) of the shards this rank reads, in reading order."""
        return list(range(len(self.manifest.shards)))[self.rank :: self.world_size]

    def __len__(self) -> int:
        return sum(self.manifest.shards[i].num_samples for i in self.rank_shards())

    def _raw_samples(self, shards: list[int], report: SkipReport | None = None) -> Iterator[tuple[int, Path, RawSample]]:
        """(manifest index, shard path, encoded sample) for the given shards, as stored.

        In skip mode, what is left out is passed to ``report`` as skip events (see :func:`describe_skipped`)."""
        num_classes = len(self.manifest.classes)
        for i in shards:
            info = self.manifest.shards[i]
            path = self.directory / info.name
            if self.on_bad == "error":
                for position, sample in enumerate(read_shard(path, num_classes, expected_samples=info.num_samples)):
                    yield self._offsets[i] + position, path, sample
            else:
                yield from self._tolerant_samples(i, info, path, report or _ignore)

    def _tolerant_samples(self, i: int, info: ShardInfo, path: Path, report: SkipReport) -> Iterator[tuple[int, Path, RawSample]]:
        """One shard in skip mode: its readable samples, at most as many as the manifest lists."""
        problem = self.damaged.get(i)
        truncated = problem is not None and path.is_file() and path.stat().st_size < info.size
        if problem is not None and not truncated:  # missing, replaced or corrupt: nothing in it is trusted
            report(_event(info, None, info.num_samples, problem, path))
            return
        read = 0
        try:
            for position, item in enumerate(read_shard(path, len(self.manifest.classes), info.num_samples,
                                                        keep_bad=True)):
                if position >= info.num_samples:
                    raise ShardError(f"shard {path} holds more samples than the manifest's {info.num_samples}")
                read = position + 1
                if isinstance(item, BadSample):
                    report(_event(info, item.key, 1, item.error, path))
                else:
                    yield self._offsets[i] + position, path, item
        except ShardError as e:
            if read < info.num_samples:  # the rest of the shard cannot be read
                report(_event(info, None, info.num_samples - read, str(e), path))

    def __iter__(self) -> Iterator[tuple]:
        shards = self.rank_shards()
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        return self._emit(self._raw_samples(shards))

    def _emit(self, raw: Iterable[tuple[int, Any, RawSample]]) -> Iterator[tuple]:
        """The items this dataset yields (see the class docstring) from (index, shard, encoded sample)."""
        for index, path, sample in raw:
            try:
                if self.decoder is not None:
                    image = self.decoder(sample.image_bytes, path, sample.key)
                else:
                    image = decode_image(sample.image_bytes, path, sample.key)
            except ShardError:
                if self.on_bad == "error":
                    raise
                continue  # in a worker there is no one to tell; describe_skipped() finds it again
            if self.transform is not None:
                image = self.transform(image)
            item: tuple = (image, sample.label)
            if self.with_index:
                item += (index,)
            if self.with_meta:
                item += (sample.key, sample.meta if sample.meta is not None else {})
            yield item


def _ignore(event: dict) -> None:
    """The skip report of a DataLoader worker: it cannot reach the caller (see ``describe_skipped``)."""


def _event(info: ShardInfo, key: str | None, count: int, error: str, path: Path) -> dict:
    """One skip event as result records store it: shard file name (no local path), the sample key
    (None for the rest of a shard or all of it), how many samples, and a short reason."""
    reason = error.replace(str(path), info.name).replace(f"; {REBUILD_HINT}", "")
    reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the bytes", reason)  # PIL names a BytesIO by address
    reason = reason.replace("<", "‹").replace(">", "›")  # records are shown in reports; keep them plain
    return {"shard": info.name, "key": key, "count": count, "reason": reason[:160]}


def describe_skipped(directory: str | os.PathLike, missing: Iterable[int], verify: str = "size",
                     decoder: Callable[[bytes, Path, str], Any] | None = None) -> dict:
    """Which samples a skip-mode pass left out and why: ``{"count": N, "events": [...],
    "events_omitted": k}`` for the manifest indices ``missing`` that were not read.

    DataLoader workers are separate processes and cannot hand back what they skipped, so the
    shards holding the missing indices are read again here, in the caller, through the same
    skip-mode path (read, then ``decoder`` — the pass's own — or PIL), which meets the same damage.
    ``count`` is ``len(missing)`` whatever that second reading finds; a missing sample it reads
    without trouble is listed as such. At most ``MAX_SKIP_EVENTS`` events are listed.
    """
    missing = sorted(set(int(i) for i in missing))
    wanted = set(missing)
    dataset = ShardDataset(directory, verify=verify, on_bad="skip")
    shards = sorted({bisect.bisect_right(dataset._offsets, i) - 1 for i in missing})
    events: list[dict] = []
    for index, path, sample in dataset._raw_samples(shards, events.append):
        info = dataset.manifest.shards[bisect.bisect_right(dataset._offsets, index) - 1]
        try:
            (decoder or decode_image)(sample.image_bytes, path, sample.key)
        except ShardError as e:
            events.append(_event(info, sample.key, 1, str(e), path))
            continue
        if index in wanted:  # e.g. a read error that did not recur
            events.append(_event(info, sample.key, 1, "not read in the evaluation pass, but readable when "
                                                      "checked afterwards (a transient read error?)", path))
    return {"count": len(missing), "events": events[:MAX_SKIP_EVENTS],
            "events_omitted": max(0, len(events) - MAX_SKIP_EVENTS)}


def locate_sample(directory: str | os.PathLike, index: int) -> tuple[Path, str]:
    """(shard path, key) of the sample at manifest ``index``, for error messages of paths that see only
    indices (device decoding); reads that one shard up to the sample. (``directory``, ``"sample #i"``)
    where the shard cannot tell."""
    fallback = (Path(directory), f"sample #{index}")
    try:
        manifest = Manifest.load(directory)
        offsets = [0]
        for info in manifest.shards:
            offsets.append(offsets[-1] + info.num_samples)
        shard = bisect.bisect_right(offsets, index) - 1
        if not 0 <= shard < len(manifest.shards):
            return fallback
        path = Path(directory) / manifest.shards[shard].name
        for position, item in enumerate(read_shard(path, len(manifest.classes), keep_bad=True)):
            if position == index - offsets[shard]:
                return path, item.key
    except ShardError:
        pass
    return fallback


@contextmanager
def worker_errors():
    """Around a loop over a DataLoader: a ShardError raised in a worker process reaches the caller as the
    worker's own one-line message (PyTorch re-raises it with the worker's traceback as its text)."""
    try:
        yield
    except ShardError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        raise ShardError(text.rsplit("ShardError: ", 1)[-1].strip()) from None


def collate_with_meta(batch: list[tuple]) -> list:
    """Collate samples whose last two fields are key and metadata: those stay plain lists, since
    metadata dicts differ in keys from sample to sample and cannot be stacked."""
    head = default_collate([item[:-2] for item in batch])
    return [*head, [item[-2] for item in batch], [item[-1] for item in batch]]
