"""What a converter scans: one :class:`SourceItem` per image of an official download, in a fixed order, and
the helpers every scan uses (file listing, count checks, held-out splits, class-folder trees).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_ft.shards.manifest import (
    IMAGE_FORMATS,
)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
SHUFFLE_SEED = 0
"""Seed that converters permute training splits with, so that streaming readers outside the harness
(webdataset's shuffle buffer mixes only nearby samples) and any prefix of the shards see every class."""


class ConversionError(ValueError):
    """The download has the wrong layout, lacks classes or files, holds unreadable files, or has an unexpected size."""


@dataclass(frozen=True, eq=False, slots=True)
class SourceItem:
    """One image to store: where it comes from and its label, as a converter's scan found it.

    ``source`` names the image within the download (a relative path, or ``FILE[index]`` for images
    packed in a file) and is stored as the sample's ``meta["path"]``; ``meta`` adds fields such as
    WILDS' region or camera location. The image is read from ``path`` (only its bytes
    ``[offset, offset + size)`` when ``span = (offset, size)``: a member of a tar), or given as
    ``pixels`` (a uint8 ``H×W`` or ``H×W×3`` array, for datasets shipped as arrays such as CIFAR).
    """

    key: str
    label: int
    source: str
    path: str | None = None
    pixels: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    span: tuple[int, int] | None = None

    def read_bytes(self) -> bytes:
        """The encoded image this item names (not for ``pixels`` items)."""
        if self.span is None:
            return Path(self.path).read_bytes()
        offset, size = self.span
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.path} ends before the {size} bytes of {self.source} at offset {offset}")
        return data


@dataclass(frozen=True)
class ConvertOptions:
    """How to store a conversion; the defaults suit evaluation sets (exact source bytes)."""

    samples_per_shard: int = 1000
    image_format: str = "keep"  # "keep" | "png" | "jpg" | "webp"
    quality: int = 95
    resize_shorter: int | None = None
    border_crop: int | None = None  # pixels cut from each edge; None = the dataset's own (ObjectNet: 2), else 0
    workers: int = 2
    on_bad: str = "error"  # "error" | "skip"
    allow_count_mismatch: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_format not in (*IMAGE_FORMATS, "keep"):
            raise ValueError(f"image_format must be one of {(*IMAGE_FORMATS, 'keep')}, got {self.image_format!r}")
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")
        if self.samples_per_shard < 1 or self.workers < 1:
            raise ValueError(f"samples_per_shard and workers must be >= 1, got {self.samples_per_shard} "
                             f"and {self.workers}")
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise ValueError(f"resize_shorter must be a positive size or None, got {self.resize_shorter}")
        if self.border_crop is not None and self.border_crop < 0:
            raise ValueError(f"border_crop must be >= 0 or None, got {self.border_crop}")


def sanitise(part: str) -> str:
    """``part`` with every run of characters a shard key may not hold replaced by ``_``."""
    return _UNSAFE_KEY_CHARS.sub("_", part).strip("_") or "_"


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_files(directory: Path) -> list[Path]:
    """Non-hidden files under ``directory`` (recursively, following links), in sorted path order."""
    files: list[Path] = []
    for root, dirs, names in sorted(os.walk(directory, followlinks=True)):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        files.extend(Path(root) / n for n in sorted(names) if not is_hidden(n))
    return files


def check_count(dataset: str, split: str, found: int, expected: int | None, options: ConvertOptions,
                where: Path | str) -> dict[str, Any]:
    """Refuse a download whose size differs from the official release's (unless told to allow it).

    Returns the manifest metadata that records the check.
    """
    if expected is not None and found != expected and not options.allow_count_mismatch:
        raise ConversionError(
            f"{dataset} ({split}): found {found} images in {where}, but the official release has {expected}: the "
            "download is incomplete, has extra files, or is another version. Re-download or re-extract it; to "
            "convert a subset on purpose pass --allow-count-mismatch (allow_count_mismatch=True)")
    return {"source_count": found, "expected_count": expected}


def holdout_split(items: Sequence[SourceItem], fraction: float, split: str) -> list[SourceItem]:
    """The ``"train"`` or ``"val"`` part of an official training set that has no validation split.

    An item goes to ``val`` when the first 64 bits of the sha256 of its key, read as a fraction, are
    below ``fraction``: a pure function of the key, so the split is the same on every machine and does
    not change when other items are added or removed.
    """
    if split not in ("train", "val"):
        raise ValueError(f"holdout_split takes split 'train' or 'val', got {split!r}")

    def in_val(item: SourceItem) -> bool:
        return int(hashlib.sha256(item.key.encode()).hexdigest()[:16], 16) < fraction * 2**64

    return [item for item in items if in_val(item) == (split == "val")]


def shuffled(items: Sequence[SourceItem], seed: int = SHUFFLE_SEED) -> list[SourceItem]:
    """``items`` permuted with ``seed`` (training splits; see :data:`SHUFFLE_SEED`)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def unique_keys(items: Sequence[SourceItem]) -> list[SourceItem]:
    """``items`` with clashing keys (e.g. two file names that sanitise alike) made unique by a suffix."""
    used: set[str] = set()
    out = []
    for item in items:
        key, n = item.key, 1
        while key in used:
            key, n = f"{item.key}_{n}", n + 1
        used.add(key)
        out.append(item if key == item.key else SourceItem(key, item.label, item.source, item.path,
                                                            item.pixels, item.meta, item.span))
    return out


def class_folder_items(src: Path, folder_labels: dict[str, int], *, dataset: str, layout: str,
                       allow_missing: bool = False, ignore: Callable[[str], bool] | None = None,
                       ) -> list[SourceItem]:
    """Items of a download laid out as ``src/<class folder>/<image>``, labelled by ``folder_labels``.

    Files at the top level (READMEs) are ignored. A folder that is not a known class is an error
    (the download is another dataset or ``src`` points at the wrong level) unless ``ignore`` accepts
    it; a missing class folder is an error unless ``allow_missing``.
    """
    if not src.is_dir():
        raise ConversionError(f"{dataset}: {src} is not a directory; expected {layout}")
    folders = sorted(e.name for e in os.scandir(src) if e.is_dir() and not is_hidden(e.name))
    unknown = [f for f in folders if f not in folder_labels and not (ignore and ignore(f))]
    if unknown or not folders:
        found = (f"{len(folders)} folders, {len(unknown)} of them not classes of {dataset} "
                 f"(e.g. {', '.join(unknown[:3])})" if folders else "no folders")
        hint = f" Did you mean --src {src / folders[0]}?" if len(folders) == 1 and unknown else ""
        raise ConversionError(f"{dataset}: {src} does not have the expected layout {layout}: found {found}.{hint}")
    missing = sorted(set(folder_labels) - set(folders))
    if missing and not allow_missing:
        raise ConversionError(
            f"{dataset}: {len(missing)} of its {len(folder_labels)} class folders are missing from {src} "
            f"(e.g. {', '.join(missing[:5])}); the download is incomplete. Pass --allow-count-mismatch to convert "
            "the classes present on purpose")
    items = []
    for folder in folders:
        if folder not in folder_labels:
            continue
        files = list_files(src / folder)
        if not files:
            raise ConversionError(f"{dataset}: class folder {src / folder} holds no files")
        for path in files:
            rel = path.relative_to(src).as_posix()
            key = f"{sanitise(dataset)}-" + "-".join(sanitise(p) for p in rel.rsplit(".", 1)[0].split("/"))
            items.append(SourceItem(key, folder_labels[folder], rel, str(path.resolve())))
    return unique_keys(items)


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def require_files(dataset: str, root: Path, names: Sequence[str], layout: str) -> None:
    """Fail, naming what is missing and the expected layout, when ``root`` lacks any of ``names``."""
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        if not root.is_dir():
            found = "not a directory"
        else:
            found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "an empty directory"
        raise ConversionError(f"{dataset}: {root} lacks {', '.join(missing)}; expected {layout}. Found: {found}")
