"""WILDS iWildCam and FMoW, split and scored as the WILDS package does, from its official downloads.

The converters read the metadata CSV of the WILDS release (no ``wilds`` package needed) and
reproduce its split logic; each sample's metadata (camera location, region, year) goes into its
``.json`` in the shards, where the metrics that need it read it.

* **iWildCam** (WILDS v2.0, ``iwildcam_v2.0/``): ``metadata.csv`` names each image's split
  (``train``, ``id_val``, ``id_test``, ``val`` = OOD val, ``test`` = OOD test), file (under
  ``train/``) and label ``y`` (182 classes). Metric: macro-F1 over the classes present in the
  ground truth, as WILDS' ``F1(average="macro")`` calls ``sklearn.metrics.f1_score(...,
  labels=torch.unique(y_true))``.
* **FMoW** (WILDS v1.1, ``fmow_v1.1/``): ``rgb_metadata.csv`` row ``i`` is ``images/rgb_img_{i}.png``.
  WILDS' official scheme (``time_after_2016``): OOD test = ``split == "test"`` taken in 2016 or
  later, OOD val = ``split == "val"`` taken 2013-2015, and train / ID val / ID test = ``split ==
  train / val / test`` taken before 2013; ``seq`` rows are never used. The region of an image comes
  from its ``country_code`` through ``country_code_mapping.csv`` (``alpha-3`` -> ``region``), and
  is ``Other`` for codes the mapping lacks. Worst-region accuracy is the minimum over the regions
  present in the split, ``Other`` excluded, as ``FMoWDataset.eval`` computes it.

Our ``test`` split of ``iwildcam``/``fmow`` is WILDS' ``id_test`` and ``val`` its ``id_val``; the
``-ood`` datasets hold WILDS' ``test`` and ``val``.
"""
from __future__ import annotations

import csv
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    check_count,
    require_files,
    sanitise,
    shuffled,
)
from robustbench_ft.datasets.class_lists import load_list, load_table
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards.manifest import Manifest

IWILDCAM_CLASSES = load_table("iwildcam_classes.tsv")
IWILDCAM_CLASSNAMES: tuple[str, ...] = tuple(row[3].lower() for row in IWILDCAM_CLASSES)
# English names repeat (two "lowland paca" categories...): shards name classes by iWildCam category_id.
IWILDCAM_CATEGORY_IDS: tuple[str, ...] = tuple(row[1] for row in IWILDCAM_CLASSES)
FMOW_CATEGORIES: tuple[str, ...] = load_list("fmow_categories.txt")
# The raw categories are the class names: wise-ft and FLYP prompt with them, underscores kept (see fmow.templates.txt).
FMOW_CLASSNAMES: tuple[str, ...] = FMOW_CATEGORIES

# our split -> WILDS split, per dataset
_ID_SPLITS = {"train": "train", "val": "id_val", "test": "id_test"}
_OOD_SPLITS = {"val": "val", "test": "test"}
# Split sizes of the official releases (WILDS v2.0 iWildCam, v1.1 FMoW), keyed by WILDS split.
IWILDCAM_COUNTS = {"train": 129_809, "id_val": 7_314, "id_test": 8_154, "val": 14_961, "test": 42_791}
FMOW_COUNTS = {"train": 76_863, "id_val": 11_483, "id_test": 11_327, "val": 19_915, "test": 22_108}
FMOW_OOD_TEST_START = datetime(2016, 1, 1, tzinfo=timezone.utc)
FMOW_OOD_VAL_START = datetime(2013, 1, 1, tzinfo=timezone.utc)
OTHER_REGION = "Other"

_IWILDCAM_LAYOUT = "iwildcam_v2.0/ with metadata.csv and train/<filename> (the WILDS v2.0 archive)"
_FMOW_LAYOUT = ("fmow_v1.1/ with rgb_metadata.csv, country_code_mapping.csv and images/rgb_img_<row>.png "
                "(the WILDS v1.1 archive)")


def _read_csv(dataset: str, path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ConversionError(f"{dataset}: {path} lacks the column(s) {', '.join(missing)} of the official WILDS "
                                  f"metadata (it has {', '.join(reader.fieldnames or ()) or 'no header'})")
        return list(reader)


def _wilds_split(dataset: str, split: str) -> str:
    table = _OOD_SPLITS if dataset.endswith("-ood") else _ID_SPLITS
    return table[split]


def _convert(items: list[SourceItem], out: Path, dataset: str, split: str, options: ConvertOptions,
             classes: tuple[str, ...], metadata: dict[str, Any]) -> Manifest:
    if split == "train":
        items = shuffled(items)
    return convert_items(items, out, name=f"{dataset}-{split}", classes=classes, options=options,
                         metadata={"dataset": dataset, "split": split, **metadata})


def convert_iwildcam(src: Path, out: Path, split: str, options: ConvertOptions, *, dataset: str) -> Manifest:
    """One split of iWildCam from ``iwildcam_v2.0/`` (see the module docstring)."""
    require_files(dataset, src, ("metadata.csv", "train"), _IWILDCAM_LAYOUT)
    wilds_split = _wilds_split(dataset, split)
    rows = _read_csv(dataset, src / "metadata.csv",
                     ("split", "filename", "y", "location_remapped", "sequence_remapped", "datetime"))
    items = []
    for i, row in enumerate(rows):
        if row["split"] != wilds_split:
            continue
        label = int(row["y"])
        if not 0 <= label < len(IWILDCAM_CLASSNAMES):
            raise ConversionError(f"{dataset}: row {i + 2} of {src / 'metadata.csv'} has y={label}, outside the "
                                  f"{len(IWILDCAM_CLASSNAMES)} classes of WILDS v2.0")
        meta = {"location": int(row["location_remapped"]), "sequence": int(row["sequence_remapped"]),
                "datetime": row["datetime"], "wilds_split": wilds_split}
        path = src / "train" / row["filename"]
        items.append(SourceItem(f"{dataset}-{sanitise(Path(row['filename']).stem)}", label,
                                f"train/{row['filename']}", str(path.resolve()), meta=meta))
    checked = check_count(dataset, split, len(items), IWILDCAM_COUNTS[wilds_split], options, src / "metadata.csv")
    return _convert(items, out, dataset, split, options, IWILDCAM_CATEGORY_IDS, {"wilds_split": wilds_split, **checked})


def _timestamp(text: str) -> datetime:
    """A FMoW timestamp (ISO 8601, e.g. ``2016-02-29T10:53:50Z``) as an aware UTC datetime."""
    stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def fmow_wilds_split(split: str, stamp: datetime) -> str | None:
    """WILDS' split of a FMoW row (official scheme ``time_after_2016``), or None where WILDS uses none."""
    if split == "seq":
        return None
    if stamp >= FMOW_OOD_TEST_START:
        return "test" if split == "test" else None
    if stamp >= FMOW_OOD_VAL_START:
        return "val" if split == "val" else None
    return {"train": "train", "val": "id_val", "test": "id_test"}.get(split)


def convert_fmow(src: Path, out: Path, split: str, options: ConvertOptions, *, dataset: str) -> Manifest:
    """One split of FMoW from ``fmow_v1.1/`` (see the module docstring)."""
    require_files(dataset, src, ("rgb_metadata.csv", "country_code_mapping.csv", "images"), _FMOW_LAYOUT)
    wilds_split = _wilds_split(dataset, split)
    regions = {r["alpha-3"]: r["region"] for r in _read_csv(dataset, src / "country_code_mapping.csv",
                                                             ("alpha-3", "region"))}
    rows = _read_csv(dataset, src / "rgb_metadata.csv", ("split", "category", "country_code", "timestamp"))
    index = {c: i for i, c in enumerate(FMOW_CATEGORIES)}
    items = []
    for i, row in enumerate(rows):
        stamp = _timestamp(row["timestamp"])
        if fmow_wilds_split(row["split"], stamp) != wilds_split:
            continue
        if row["category"] not in index:
            raise ConversionError(f"{dataset}: row {i + 2} of {src / 'rgb_metadata.csv'} has category "
                                  f"{row['category']!r}, not one of the 62 FMoW categories")
        meta = {"region": regions.get(row["country_code"], OTHER_REGION), "year": stamp.year,
                "country_code": row["country_code"], "wilds_split": wilds_split}
        name = f"rgb_img_{i}.png"
        items.append(SourceItem(f"{dataset}-rgb_img_{i}", index[row["category"]], f"images/{name}",
                                str((src / "images" / name).resolve()), meta=meta))
    checked = check_count(dataset, split, len(items), FMOW_COUNTS[wilds_split], options, src / "rgb_metadata.csv")
    return _convert(items, out, dataset, split, options, FMOW_CATEGORIES, {"wilds_split": wilds_split, **checked})


# --------------------------------------------------------------------------- declarations

_IWILDCAM = {"classnames": IWILDCAM_CLASSNAMES, "class_ids": IWILDCAM_CATEGORY_IDS, "templates": load_list("iwildcam.templates.txt"),
             "metric": "macro_f1",
             "source": "Beery et al. 2021, iWildCam 2020 (WILDS v2.0: Koh et al. 2021, github.com/p-lambda/wilds)"}
_FMOW = {"classnames": FMOW_CLASSNAMES, "templates": load_list("fmow.templates.txt"),
         "source": "Christie et al. 2018, Functional Map of the World "
                   "(WILDS v1.1: Koh et al. 2021, github.com/p-lambda/wilds)"}


IWILDCAM = register_dataset(DatasetSpec(
    name="iwildcam", splits=("train", "val", "test"), **_IWILDCAM,
    description="Camera-trap photos, 182 species; test/val = WILDS id_test/id_val (camera locations seen in training).",
    converter=partial(convert_iwildcam, dataset="iwildcam"),
))
IWILDCAM_OOD = register_dataset(DatasetSpec(
    name="iwildcam-ood", splits=("val", "test"), **_IWILDCAM,
    description="iWildCam at camera locations unseen in training (WILDS test/val).",
    converter=partial(convert_iwildcam, dataset="iwildcam-ood"),
))
FMOW = register_dataset(DatasetSpec(
    name="fmow", splits=("train", "val", "test"), **_FMOW, extra_metrics=("worst_region_acc",),
    description="Satellite images, 62 land-use categories, taken before 2013 (WILDS id_test/id_val).",
    converter=partial(convert_fmow, dataset="fmow"),
))
FMOW_OOD = register_dataset(DatasetSpec(
    name="fmow-ood", splits=("val", "test"), **_FMOW, metric="worst_region_acc",
    description="FMoW images taken in 2016 and later (WILDS test; val = 2013-2015); scored by worst-region accuracy.",
    converter=partial(convert_fmow, dataset="fmow-ood"),
))

# FLYP's README (locuslab/FLYP @ 215d5bb) trains iWildCam and FMoW with --epochs=20 --lr=1e-5 --wd=0.2
# --batch-size=256 (warmup: src/args.py's default, 500 steps). It gives only FLYP's own command; the same
# schedule is used for the baselines it compares with (an assumption the README neither makes nor refutes).
_WILDS_RECIPE = {"epochs": 20.0, "lr": 1e-5, "weight_decay": 0.2, "batch_size": 256, "warmup_steps": 500}
_WILDS_DEFAULTS = {"finetune": _WILDS_RECIPE, "flyp": _WILDS_RECIPE, "lp-ft": _WILDS_RECIPE,
                   "l2-sp": {**_WILDS_RECIPE, "weight_decay": 0.0}}  # L2-SP replaces weight decay
_WILDS_SOURCE = ("FLYP README (locuslab/FLYP @ 215d5bb) iWildCam/FMoW command: 20 epochs, lr 1e-5, wd 0.2, "
                 "batch 256, 500 warmup steps; applied to every fine-tuning method (L2-SP: wd 0)")

register_suite(Suite(
    name="wilds-iwildcam", reference="iwildcam", shifts=("iwildcam-ood",), train=("iwildcam", "train"),
    val=("iwildcam", "val"),
    description="WILDS iWildCam: ID test vs. unseen camera locations (OOD test), macro-F1 as WILDS reports it.",
    method_defaults=_WILDS_DEFAULTS, defaults_source=_WILDS_SOURCE,
))
register_suite(Suite(
    name="wilds-fmow", reference="fmow", shifts=("fmow-ood",), train=("fmow", "train"), val=("fmow", "val"),
    description="WILDS FMoW: ID test (accuracy, worst-region accuracy) vs. images from 2016 on "
                "(worst-region accuracy).",
    method_defaults=_WILDS_DEFAULTS, defaults_source=_WILDS_SOURCE,
))
