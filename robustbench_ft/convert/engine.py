"""From an official download to a verified shard set: one resumable, multi-process engine for every converter.

A dataset's converter (``datasets/imagenet.py``, ``wilds.py``, ``transfer.py``, ``convert/imagefolder.py``)
only *scans*: it checks the download's layout, reads its labels and metadata, and returns one
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
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from robustbench_ft.convert.sources import ConversionError, ConvertOptions, SourceItem
from robustbench_ft.shards.manifest import (
    MANIFEST_FILE,
    Manifest,
    ShardInfo,
    check_classes,
    check_name,
    shard_file_name,
)
from robustbench_ft.shards.writer import ShardFile, encode_image, sniff_image_format
from robustbench_ft.util import atomic_write_text

if TYPE_CHECKING:
    from robustbench_ft.datasets.spec import DatasetSpec

ENGINE_VERSION = 1  # part of every shard fingerprint: bump when the stored bytes of a task would change
_PIL_TO_SHARD_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


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
    data = item.read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def _where(item: SourceItem) -> str:
    """The item's image for messages: its file, or for a member of a tar the tar and the member."""
    return f"{item.source} in {item.path}" if item.span else (item.path or item.source)


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
                        f"cannot read {_where(item)} as an image ({reason}); fix or delete the file, "
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
    atomic_write_text(_sidecar(Path(task.out_path)), json.dumps({
        "fingerprint": task.fingerprint, "shard": info.to_dict() if info else None,
        "skipped": [list(s) for s in skipped], "reencoded": reencoded}))
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
            with Image.open(io.BytesIO(item.read_bytes()) if item.span else item.path) as image:
                pil_format = image.format
        except Exception:  # noqa: BLE001 - unreadable files are reported by the conversion itself
            continue
        if pil_format not in _PIL_TO_SHARD_FORMAT:
            raise ConversionError(
                f"image_format='keep' stores source bytes as png, jpg or webp, but {_where(item)} is {pil_format}; "
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


def _check_items(items: Sequence[SourceItem], name: str, classes: Sequence[str]) -> None:
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


def _tasks(items: Sequence[SourceItem], out: Path, name: str, classes: Sequence[str], image_format: str,
           options: ConvertOptions) -> list[_Task]:
    """One task per shard: shard ``j`` holds items ``[j*S, (j+1)*S)``, fingerprinted for resuming."""
    crop = options.border_crop or 0
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
    return tasks


def _run_tasks(tasks: list[_Task], name: str, options: ConvertOptions, log: Callable[[str], None]) -> dict[int, _Result]:
    """The result of every task: finished shards kept (resume), the others written by ``options.workers``."""
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
    return results


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
    _check_items(items, name, classes)
    crop = options.border_crop or 0
    image_format = _stored_format(items, options.image_format)
    tasks = _tasks(items, out, name, classes, image_format, options)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # first: an interrupted conversion never passes for complete
    _remove_stale(out, name, len(tasks))
    results = _run_tasks(tasks, name, options, log)
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
