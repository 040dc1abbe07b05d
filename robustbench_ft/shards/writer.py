"""Writing shard sets: images encoded deterministically, shards written to a temporary name and renamed when
finished, the manifest last.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Union

from PIL import Image

from robustbench_ft.shards.manifest import (
    IMAGE_FORMATS,
    MANIFEST_FILE,
    Manifest,
    ShardInfo,
    check_classes,
    check_key,
    check_label,
    check_name,
    shard_file_name,
)
from robustbench_ft.shards.tarformat import BLOCK, RECORD, tar_header

ImageInput = Union[Image.Image, bytes]


def sniff_image_format(data: bytes) -> str | None:
    """The shard image format of encoded bytes from their magic number, or None if not png/jpg/webp."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (aspect kept); never upscale, since that only adds bytes."""
    width, height = image.size
    shorter = min(width, height)
    if shorter <= size:
        return image
    scale = size / shorter
    new_size = (size, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def encode_image(
    image: Image.Image, image_format: str, quality: int = 95, resize_shorter: int | None = None
) -> bytes:
    """Encode a PIL image for a shard: optional shorter-side resize, then png/jpg/webp.

    Grayscale stays grayscale (a third of the bytes; the reader converts to RGB); every other mode
    becomes RGB, because the reader decodes to RGB anyway and JPEG cannot hold alpha.
    """
    if resize_shorter is not None:
        image = resize_shorter_side(image, resize_shorter)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG")
    elif image_format == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buf.getvalue()


class ShardFile:
    """Writes one tar shard to ``PATH.tmp`` and renames it to ``PATH`` when finished.

    The building block of :class:`ShardWriter` and of the parallel ImageFolder converter (each worker
    process writes whole shards with it). Header fields are fixed (mtime 0, uid/gid 0, mode 0644) so
    the bytes, and therefore the sha256, depend only on the samples; the sha256 is computed while
    writing. Key uniqueness across the dataset is the caller's job (it spans shards);
    :func:`verify_shards` checks it afterwards.
    """

    def __init__(self, path: Path, image_format: str, num_classes: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.image_format = image_format
        self.num_classes = num_classes
        self.num_samples = 0
        self._file = open(self.tmp_path, "wb")
        self._digest = hashlib.sha256()
        self._size = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self._size += len(data)

    def _add_member(self, name: str, data: bytes) -> None:
        self._write(tar_header(name, len(data)))
        self._write(data)
        if len(data) % BLOCK:
            self._write(bytes(BLOCK - len(data) % BLOCK))

    def add(self, key: str, image_bytes: bytes, label: int, meta: dict | None = None) -> None:
        check_key(key)
        label = check_label(label, self.num_classes, key)
        found = sniff_image_format(image_bytes)
        if found != self.image_format:
            raise ValueError(
                f"sample {key!r}: image bytes are {found or 'not png/jpg/webp'}, but this shard set stores "
                f"{self.image_format}; pass a PIL image to have it encoded, or bytes already in {self.image_format}"
            )
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"sample {key!r}: meta must be a dict or None, got {type(meta).__name__}")
        meta_bytes = None
        if meta is not None:
            try:
                meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=True).encode("ascii")
            except (TypeError, ValueError) as e:
                raise ValueError(f"sample {key!r}: meta is not JSON-serialisable ({e})") from e
        self._add_member(f"{key}.{self.image_format}", image_bytes)
        self._add_member(f"{key}.cls", str(label).encode("ascii"))
        if meta_bytes is not None:
            self._add_member(f"{key}.json", meta_bytes)
        self.num_samples += 1

    def finish(self) -> ShardInfo:
        """Close the tar, flush it to disk and move it into place; returns its manifest entry."""
        self._write(bytes(2 * BLOCK))  # end-of-archive marker
        if self._size % RECORD:
            self._write(bytes(RECORD - self._size % RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        info = ShardInfo(self.path.name, self.num_samples, self._size, self._digest.hexdigest())
        os.replace(self.tmp_path, self.path)
        return info

    def discard(self) -> None:
        """Drop an unfinished shard (used when a build fails)."""
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def prepare_output_dir(out_dir: Path, name: str) -> None:
    """Make ``out_dir`` ready for a fresh build of ``name``.

    The old manifest goes first, so that an interrupted rebuild can never pass for the previous
    complete one; stale shards of the same name (a previous build may have had more) go with it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    stale = re.compile(re.escape(name) + r"-\d{6}\.tar(\.tmp)?")
    for path in out_dir.iterdir():
        if stale.fullmatch(path.name):
            path.unlink()


class ShardWriter:
    """Context manager that streams samples into shards and writes the manifest on success.

    ::

        with ShardWriter(out, "digits-test", classes) as writer:
            for key, image, label in samples:
                writer.write(key, image, label)
        writer.manifest.num_samples

    Leaving the ``with`` block through an exception writes no manifest (the directory then reads
    as an interrupted build) and removes the unfinished ``*.tar.tmp``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        classes: Iterable[str],
        samples_per_shard: int = 1000,
        image_format: str = "png",
        quality: int = 95,
        resize_shorter: int | None = None,
        metadata: dict | None = None,
    ):
        check_name(name)
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if resize_shorter is not None and resize_shorter < 1:
            raise ValueError(f"resize_shorter must be a positive size or None, got {resize_shorter}")
        self.out_dir = Path(out_dir)
        self.name = name
        self.classes = check_classes(classes)
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.quality = quality
        self.resize_shorter = resize_shorter
        self.metadata = dict(metadata or {})
        try:  # fail now, not in __exit__ after all the encoding work
            json.dumps(self.metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable ({e})") from e
        self.manifest: Manifest | None = None
        self._shards: list[ShardInfo] = []
        self._current: ShardFile | None = None
        self._keys: set[str] = set()
        self._open = False

    def __enter__(self) -> "ShardWriter":
        prepare_output_dir(self.out_dir, self.name)
        self._open = True
        return self

    def write(self, key: str, image: ImageInput, label: int, meta: dict | None = None) -> None:
        """Add one sample. ``image``: a PIL image (encoded here) or bytes already in ``image_format``."""
        if not self._open:
            raise RuntimeError("ShardWriter.write() outside its `with` block")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}: keys must be unique across the dataset")
        if isinstance(image, Image.Image):
            data = encode_image(image, self.image_format, self.quality, self.resize_shorter)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            raise TypeError(f"sample {key!r}: image must be a PIL image or encoded bytes, got {type(image).__name__}")
        if self._current is None:
            path = self.out_dir / shard_file_name(self.name, len(self._shards))
            self._current = ShardFile(path, self.image_format, len(self.classes))
        self._current.add(key, data, label, meta)
        self._keys.add(key)
        if self._current.num_samples >= self.samples_per_shard:
            self._shards.append(self._current.finish())
            self._current = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._open = False
        if exc_type is not None:
            if self._current is not None:
                self._current.discard()
            return
        if self._current is not None:
            self._shards.append(self._current.finish())
            self._current = None
        if not self._shards:
            raise ValueError(f"no samples were written to {self.out_dir}; an empty shard set is not saved")
        self.manifest = Manifest(
            name=self.name,
            classes=self.classes,
            num_samples=sum(s.num_samples for s in self._shards),
            image_format=self.image_format,
            shards=tuple(self._shards),
            resize_shorter=self.resize_shorter,
            metadata=self.metadata,
        )
        self.manifest.save(self.out_dir)


def write_shards(
    samples: Iterable[tuple[str, ImageInput, int, dict | None]],
    out_dir: str | os.PathLike,
    name: str,
    classes: Iterable[str],
    **writer_kwargs: Any,
) -> Manifest:
    """Write ``(key, image, label, meta)`` tuples as a shard set; ``writer_kwargs`` go to :class:`ShardWriter`."""
    with ShardWriter(out_dir, name, classes, **writer_kwargs) as writer:
        for key, image, label, meta in samples:
            writer.write(key, image, label, meta)
    assert writer.manifest is not None
    return writer.manifest
