"""Streaming a shard set from a URL, each shard checked against its manifest's sha256 while it streams.

:class:`StreamingShardDataset` is :class:`~robustbench_ft.loading.shard_dataset.ShardDataset` for a
set that lives at an ``http(s)://`` or ``file://`` URL (the manifest at ``<url>/manifest.json``, the
shards beside it). It yields exactly what the local reader yields, with the same indices, and is
built on the ``webdataset`` pipeline: ``SimpleShardList`` over this rank's shards (shard ``i`` to
rank ``i % world_size``, as locally), ``split_by_worker`` across DataLoader workers, an opener that
hashes every byte it hands on, ``tar_file_expander`` and ``group_by_keys``.

Verification is part of the stream: when a shard has been read, the rest of its bytes (the tar's
end-of-archive padding) are drained and its size and sha256 compared with the manifest's; a shard
that does not match, a connection that breaks, a server that goes away mid-shard, is an error naming
the shard. An error in a sample that is not yet verified (it does not decode, it does not parse) is
first checked against the shard's hash, so a corrupted download is reported as one, not as a bad
image. Samples stream before their shard's hash is known, so a pass over streamed data counts only
when it ends without error: evaluation caches logits and features, and the runner writes records,
only after a complete pass (:mod:`robustbench_ft.evaluation.dataset_pass`). Nothing is stored on disk.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.shards import urls
from robustbench_ft.shards.manifest import Manifest, ShardError, ShardInfo
from robustbench_ft.shards.reader import make_sample

_BUFFER = 1 << 20  # tarfile reads 10 KiB records; buffering keeps network reads large


@dataclass
class _Stream:
    """What one iteration (one DataLoader worker) is reading: the open shard and the shards verified."""

    url: str | None = None
    info: ShardInfo | None = None
    reader: urls.HashingReader | None = None
    verified: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)

    def verify(self) -> None:
        """Drain the open shard and compare it with the manifest; raise ShardError naming it if it differs."""
        reader, info, url = self.reader, self.info, self.url
        if reader is None or info is None or url is None or url in self.verified:
            return
        size, digest = reader.finish()
        if size != info.size or digest != info.sha256:
            what = f"{size} bytes, the manifest says {info.size}" if size != info.size else \
                "its sha256 differs from the manifest's"
            raise ShardError(f"streamed shard {urls.describe(url)} does not match its manifest ({what}): the copy at "
                             "the URL is corrupt, was replaced, or was damaged in transit; nothing from this pass is "
                             "cached or recorded")
        self.verified.add(url)

    def explain(self, exc: BaseException) -> ShardError:
        """The error to report for ``exc``, raised while the open shard was not yet verified: a hash mismatch,
        if the rest of the shard shows one, else ``exc`` itself as one clean line naming the shard."""
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        if isinstance(exc, ShardError) and message.startswith("streamed shard "):
            return ShardError(message)
        try:
            self.verify()
        except ShardError as mismatch:
            return mismatch
        except Exception:  # noqa: BLE001 - the shard cannot be drained either; report the first failure
            pass
        if isinstance(exc, ShardError):
            return ShardError(message)
        return ShardError(f"streamed shard {urls.describe(self.url or '?')} is unreadable ({type(exc).__name__}: "
                          f"{message[:200]})")


def _open_verified(stream: _Stream, by_url: dict[str, ShardInfo], src: Iterable[dict]) -> Iterator[dict]:
    """webdataset opener stage: ``dict(url=...)`` -> ``dict(url=..., stream=...)``; each shard is verified
    when the next one is asked for (the tar expander has read it to its end by then) and after the last."""
    for item in src:
        stream.verify()
        url = item["url"]
        stream.url, stream.info = url, by_url[url]
        stream.reader = urls.HashingReader(urls.open_url(url), url)
        stream.counts[url] = 0
        yield {"url": url, "stream": io.BufferedReader(stream.reader, _BUFFER)}
    stream.verify()


class StreamingShardDataset(ShardDataset):
    """A :class:`ShardDataset` read from a URL (see the module docstring). Error mode only: a sample
    that cannot be read ends the pass (skipping needs the local reader, which can re-read shards)."""

    def __init__(self, location: str, transform=None, verify: str = "hash", rank: int = 0, world_size: int = 1,
                 with_meta: bool = False, with_index: bool = False, on_bad: str = "error", decoder=None):
        urls.check_stream_location(location, "shard set")
        if on_bad != "error":
            raise ValueError(f"{urls.describe(location)}: --on-bad-sample skip needs local shards (the skip path "
                             "re-reads damaged shards); import the set with `robustbench-ft shard import-wds` or "
                             "copy it, or evaluate it in error mode")
        super().__init__(location, transform, verify=verify, rank=rank, world_size=world_size, with_meta=with_meta,
                         with_index=with_index, on_bad=on_bad, decoder=decoder)

    def _open(self, directory: Any) -> tuple[Any, Manifest]:
        return str(directory), urls.load_manifest(str(directory))

    def _check_files(self, verify: str) -> None:
        """Nothing to check up front: every shard is hashed as it streams."""

    def __iter__(self) -> Iterator[tuple]:
        stream = _Stream()
        try:
            yield from self._emit(self._streamed(stream))
        except Exception as exc:  # noqa: BLE001 - webdataset, tarfile and the network raise many types
            raise stream.explain(exc) from None

    def _streamed(self, stream: _Stream) -> Iterator[tuple[int, str, Any]]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        mine = self.rank_shards()
        names = {i: str(urls.join(self.directory, self.manifest.shards[i].name)) for i in mine}
        by_url = {url: self.manifest.shards[i] for i, url in names.items()}
        index = {url: i for i, url in names.items()}
        pipeline = wds.DataPipeline(wds.SimpleShardList([names[i] for i in mine]), wds.split_by_worker,
                                    partial(_open_verified, stream, by_url), tar_file_expander, group_by_keys)
        num_classes = len(self.manifest.classes)
        for sample in pipeline:
            url = sample["__url__"]
            position = stream.counts[url]
            info = by_url[url]
            if position >= info.num_samples:
                raise ShardError(f"streamed shard {urls.describe(url)} holds more samples than the manifest's "
                                 f"{info.num_samples}")
            stream.counts[url] = position + 1
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            yield self._offsets[index[url]] + position, url, make_sample(url, sample["__key__"], members, num_classes)
        short = next((u for u, n in stream.counts.items() if n != by_url[u].num_samples), None)
        if short is not None:
            raise ShardError(f"streamed shard {urls.describe(short)} holds {stream.counts[short]} samples but the "
                             f"manifest says {by_url[short].num_samples}")


def is_streamed(location: Any) -> bool:
    """Whether a shard set at ``location`` is read by :class:`StreamingShardDataset` (a URL) rather than locally."""
    return urls.is_url(location)
