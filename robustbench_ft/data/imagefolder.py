"""Convert a torchvision-style ImageFolder tree (``SRC/<class>/<image>``) into a shard set.

Classes are the sub-folder names in sorted order, images are taken in sorted path order, as
torchvision's ``ImageFolder`` does, so labels agree with it (except that hidden folders such as
``.ipynb_checkpoints`` are not classes here). Shard ``j`` holds the ``j``-th run of
``samples_per_shard`` files, which makes the output a function of the tree alone: any number of
worker processes writes byte-identical shards, and each worker writes whole shards on its own.

That order is sorted by class, which suits evaluation but not training: the reader's shuffle
buffer only mixes nearby samples. Training splits are converted with ``shuffle_seed`` set, which
permutes the files (deterministically) before they are cut into shards.

Every file is decoded before it is stored, even when its bytes are copied unchanged, so that a
broken file fails the conversion (naming it) instead of an evaluation hours later; with
``on_bad="skip"`` it is left out and listed in ``manifest.metadata["skipped"]``.
"""
from __future__ import annotations

import io
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .shards import (
    IMAGE_FORMATS,
    Manifest,
    ShardFile,
    ShardInfo,
    check_name,
    encode_image,
    prepare_output_dir,
    shard_file_name,
    sniff_image_format,
)

_PIL_TO_SHARD_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class ImageFolderError(ValueError):
    """The source tree has the wrong layout or holds a file that is not a readable image."""


@dataclass(frozen=True)
class _Source:
    path: str  # absolute, for the worker to read
    rel: str  # relative to SRC, posix; recorded in the sample's metadata
    key: str
    label: int


@dataclass(frozen=True)
class _ShardTask:
    out_path: str
    sources: tuple[_Source, ...]
    image_format: str  # the stored format ("keep" already resolved)
    copy_bytes: bool  # "keep" without resize: store the file's bytes when already in image_format
    quality: int
    resize_shorter: int | None
    num_classes: int
    skip_bad: bool


@dataclass(frozen=True)
class _ShardResult:
    shard: ShardInfo | None  # None when every file of the shard was skipped
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason)
    reencoded: int  # files re-encoded although copy_bytes was set (their format differed)


def _sanitise(part: str) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", part).strip("_") or "_"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_imagefolder(src: Path) -> tuple[tuple[str, ...], list[_Source]]:
    """Classes and files of ``src`` in torchvision order, with unique keys derived from relative paths."""
    if not src.is_dir():
        raise ImageFolderError(f"{src} is not a directory; expected an ImageFolder tree SRC/<class>/<image>")
    entries = sorted((e for e in os.scandir(src) if not _is_hidden(e.name)), key=lambda e: e.name)
    classes = tuple(e.name for e in entries if e.is_dir())
    top_files = [e.name for e in entries if not e.is_dir()]
    if not classes or top_files:
        found = "no files"
        if top_files:
            found = f"{len(top_files)} files at the top level (e.g. {', '.join(top_files[:3])})"
        raise ImageFolderError(
            f"{src} is not an ImageFolder tree: expected the layout SRC/<class>/<image> (one sub-folder per "
            f"class, nothing else at the top level), but found {len(classes)} class sub-folders and {found}. "
            "Point SRC at the folder that holds the class folders, and move loose files out of it."
        )
    sources: list[_Source] = []
    used_keys: set[str] = set()
    for label, cls in enumerate(classes):
        class_dir = src / cls
        files: list[Path] = []
        for root, dirs, fnames in sorted(os.walk(class_dir, followlinks=True)):
            dirs[:] = [d for d in dirs if not _is_hidden(d)]
            files.extend(Path(root) / f for f in sorted(fnames) if not _is_hidden(f))
        if not files:
            raise ImageFolderError(f"class folder {class_dir} holds no files; remove it or add its images")
        for path in files:
            rel = path.relative_to(src).as_posix()
            key = "-".join(_sanitise(p) for p in rel.rsplit(".", 1)[0].split("/"))
            unique, n = key, 1
            while unique in used_keys:
                unique, n = f"{key}_{n}", n + 1
            used_keys.add(unique)
            sources.append(_Source(str(path.resolve()), rel, unique, label))
    return classes, sources


def _open_image(path: str) -> tuple[bytes, Image.Image]:
    """The file's bytes and its fully decoded image (decoding is what proves the file is usable)."""
    data = Path(path).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def _convert_shard(task: _ShardTask) -> _ShardResult:
    """Write one shard from its files (runs in a worker process)."""
    shard: ShardFile | None = None
    skipped: list[tuple[str, str]] = []
    reencoded = 0
    try:
        for source in task.sources:
            try:
                data, image = _open_image(source.path)
            # PIL reports undecodable data through many exception types; each means "not a usable image".
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {e}"
                if not task.skip_bad:
                    raise ImageFolderError(
                        f"cannot read {source.path} as an image ({reason}); fix or delete the file, "
                        "or convert with on_bad='skip' to leave such files out"
                    ) from None
                skipped.append((source.rel, reason))
                continue
            if task.copy_bytes and sniff_image_format(data) == task.image_format:
                stored = data
            else:
                stored = encode_image(image, task.image_format, task.quality, task.resize_shorter)
                reencoded += task.copy_bytes
            if shard is None:
                shard = ShardFile(Path(task.out_path), task.image_format, task.num_classes)
            shard.add(source.key, stored, source.label, {"path": source.rel})
        info = shard.finish() if shard is not None else None
    except BaseException:
        if shard is not None:
            shard.discard()
        raise
    return _ShardResult(info, tuple(skipped), reencoded)


def _keep_format(src: Path, sources: list[_Source]) -> str:
    """The stored format for image_format="keep": that of the first readable file, in tree order."""
    for source in sources:
        try:
            with Image.open(source.path) as image:
                pil_format = image.format
        except Exception:  # noqa: BLE001 - unreadable files are reported by the conversion itself
            continue
        if pil_format not in _PIL_TO_SHARD_FORMAT:
            raise ImageFolderError(
                f"image_format='keep' stores source bytes as png, jpg or webp, but {source.path} is "
                f"{pil_format}; convert with image_format='png' (lossless) or 'jpg'"
            )
        return _PIL_TO_SHARD_FORMAT[pil_format]
    raise ImageFolderError(f"no readable image in {src}")


def write_imagefolder_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    samples_per_shard: int = 1000,
    resize_shorter: int | None = None,
    image_format: str = "jpg",
    quality: int = 95,
    workers: int = 2,
    on_bad: str = "error",
    shuffle_seed: int | None = None,
) -> Manifest:
    """Convert the ImageFolder tree ``src`` into a shard set in ``out``; returns its manifest.

    ``image_format``: "png", "jpg" or "webp" re-encodes every image (after the optional shorter-side
    resize); "keep" stores each file's own bytes when there is no resize and the file is in the
    set's format (that of the first image: png, jpg or webp), and re-encodes the others into it
    (counted in ``metadata["reencoded"]``). ``name`` defaults to the source folder's name.
    ``on_bad``: "error" stops at the first unreadable file, naming it; "skip" leaves such files out
    and lists them, as ``{"path", "reason"}``, in ``metadata["skipped"]`` (then shards hold fewer
    than ``samples_per_shard`` samples where files were skipped).
    ``shuffle_seed``: None keeps torchvision's class-sorted order; an integer permutes the files
    with it first (recorded in the metadata), as training splits need.
    """
    if image_format not in (*IMAGE_FORMATS, "keep"):
        raise ValueError(f"image_format must be one of {(*IMAGE_FORMATS, 'keep')}, got {image_format!r}")
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard and workers must be >= 1, got {samples_per_shard} and {workers}")
    if resize_shorter is not None and resize_shorter < 1:
        raise ValueError(f"resize_shorter must be a positive size or None, got {resize_shorter}")
    src, out = Path(src), Path(out)
    classes, sources = scan_imagefolder(src)
    name = name if name is not None else _sanitise(src.resolve().name)
    check_name(name)
    stored_format = _keep_format(src, sources) if image_format == "keep" else image_format
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(sources)
    copy_bytes = image_format == "keep" and resize_shorter is None

    prepare_output_dir(out, name)
    tasks = [
        _ShardTask(
            out_path=str(out / shard_file_name(name, j)),
            sources=tuple(sources[start : start + samples_per_shard]),
            image_format=stored_format,
            copy_bytes=copy_bytes,
            quality=quality,
            resize_shorter=resize_shorter,
            num_classes=len(classes),
            skip_bad=on_bad == "skip",
        )
        for j, start in enumerate(range(0, len(sources), samples_per_shard))
    ]
    workers = min(workers, len(tasks))
    if workers == 1:
        results = [_convert_shard(task) for task in tasks]
    else:
        # map() yields in task order and cancels the pending tasks when one raises.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_convert_shard, tasks))

    shards = tuple(r.shard for r in results if r.shard is not None)
    skipped = [{"path": rel, "reason": reason} for r in results for rel, reason in r.skipped]
    if not shards:
        raise ImageFolderError(f"no readable image in {src}: all {len(sources)} files were skipped")
    metadata: dict = {
        "source": "imagefolder", "source_dir": str(src.resolve()), "shuffle_seed": shuffle_seed,
        "num_skipped": len(skipped), "skipped": skipped,
    }
    if image_format == "keep":
        metadata["reencoded"] = sum(r.reencoded for r in results)
    manifest = Manifest(
        name=name,
        classes=classes,
        num_samples=sum(s.num_samples for s in shards),
        image_format=stored_format,
        shards=shards,
        resize_shorter=resize_shorter,
        metadata=metadata,
    )
    manifest.save(out)
    return manifest
