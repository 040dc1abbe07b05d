"""From an official download to a verified shard set: one resumable, multi-process engine for every converter.

A dataset's converter (``imagenet.py``, ``wilds.py``, ``transfer.py``, ``imagefolder.py``) only
*scans*: it checks the download's layout, reads its labels and metadata, and returns one
:class:`SourceItem` per image, in a fixed order. :func:`convert_items` does the rest, the same way
for all of them:

* **Deterministic shards.** Shard ``j`` holds items ``[j*S, (j+1)*S)`` of that order (``S`` =
  ``samples_per_shard``), and each worker process writes whole shards, so any number of workers
  writes byte-identical shards.
* **Resumable.** Next to each finished shard the worker writes a hidden sidecar
  ``.NAME-00000j.tar.done.json``: a fingerprint of the shard's task (its items' keys, labels,
  sources and metadata, the class list, and the encoding options) and the shard's manifest entry. A
  rerun of a killed conversion skips every shard whose tar exists with the recorded size and whose
  fingerprint matches, and writes the others. The manifest is removed when a conversion starts and
  written last, so an interrupted conversion never passes for a complete one. Source files edited
  in place under the same name are not detected; delete the output directory to force a rebuild.
* **Bad files.** Every image is decoded before it is stored. With ``on_bad="error"`` the first
  unreadable file stops the conversion, naming it; with ``"skip"`` such files are left out and
  listed (path and reason) in ``manifest.metadata["skipped"]``, counted in ``"num_skipped"``
  (the runner copies the count into each result record).
* **Faithful bytes.** ``image_format="keep"`` (the default of dataset converters) stores each
  file's own bytes when nothing is cropped or resized and the file is in the set's format (that of
  the first readable image), so evaluation decodes exactly the pixels the field evaluates on.
  Otherwise images are re-encoded (png, jpg or webp), after the optional border crop and
  shorter-side resize, in that order: the crop is defined in the original image's pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from robustbench_ft.data.shards import (
    IMAGE_FORMATS,
    MANIFEST_FILE,
    Manifest,
    ShardFile,
    ShardInfo,
    check_classes,
    check_name,
    encode_image,
    shard_file_name,
    sniff_image_format,
)

if TYPE_CHECKING:
    from robustbench_ft.data.registry import DatasetSpec

ENGINE_VERSION = 1  # part of every shard fingerprint: bump when the stored bytes of a task would change
_PIL_TO_SHARD_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
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
    WILDS' region or camera location. The image is read from ``path``, or given as ``pixels``
    (a uint8 ``H×W`` or ``H×W×3`` array, for datasets shipped as arrays such as CIFAR).
    """

    key: str
    label: int
    source: str
    path: str | None = None
    pixels: np.ndarray | None = None
    meta: dict[str, Any] | None = None


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


# --------------------------------------------------------------------------- helpers for converters


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
                                                            item.pixels, item.meta))
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


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _Task:
    out_path: str
    items: tuple[SourceItem, ...]
    image_format: str
    copy_bytes: bool
    quality: int
    resize_shorter: int | None
    border_crop: int
    num_classes: int
    skip_bad: bool
    fingerprint: str


@dataclass(frozen=True)
class _Result:
    shard: ShardInfo | None  # None when every item of the shard was skipped
    skipped: tuple[tuple[str, str], ...] = ()
    reencoded: int = 0


def _sidecar(shard_path: Path) -> Path:
    return shard_path.with_name(f".{shard_path.name}.done.json")


def _load_image(item: SourceItem) -> tuple[bytes | None, Image.Image]:
    """The item's encoded bytes (None for pixels) and its fully decoded image."""
    if item.pixels is not None:
        return None, Image.fromarray(np.ascontiguousarray(item.pixels))
    data = Path(item.path).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def _crop(image: Image.Image, border: int) -> Image.Image:
    if image.width <= 2 * border or image.height <= 2 * border:
        raise ValueError(f"image is only {image.width}x{image.height} pixels, too small to cut a {border}-pixel border")
    return ImageOps.crop(image, border=border)


def _write_shard(task: _Task) -> _Result:
    """Write one shard and its sidecar (runs in a worker process)."""
    shard: ShardFile | None = None
    skipped: list[tuple[str, str]] = []
    reencoded = 0
    try:
        for item in task.items:
            try:
                data, image = _load_image(item)
                if task.border_crop:
                    image = _crop(image, task.border_crop)
            # PIL reports undecodable data through many exception types; each means "not a usable image".
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {e}"
                if not task.skip_bad:
                    raise ConversionError(
                        f"cannot read {item.path or item.source} as an image ({reason}); fix or delete the file, "
                        "or convert with on_bad='skip' (--on-bad skip) to leave such files out") from None
                skipped.append((item.source, reason))
                continue
            if task.copy_bytes and data is not None and sniff_image_format(data) == task.image_format:
                stored = data
            else:
                stored = encode_image(image, task.image_format, task.quality, task.resize_shorter)
                reencoded += task.copy_bytes
            if shard is None:
                shard = ShardFile(Path(task.out_path), task.image_format, task.num_classes)
            shard.add(item.key, stored, item.label, {"path": item.source, **(item.meta or {})})
        info = shard.finish() if shard is not None else None
    except BaseException:
        if shard is not None:
            shard.discard()
        raise
    result = _Result(info, tuple(skipped), reencoded)
    sidecar = _sidecar(Path(task.out_path))
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": task.fingerprint, "shard": info.to_dict() if info else None,
                               "skipped": [list(s) for s in skipped], "reencoded": reencoded}), encoding="utf-8")
    os.replace(tmp, sidecar)
    return result


def _finished(task: _Task) -> _Result | None:
    """The recorded result of a shard a previous run finished with the same task, else None."""
    sidecar = _sidecar(Path(task.out_path))
    try:
        done = json.loads(sidecar.read_text(encoding="utf-8"))
        if done["fingerprint"] != task.fingerprint:
            return None
        skipped = tuple((str(p), str(r)) for p, r in done["skipped"])
        if skipped and not task.skip_bad:
            return None  # written under on_bad="skip"; rerun so that "error" reports the bad file
        shard = done["shard"]
        info = None if shard is None else ShardInfo(shard["name"], int(shard["num_samples"]), int(shard["size"]),
                                                     str(shard["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info is not None:
        path = Path(task.out_path)
        if not path.is_file() or path.stat().st_size != info.size:
            return None
    return _Result(info, skipped, int(done.get("reencoded", 0)))


def _fingerprint(items: Sequence[SourceItem], classes: Sequence[str], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"engine": ENGINE_VERSION, "classes": list(classes), **settings},
                             sort_keys=True).encode())
    for item in items:
        pixels = hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).hexdigest() \
            if item.pixels is not None else None
        digest.update(json.dumps([item.key, int(item.label), item.source, item.meta, pixels],
                                 sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _stored_format(items: Sequence[SourceItem], image_format: str) -> str:
    """The set's format; for "keep", that of the first readable image (arrays are stored as png)."""
    if image_format != "keep":
        return image_format
    for item in items:
        if item.pixels is not None:
            return "png"
        try:
            with Image.open(item.path) as image:
                pil_format = image.format
        except Exception:  # noqa: BLE001 - unreadable files are reported by the conversion itself
            continue
        if pil_format not in _PIL_TO_SHARD_FORMAT:
            raise ConversionError(
                f"image_format='keep' stores source bytes as png, jpg or webp, but {item.path} is {pil_format}; "
                "convert with --image-format png (lossless) or jpg")
        return _PIL_TO_SHARD_FORMAT[pil_format]
    raise ConversionError(f"no readable image among the {len(items)} files to convert")


def _remove_stale(out: Path, name: str, num_shards: int) -> None:
    """Files of this set that the new layout does not have: temporaries and shards past the last one."""
    pattern = re.compile(r"\.?" + re.escape(name) + r"-(\d{6})\.tar(\.tmp|\.done\.json(\.tmp)?)?")
    for path in out.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (int(match.group(1)) >= num_shards or path.name.endswith(".tmp")):
            path.unlink()


def convert_items(items: Sequence[SourceItem], out: str | os.PathLike, *, name: str, classes: Sequence[str],
                  options: ConvertOptions, metadata: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> Manifest:
    """Write ``items`` (in their order) as the shard set ``out`` named ``name``; see the module docstring.

    ``metadata`` goes into the manifest, together with the skipped files and, for ``image_format="keep"``, the
    number of files re-encoded because their format differed from the set's.
    """
    check_name(name)
    classes = check_classes(classes)
    out = Path(out)
    if not items:
        raise ConversionError(f"{name}: nothing to convert (no images found)")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dupes = sorted({k for k in keys if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise ConversionError(f"{name}: sample keys must be unique; duplicates: {', '.join(dupes[:5])}")
    bad = [item for item in items if not 0 <= int(item.label) < len(classes)]
    if bad:
        raise ConversionError(f"{name}: {bad[0].source} has label {bad[0].label}, outside 0..{len(classes) - 1}")
    crop = options.border_crop or 0
    image_format = _stored_format(items, options.image_format)
    settings = {"image_format": image_format, "copy_bytes": options.image_format == "keep"
                and options.resize_shorter is None and crop == 0, "quality": options.quality,
                "resize_shorter": options.resize_shorter, "border_crop": crop}
    size = options.samples_per_shard
    tasks = []
    for j, start in enumerate(range(0, len(items), size)):
        chunk = tuple(items[start:start + size])
        tasks.append(_Task(str(out / shard_file_name(name, j)), chunk, image_format, settings["copy_bytes"],
                           options.quality, options.resize_shorter, crop, len(classes), options.on_bad == "skip",
                           _fingerprint(chunk, classes, settings)))

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # first: an interrupted conversion never passes for complete
    _remove_stale(out, name, len(tasks))
    results: dict[int, _Result] = {}
    for j, task in enumerate(tasks):
        done = _finished(task)
        if done is not None:
            results[j] = done
    todo = [j for j in range(len(tasks)) if j not in results]
    if results:
        log(f"{name}: resuming, {len(results)} of {len(tasks)} shards already written; writing {len(todo)}")
    workers = min(options.workers, len(todo)) or 1
    with tqdm(total=len(todo), desc=f"shard {name}", unit="shard", disable=not options.progress or not todo) as bar:
        if workers == 1:
            for j in todo:
                results[j] = _write_shard(tasks[j])
                bar.update()
        else:
            # map() yields in task order and cancels the pending tasks when one raises.
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for j, result in zip(todo, pool.map(_write_shard, [tasks[j] for j in todo])):
                    results[j] = result
                    bar.update()

    ordered = [results[j] for j in range(len(tasks))]
    shards = tuple(r.shard for r in ordered if r.shard is not None)
    skipped = [{"path": path, "reason": reason} for r in ordered for path, reason in r.skipped]
    if not shards:
        raise ConversionError(f"{name}: no readable image: all {len(items)} files were skipped")
    meta: dict[str, Any] = {**(metadata or {}), "border_crop": crop, "num_skipped": len(skipped), "skipped": skipped}
    if options.image_format == "keep":
        meta["reencoded"] = sum(r.reencoded for r in ordered)
    manifest = Manifest(name=name, classes=classes, num_samples=sum(s.num_samples for s in shards),
                        image_format=image_format, shards=shards, resize_shorter=options.resize_shorter,
                        metadata=meta)
    manifest.save(out)
    return manifest


# --------------------------------------------------------------------------- entry point


def convert_dataset(spec: "DatasetSpec", src: str | os.PathLike, out: str | os.PathLike, split: str = "test",
                    options: ConvertOptions | None = None) -> Manifest:
    """What ``robustbench-ft shard NAME --src SRC --out OUT --split SPLIT`` does: convert one split."""
    if spec.converter is None:
        raise ValueError(f"dataset {spec.name!r} has no converter: the harness builds it itself on first use "
                         "(nothing to download); `robustbench-ft shard imagefolder SRC OUT` converts any "
                         "class-folder tree")
    if split not in spec.splits:
        raise ValueError(f"dataset {spec.name!r} has no split {split!r}; it has {list(spec.splits)}")
    if options is None:
        options = ConvertOptions()
    if options.border_crop is None:
        options = replace(options, border_crop=spec.border_crop)
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{spec.name}: the download {src} does not exist; see datasets/README.md for "
                                "where to get it and how to lay it out")
    return spec.converter(src, Path(out), split, options)


CLASS_LISTS = Path(__file__).parent / "class_lists"
"""Class lists, subsets, mappings and prompt templates: facts of the datasets, each file naming its source."""


def load_list(name: str) -> tuple[str, ...]:
    """The lines of ``class_lists/<name>`` after its ``#`` header (which names the source)."""
    text = (CLASS_LISTS / name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def load_table(name: str) -> list[list[str]]:
    """The rows of the tab-separated ``class_lists/<name>``."""
    return [line.split("\t") for line in load_list(name)]
