"""Convert a torchvision-style ImageFolder tree (``SRC/<class>/<image>``) into a shard set.

Classes are the sub-folder names in sorted order, images are taken in sorted path order, as
torchvision's ``ImageFolder`` does, so labels agree with it (except that hidden folders such as
``.ipynb_checkpoints`` are not classes here). The shards are written by the shared engine of
:mod:`robustbench_ft.convert.engine`: shard ``j`` holds the ``j``-th run of ``samples_per_shard``
files, so any number of worker processes writes byte-identical shards, and a killed conversion
resumes where it stopped.

That order is sorted by class. The harness's own training reads samples by position in a random
order (:mod:`robustbench_ft.loading.training_batches`), so it does not care; training splits are still
converted with ``shuffle_seed`` set (a deterministic permutation before sharding), so that streaming
readers outside the harness (``webdataset`` with a shuffle buffer) and any prefix of the shards see
every class.

Every file is decoded before it is stored, even when its bytes are copied unchanged, so that a
broken file fails the conversion (naming it) instead of an evaluation hours later; with
``on_bad="skip"`` it is left out and listed in ``manifest.metadata["skipped"]``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    is_hidden,
    list_files,
    sanitise,
    shuffled,
    unique_keys,
)
from robustbench_ft.shards.manifest import Manifest

ImageFolderError = ConversionError
"""The source tree has the wrong layout or holds a file that is not a readable image (kept for its name)."""


def scan_imagefolder(src: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[SourceItem]]:
    """Classes and files of ``src``, with unique keys derived from relative paths.

    The class order is torchvision's (folders sorted by name) unless ``classes`` gives it: the class list of
    a registered dataset, whose label order the shards must follow (a folder tree sorted alphabetically
    would otherwise give every class another label). Then the folders must be exactly those classes."""
    if not src.is_dir():
        raise ImageFolderError(f"{src} is not a directory; expected an ImageFolder tree SRC/<class>/<image>")
    entries = sorted((e for e in os.scandir(src) if not is_hidden(e.name)), key=lambda e: e.name)
    folders = tuple(e.name for e in entries if e.is_dir())
    if classes is not None:
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        if missing or extra:
            raise ImageFolderError(f"{src}: its class folders are not the dataset's classes: missing {missing[:5]}, "
                                   f"unexpected {extra[:5]}; name one folder per class exactly as the dataset's "
                                   "class list does (`robustbench-ft list datasets`)")
    classes = tuple(classes) if classes is not None else folders
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
    items: list[SourceItem] = []
    for label, cls in enumerate(classes):
        files = list_files(src / cls)
        if not files:
            raise ImageFolderError(f"class folder {src / cls} holds no files; remove it or add its images")
        for path in files:
            rel = path.relative_to(src).as_posix()
            key = "-".join(sanitise(p) for p in rel.rsplit(".", 1)[0].split("/"))
            items.append(SourceItem(key, label, rel, str(path.resolve())))
    return classes, unique_keys(items)


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
    progress: bool = False,
    classes: Sequence[str] | None = None,
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
    with it first (recorded in the metadata), for training splits (see the module docstring).
    ``classes``: the label order to follow (a registered dataset's ``shard_classes``; see :func:`scan_imagefolder`).
    """
    options = ConvertOptions(samples_per_shard=samples_per_shard, image_format=image_format, quality=quality,
                             resize_shorter=resize_shorter, workers=workers, on_bad=on_bad, progress=progress)
    src, out = Path(src), Path(out)
    classes, items = scan_imagefolder(src, classes)
    name = name if name is not None else sanitise(src.resolve().name)
    if shuffle_seed is not None:
        items = shuffled(items, shuffle_seed)
    return convert_items(items, out, name=name, classes=classes, options=options, log=lambda message: None,
                         metadata={"source": "imagefolder", "source_dir": str(src.resolve()),
                                   "shuffle_seed": shuffle_seed})
