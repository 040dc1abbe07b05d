"""ImageNet-Vid-Robust (Shankar, Dave, Roelofs, Ramanan, Recht, Schmidt, "Do Image Classifiers Generalize Across
Time?", ICCV 2021), one of WiSE-FT's further shifts, scored with pm-k (:func:`robustbench_ft.metrics.pm_k`).

The release is one archive for both of the paper's sets, ``imagenet_vid_ytbb_robust.tar.gz``
(modestyachts/imagenet-vid-robust-example @ b9ff1fe ``download_dataset.sh``); the converter reads its
``imagenet-vid-robust/`` folder: ``val/<ILSVRC2015_val_XXXXXXXX>/<frame>.JPEG`` and the frame metadata
``metadata/pmsets.json`` (anchor frame -> the neighbouring frames of its set, offsets -10..-1, +1..+10) and
``metadata/labels.json`` (frame -> its list of ImageNet-VID class indices; 1,514 frames carry several). Counts:
1,109 anchors (checked), 22,178 images in the paper's abstract (22,179 frames in labels.json; not checked).

Each frame is stored once per set it belongs to, with ``meta = {"anchor", "offset", "labels"}``: what pm-k
reads, so a set without its frame metadata cannot be scored (refused with one line). Its shard label is the
frame's first label (what a plain top-1 would use; wise-ft's reported ``top1`` is that too). Classes: the 30
ImageNet-VID classes (names from wise-ft @ 58b7a4b ``imagenet_vid_robust_classnames``, ``_`` read as a space);
a classifier's 1000 ImageNet logits are max-pooled into them over the 288 ImageNet classes of imagenet-testbed
@ 0170eec ``imagenet-vid-robust_metadata/rev_class_idx_map.json`` (wise-ft's ``merge_op = 'max'``).

Suite ``imagenet-vid-robust``: reference ImageNet (its val split as test, as the ImageNet suite), this one
shift; its records also hold ImageNet accuracy on the 288 classes (``top1@imagenet-vid-robust``, imagenet-testbed's
``val-on-vid-robust-classes``). Primary metric pm10, pm0 stored beside it. Which of pm0/pm10 WiSE-FT tabulates
was not found.

YTBB-Robust is **not** implemented: its anchor and pm-k reviews live in the code repositories
(``ytbb-robust_metadata/{anchor_labels,pmk_labels}.json`` in wise-ft) and are filtered by several label rules
(``load_anchor_annotations``, ``load_pmk_annotations``, the anchors CSV with labels 22 and 23 swapped); the
> 4 MiB ``pmk_labels.json`` was not available to check a converter against.
"""
from __future__ import annotations

import json
from pathlib import Path

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import ConversionError, ConvertOptions, SourceItem, check_count, sanitise
from robustbench_ft.datasets.class_lists import load_table
from robustbench_ft.datasets.imagenet import IMAGENET_TEMPLATES
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards.manifest import Manifest

VID_ANCHORS = 1_109  # the paper (v2 abstract): 22,178 images in 1,109 sets
METADATA = ("metadata/pmsets.json", "metadata/labels.json")
LAYOUT = ("imagenet_vid_ytbb_robust/imagenet-vid-robust/ with val/<video>/<frame>.JPEG and metadata/pmsets.json, "
          "metadata/labels.json (the official archive imagenet_vid_ytbb_robust.tar.gz)")

_ROWS = [row for row in load_table("imagenet_vid_robust_classes.tsv") if row[0] != "vid_idx"]
VID_CLASSNAMES = tuple(row[1].replace("_", " ") for row in _ROWS)
VID_POOLING = tuple(tuple(int(i) for i in row[2].split(",")) for row in _ROWS)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"imagenet-vid-robust: {path} is not readable JSON ({e}); re-extract the archive") from None
    if not isinstance(value, dict):
        raise ConversionError(f"imagenet-vid-robust: {path} holds a {type(value).__name__}, expected an object")
    return value


def _frame_number(frame: str) -> int:
    try:
        return int(Path(frame).stem)
    except ValueError:
        raise ConversionError(f"imagenet-vid-robust: frame {frame!r} is not named <number>.JPEG") from None


def vid_items(src: Path) -> list[SourceItem]:
    """One item per (set, frame): the anchor and each neighbour, with the metadata pm-k reads."""
    root = src / "imagenet-vid-robust" if (src / "imagenet-vid-robust").is_dir() else src
    missing = [m for m in METADATA if not (root / m).is_file()]
    if missing:
        raise ConversionError(f"imagenet-vid-robust: {root} lacks {', '.join(missing)}, the frame metadata pm-k is "
                              f"scored with; expected {LAYOUT}")
    pmsets, labels = _json(root / METADATA[0]), _json(root / METADATA[1])
    items = []
    for anchor in sorted(pmsets):
        start = _frame_number(anchor)
        for frame in [anchor, *pmsets[anchor]]:
            if frame not in labels or not labels[frame]:
                raise ConversionError(f"imagenet-vid-robust: labels.json has no label for frame {frame!r}")
            frame_labels = [int(y) for y in labels[frame]]
            if not all(0 <= y < len(VID_CLASSNAMES) for y in frame_labels):
                raise ConversionError(f"imagenet-vid-robust: frame {frame!r} has labels {frame_labels} outside 0..29")
            key = "vid-" + sanitise(anchor.rsplit(".", 1)[0]) + "-" + sanitise(Path(frame).stem)
            items.append(SourceItem(key, frame_labels[0], frame, str((root / frame).resolve()),
                                    meta={"anchor": anchor, "offset": _frame_number(frame) - start,
                                          "labels": frame_labels}))
    return items


def convert_vid_robust(src: Path, out: Path, split: str, options: ConvertOptions) -> Manifest:
    items = vid_items(src)
    anchors = len({it.meta["anchor"] for it in items})  # type: ignore[index]
    checked = check_count("imagenet-vid-robust (anchors)", split, anchors, VID_ANCHORS, options, src)
    return convert_items(items, out, name=f"imagenet-vid-robust-{split}", classes=VID_CLASSNAMES, options=options,
                         metadata={"dataset": "imagenet-vid-robust", "split": split, "frames": len(items),
                                   **checked})


IMAGENET_VID_ROBUST = register_dataset(DatasetSpec(
    name="imagenet-vid-robust", classnames=VID_CLASSNAMES, templates=IMAGENET_TEMPLATES, metric="pm10", extra_metrics=("pm0",),
    pooling=VID_POOLING, converter=convert_vid_robust,
    description="ImageNet-Vid-Robust: 1,109 sets of similar video frames, 30 classes pooled from 288 ImageNet ones; pm-k.",
    source="Shankar et al., Do Image Classifiers Generalize Across Time?, ICCV 2021 (modestyachts.github.io/robust-vid)",
))

register_suite(Suite(
    name="imagenet-vid-robust", reference="imagenet", shifts=("imagenet-vid-robust",), train=("imagenet", "train"),
    val=("imagenet", "val"),
    description="ImageNet with ImageNet-Vid-Robust (pm10 primary, pm0 beside it) as its shift (WiSE-FT's further "
                "shifts).",
))
