"""The shard set's manifest: what a directory of shards holds (per shard: samples, bytes, sha256), and the
naming rules of keys, dataset names and labels that keep shards readable by the ``webdataset`` package.

A dataset directory holds tar shards ``NAME-000000.tar``, ``NAME-000001.tar``, ... and a
``manifest.json``. Each sample in a shard is a group of consecutive tar members sharing one key:
``KEY.png|jpg|webp`` (the encoded image, one format per dataset), ``KEY.cls`` (the class index as
ASCII digits) and optionally ``KEY.json`` (free metadata: source path, WILDS region, ...).

The manifest is written last and atomically: a directory without one is an interrupted build and is
never read. Because the shard hashes are in it, :meth:`Manifest.content_hash` identifies the data itself
and is what caches and record identities key on.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_ft.util import atomic_write_text

FORMAT = "robustbench-ft-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "webp")
# Keys become tar member names "KEY.ext"; WebDataset splits a member name at its first dot, so a key
# may hold no dot, and no slash either (members are flat). Dataset names prefix shard file names.
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
SHARD_FILE = re.compile(r"[A-Za-z0-9_-]+-\d{6}\.tar")  # what shard_file_name writes: a plain name in the set's folder


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
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def from_json(cls, text: str, path: str) -> "Manifest":
        """A manifest from its JSON text (read from a file or fetched from a URL); ``path`` names it in errors."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"a manifest is a JSON object, not {type(data).__name__}")
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
        outside = next((s.name for s in manifest.shards if not SHARD_FILE.fullmatch(s.name)), None)
        if outside is not None:  # a name with a separator or ".." would make readers open files elsewhere
            raise ShardError(f"{path}: shard name {outside[:80]!r} is not a file name inside the shard directory "
                             f"(expected NAME-000000.tar); {REBUILD_HINT}")
        if len({s.name for s in manifest.shards}) != len(manifest.shards):
            raise ShardError(f"{path}: a shard is listed twice; {REBUILD_HINT}")
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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
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


def check_label(label: int, num_classes: int, key: str) -> int:
    if isinstance(label, bool):
        raise ValueError(f"sample {key!r}: label must be an integer class index, got a bool")
    try:
        value = operator.index(label)
    except TypeError:
        raise ValueError(f"sample {key!r}: label must be an integer class index, got {label!r}") from None
    if not 0 <= value < num_classes:
        raise ValueError(f"sample {key!r}: label {value} is outside 0..{num_classes - 1} ({num_classes} classes)")
    return value


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
