"""WebDataset-style tar shards: the on-disk format of every dataset the harness evaluates or trains on.

A dataset directory holds tar shards ``NAME-000000.tar``, ``NAME-000001.tar``, ... and a
``manifest.json``. Each sample in a shard is a group of consecutive tar members sharing one key:

* ``KEY.png`` / ``KEY.jpg`` / ``KEY.webp``: the encoded image (one format per dataset),
* ``KEY.cls``: the class index as ASCII digits,
* ``KEY.json`` (optional): a free metadata dict (source path, WILDS region, ...).

This is the layout the ``webdataset`` package reads, so shards stay usable outside the harness.

The manifest records, per shard, its sample count, byte size and sha256. It is written last and
atomically: a directory without a manifest is an interrupted build and is never read. Because the
shard hashes are in the manifest, :meth:`Manifest.content_hash` identifies the data itself and is
what the logits cache keys on; verification (:func:`verify_shards`) and the streaming reader
(:mod:`robustbench_ft.data.loader`) turn a missing, truncated or corrupt shard into a
:class:`ShardError` that names the file and the fix, never a bare ``tarfile`` error.

Shards are byte-for-byte deterministic (fixed tar header fields, deterministic encoders), so the
same images always give the same hashes, whoever built them and with however many processes.
"""
from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Union

from PIL import Image

FORMAT = "robustbench-ft-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "webp")
# Keys become tar member names "KEY.ext"; WebDataset splits a member name at its first dot, so a key
# may hold no dot, and no slash either (members are flat). Dataset names prefix shard file names.
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_HASH_CHUNK = 1 << 20

ImageInput = Union[Image.Image, bytes]
REBUILD_HINT = (
    "rebuild the shard set (for an ImageFolder tree: `robustbench-ft shard imagefolder SRC DIR`; "
    "otherwise rerun the script that wrote it)"
)


class ShardError(Exception):
    """A shard set is missing, incomplete, corrupt, or disagrees with its manifest."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as recorded in the manifest: its file name (relative to the dataset directory)."""

    name: str
    num_samples: int
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """The description of a complete shard set; see the module docstring for the format."""

    name: str
    classes: tuple[str, ...]
    num_samples: int
    image_format: str
    shards: tuple[ShardInfo, ...]
    resize_shorter: int | None = None
    metadata: dict = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        """Read and validate ``directory/manifest.json``; raise :class:`ShardError` if absent or malformed."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise ShardError(
                f"no {MANIFEST_FILE} in {directory}: the shard set is missing or its build was interrupted; "
                f"{REBUILD_HINT}"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ShardError(
                    f"{path} is not a {FORMAT} version {VERSION} manifest "
                    f"(format={data.get('format')!r}, version={data.get('version')!r}); {REBUILD_HINT}"
                )
            manifest = cls(
                name=str(data["name"]),
                classes=tuple(str(c) for c in data["classes"]),
                num_samples=int(data["num_samples"]),
                image_format=str(data["image_format"]),
                shards=tuple(
                    ShardInfo(str(s["name"]), int(s["num_samples"]), int(s["size"]), str(s["sha256"]))
                    for s in data["shards"]
                ),
                resize_shorter=None if data.get("resize_shorter") is None else int(data["resize_shorter"]),
                metadata=dict(data.get("metadata") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"{path} is malformed ({type(e).__name__}: {e}); {REBUILD_HINT}") from e
        if manifest.image_format not in IMAGE_FORMATS:
            raise ShardError(f"{path}: unknown image_format {manifest.image_format!r}; {REBUILD_HINT}")
        if sum(s.num_samples for s in manifest.shards) != manifest.num_samples:
            raise ShardError(
                f"{path}: num_samples={manifest.num_samples} but the shards hold "
                f"{sum(s.num_samples for s in manifest.shards)}; {REBUILD_HINT}"
            )
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "num_samples": self.num_samples,
            "image_format": self.image_format,
            "resize_shorter": self.resize_shorter,
            "shards": [s.to_dict() for s in self.shards],
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically (tmp file, fsync, rename): readers see all of it or none."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_name(MANIFEST_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def content_hash(self) -> str:
        """sha256 of the data's identity: the class list and the ordered shard hashes.

        Names, metadata and paths are left out on purpose: the same images and labels built under
        another name or directory are the same data, and cached logits stay valid for them.
        """
        canonical = json.dumps(
            {"classes": list(self.classes), "shards": [s.sha256 for s in self.shards]},
            sort_keys=True, separators=(",", ":"), ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def shard_paths(self, directory: str | os.PathLike) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]


@dataclass(frozen=True)
class RawSample:
    """One sample as stored: the image still encoded (decoding is the reader's job)."""

    key: str
    image_bytes: bytes
    image_ext: str
    label: int
    meta: dict | None


@dataclass(frozen=True)
class BadSample:
    """A sample that is in the shard but does not parse (see ``read_shard(keep_bad=True)``)."""

    key: str
    error: str


def shard_file_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"dataset name {name!r} must be non-empty and use only letters, digits, '_' and '-' "
            "(it prefixes the shard file names)"
        )


def check_key(key: str) -> None:
    """Refuse keys that would break the tar layout (a dot splits key from extension; a slash nests)."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"sample key {key!r} must be non-empty and use only letters, digits, '_' and '-' "
            "(no dots or slashes: the key is the tar member name up to its first dot)"
        )


def _check_label(label: int, num_classes: int, key: str) -> int:
    if isinstance(label, bool):
        raise ValueError(f"sample {key!r}: label must be an integer class index, got a bool")
    try:
        value = operator.index(label)
    except TypeError:
        raise ValueError(f"sample {key!r}: label must be an integer class index, got {label!r}") from None
    if not 0 <= value < num_classes:
        raise ValueError(f"sample {key!r}: label {value} is outside 0..{num_classes - 1} ({num_classes} classes)")
    return value


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads the archive to whole records of 20 blocks
# The fixed part of every member header: mode 0644, uid/gid 0 (the fields between name and size)
_HEADER_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte header ``tarfile`` writes (PAX format) for a regular file with mtime 0, mode 0644.

    Building it directly is ~10x faster than ``TarInfo.tobuf`` and, for the plain ASCII names of
    shard members (keys are checked), byte-identical to it (tested); long names fall back to tarfile.
    """
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(
        encoded.ljust(100, b"\x00") + _HEADER_MODE_IDS + b"%011o\x00" % size + b"00000000000\x00"
        + b" " * 8 + b"0" + bytes(100) + b"ustar\x0000" + bytes(_BLOCK - 265)
    )
    header[148:155] = b"%06o\x00" % sum(header)
    return bytes(header)


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
        self._write(_tar_header(name, len(data)))
        self._write(data)
        if len(data) % _BLOCK:
            self._write(bytes(_BLOCK - len(data) % _BLOCK))

    def add(self, key: str, image_bytes: bytes, label: int, meta: dict | None = None) -> None:
        check_key(key)
        label = _check_label(label, self.num_classes, key)
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
        self._write(bytes(2 * _BLOCK))  # end-of-archive marker
        if self._size % _RECORD:
            self._write(bytes(_RECORD - self._size % _RECORD))
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


def check_classes(classes: Iterable[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes must name at least one class")
    if not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be non-empty strings, got {classes!r}")
    if len(set(classes)) != len(classes):
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        raise ValueError(f"classes must be unique; duplicates: {', '.join(duplicates)}")
    return classes


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


def check_shard_files(manifest: Manifest, directory: str | os.PathLike, verify: str = "size") -> None:
    """Check that every shard of ``manifest`` exists and, by level, matches its size or sha256.

    ``verify``: "none" checks existence only, "size" also the byte size (catches truncation and
    interrupted copies for the price of a stat), "hash" also the sha256 (reads every byte the first
    time; a match is remembered per file version, see :func:`_sha256_matches`).
    """
    directory = Path(directory)
    for info in manifest.shards:
        problem = shard_problem(info, directory, verify)
        if problem is not None:
            raise ShardError(f"{problem}; {REBUILD_HINT}")


def shard_problem(info: ShardInfo, directory: str | os.PathLike, verify: str = "size") -> str | None:
    """What is wrong with one shard file at ``verify`` level (see :func:`check_shard_files`), or None."""
    if verify not in ("none", "size", "hash"):
        raise ValueError(f"verify must be 'none', 'size' or 'hash', got {verify!r}")
    path = Path(directory) / info.name
    if not path.is_file():
        return f"shard {path} is missing (listed in {Path(directory) / MANIFEST_FILE})"
    if verify == "none":
        return None
    size = path.stat().st_size
    if size != info.size:
        return f"shard {path} has {size} bytes but the manifest says {info.size}: it is truncated or was replaced"
    if verify == "hash" and not _sha256_matches(path, info.sha256):
        return f"shard {path} is corrupt: its sha256 differs from the manifest's"
    return None


VERIFIED_FILE = ".verified.json"
_verified: dict[Path, dict[str, list]] = {}  # directory -> its VERIFIED_FILE, read once per process


def _sha256_matches(path: Path, expected: str) -> bool:
    """Whether ``path`` hashes to ``expected``, reading it once per file version.

    A match is remembered, by (size, mtime, ctime, inode), in memory and in ``.verified.json`` beside the
    manifest where the directory is writable, so that every evaluation of a large set does not
    re-read gigabytes; a file that changed in any of these is hashed again. (The check guards against
    damage, not against someone who rewrites a shard and restores its timestamps.)
    """
    stat = path.stat()
    version = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, expected]
    stamps = _verified.get(path.parent)
    if stamps is None:
        try:
            stamps = json.loads((path.parent / VERIFIED_FILE).read_text())
            stamps = stamps if isinstance(stamps, dict) else {}
        except (OSError, ValueError):
            stamps = {}
        _verified[path.parent] = stamps
    if stamps.get(path.name) == version:
        return True
    if file_sha256(path) != expected:
        return False
    stamps[path.name] = version
    try:
        from robustbench_ft.results import atomic_write_text

        atomic_write_text(path.parent / VERIFIED_FILE, json.dumps(stamps, sort_keys=True))
    except OSError:  # a read-only dataset directory: remembered for this process only
        pass
    return True


class TarFormatError(Exception):
    """A tar stream that is damaged or uses a feature shards never contain."""


def _octal_field(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 encoding of large numbers
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    digits = field.split(b"\x00", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\x00":
        length_text, _, _ = data[pos:pos + 32].partition(b" ")
        length = int(length_text)
        key, _, value = data[pos + len(length_text) + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_tar_members(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular file in a tar stream, reading headers only.

    A small reader for what shards hold (ustar headers, PAX ``x``/``g`` records, GNU long names);
    it is several times faster than :mod:`tarfile` on archives of many small members, which is
    what shard verification and streaming spend their time on. Anything else (links,
    directories, a bad checksum, a header cut off) raises :class:`TarFormatError`; the data of a
    member is not read here, so a cut inside the last member's data shows when it is read.
    """
    pending: dict[str, str] = {}
    offset = 0
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TarFormatError(f"unexpected end of file at byte {offset} (no end-of-archive marker)")
        offset += _BLOCK
        if header == bytes(_BLOCK):
            return
        checksum = _octal_field(header[148:156])
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError(f"bad header checksum at byte {offset - _BLOCK}")
        size = _octal_field(header[124:136])
        kind = header[156:157]
        data_offset = offset
        padded = size + (-size % _BLOCK)
        if kind in (b"x", b"g", b"L"):
            data = f.read(padded)
            if len(data) < padded:
                raise TarFormatError(f"unexpected end of file in an extended header at byte {offset}")
            offset += padded
            if kind == b"x":
                pending.update(_pax_records(data[:size]))
            elif kind == b"L":
                pending["path"] = data[:size].rstrip(b"\x00").decode("utf-8", "surrogateescape")
            continue
        name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345:346] != b"\x00":
            name = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        name = pending.pop("path", name)
        size = int(pending.pop("size", size))
        padded = size + (-size % _BLOCK)
        pending.clear()
        if kind not in (b"0", b"\x00"):
            raise TarFormatError(f"member {name!r} is not a regular file")
        yield name, data_offset, size
        f.seek(data_offset + padded)
        offset = data_offset + padded


MemberSpans = dict[str, tuple[int, int]]
"""The members of one sample: extension -> (data offset, size) in the shard file."""


def iter_shard_samples(f: BinaryIO, path: Path) -> Iterator[tuple[str, MemberSpans]]:
    """``(key, members)`` of each sample of an open shard, in stored order, reading tar headers only.

    Consecutive members sharing the part of their name before the first dot form one sample. Tar
    damage raises :class:`TarFormatError`; a member without extension or a repeated extension
    raises :class:`ShardError` naming the shard.
    """
    group: MemberSpans = {}
    group_key: str | None = None
    for name, offset, size in iter_tar_members(f):
        key, dot, ext = name.partition(".")
        if not dot:
            raise ShardError(f"shard {path}: member {name!r} has no extension; {REBUILD_HINT}")
        if key != group_key:
            if group_key is not None:
                yield group_key, group
            group_key, group = key, {}
        if ext in group:
            raise ShardError(f"shard {path}: sample {key!r} has two '{ext}' members; {REBUILD_HINT}")
        group[ext] = (offset, size)
    if group_key is not None:
        yield group_key, group


def read_span(f: BinaryIO, span: tuple[int, int], what: str) -> bytes:
    """The bytes of one member (``what`` names it in the error when the file ends early)."""
    offset, size = span
    f.seek(offset)
    data = f.read(size)
    if len(data) < size:
        raise TarFormatError(f"{what} is cut off after {len(data)} of {size} bytes")
    return data


def image_member(path: Path, key: str, members: Iterable[str]) -> str:
    """The image extension of a sample, which must have exactly one image and a ``cls`` label."""
    image_exts = [ext for ext in members if ext in IMAGE_FORMATS]
    if len(image_exts) != 1 or "cls" not in members:
        raise ShardError(
            f"shard {path}: sample {key!r} has members {sorted(members)}; expected one image "
            f"({'/'.join(IMAGE_FORMATS)}) and a 'cls' label (truncated or foreign shard?); {REBUILD_HINT}"
        )
    return image_exts[0]


def parse_label(path: Path, key: str, raw: bytes, num_classes: int) -> int:
    """A sample's ``.cls`` member as a class index in ``0..num_classes-1``."""
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"shard {path}: sample {key!r} has label {raw!r}, not an integer; {REBUILD_HINT}") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"shard {path}: sample {key!r} has label {label} outside 0..{num_classes - 1}; {REBUILD_HINT}")
    return label


def read_shard(path: Path, num_classes: int, expected_samples: int | None = None, *,
               keep_bad: bool = False) -> Iterator[RawSample | BadSample]:
    """Stream the samples of one shard in stored order, still encoded.

    Every failure becomes a :class:`ShardError` naming the shard (and key): tar damage, a sample
    without image or label, an unparsable label or metadata, a label out of range, and a count that
    differs from ``expected_samples``. With ``keep_bad=True`` a sample whose members do not parse
    is yielded as a :class:`BadSample` in its place instead (so positions stay manifest positions)
    and the shard reads on; damage to the tar itself still raises.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; {REBUILD_HINT}")
    count = 0
    try:
        with open(path, "rb") as f:
            for key, members in iter_shard_samples(f, path):
                data = {ext: read_span(f, span, f"member {key}.{ext}") for ext, span in members.items()}
                yield _sample_or_bad(path, key, data, num_classes, keep_bad)
                count += 1
    except (TarFormatError, ValueError, UnicodeDecodeError, OSError) as e:
        raise ShardError(
            f"shard {path} is unreadable after {count} samples ({e}): it is truncated or corrupt; {REBUILD_HINT}"
        ) from e
    if expected_samples is not None and count != expected_samples:
        raise ShardError(
            f"shard {path} holds {count} samples but the manifest says {expected_samples}: it is truncated "
            f"or was replaced; {REBUILD_HINT}"
        )


def _sample_or_bad(path: Path, key: str, group: dict[str, bytes], num_classes: int,
                   keep_bad: bool) -> RawSample | BadSample:
    try:
        return _make_sample(path, key, group, num_classes)
    except ShardError as e:
        if not keep_bad:
            raise
        return BadSample(key, str(e))


def _make_sample(path: Path, key: str, group: dict[str, bytes], num_classes: int) -> RawSample:
    image_ext = image_member(path, key, group)
    label = parse_label(path, key, group["cls"], num_classes)
    meta = None
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError as e:
            raise ShardError(f"shard {path}: sample {key!r} has unparsable metadata ({e}); {REBUILD_HINT}") from e
    return RawSample(key, group[image_ext], image_ext, label, meta)


def verify_shards(directory: str | os.PathLike, check_hashes: bool = True) -> Manifest:
    """Check a shard set end to end against its manifest; return the manifest if everything matches.

    Existence, size, sha256 (``check_hashes``: every byte is hashed now, whatever an earlier check
    remembered), then every shard is read: sample counts, labels, image format and key uniqueness.
    Raises :class:`ShardError` naming the first bad file.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    check_shard_files(manifest, directory, "size")
    for info, path in zip(manifest.shards, manifest.shard_paths(directory)):
        if check_hashes and file_sha256(path) != info.sha256:
            raise ShardError(f"shard {path} is corrupt: its sha256 differs from the manifest's; {REBUILD_HINT}")
    keys: set[str] = set()
    for info, path in zip(manifest.shards, manifest.shard_paths(directory)):
        for sample in read_shard(path, len(manifest.classes), expected_samples=info.num_samples):
            if sample.image_ext != manifest.image_format:
                raise ShardError(
                    f"shard {path}: sample {sample.key!r} is {sample.image_ext}, the manifest says "
                    f"{manifest.image_format}; {REBUILD_HINT}"
                )
            if sample.key in keys:
                raise ShardError(
                    f"shard {path}: sample key {sample.key!r} occurs twice in the shard set; {REBUILD_HINT}"
                )
            keys.add(sample.key)
    return manifest
