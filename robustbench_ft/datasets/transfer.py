"""Transfer datasets (WiSE-FT Table 2, FLYP Table 4) from their official downloads.

Each dataset is a suite of its own, ``transfer-<name>``: a reference distribution with no shifts,
because a suite's zero-shot head and fine-tuning use its reference's classes and these datasets
share none. Their records give the in-distribution accuracy the papers tabulate; the leaderboard
compares methods across them.

Class names and prompt templates are those OpenAI used for CLIP's zero-shot evaluation
(``data/prompts.md`` of github.com/openai/CLIP), in each dataset's label order. Labels come from the
download itself (the class order of its metadata), and the converter checks that the download's
own class names agree with ours, recording any that differ in ``metadata["class_name_mismatches"]``.

| dataset | official download (SRC) | splits: train / val / test |
|---|---|---|
| ``cifar10`` | ``cifar-10-batches-py/`` (python pickles) | data_batch_1..5 less 10% / that 10% / test_batch |
| ``cifar100`` | ``cifar-100-python/`` | train less 10% / that 10% / test |
| ``dtd`` | ``dtd/`` (images/, labels/) | partition 1: train1 / val1 / test1 |
| ``food101`` | ``food-101/`` (images/, meta/) | meta/train.txt less 10% / that 10% / meta/test.txt |
| ``stanford-cars`` | ``stanford_cars/`` (torchvision's layout) | cars_train less 10% / that 10% / cars_test |
| ``sun397`` | ``SUN397/`` + ``Partitions/`` | Training_01 less 10% / that 10% / Testing_01 |
| ``flowers102`` | ``flowers-102/`` (jpg/, imagelabels.mat, setid.mat) | trnid / valid / tstid |
| ``caltech101`` | ``caltech-101/101_ObjectCategories/`` | 30 images per class less 10% / that 10% / the rest |

"Less 10%" is :func:`~robustbench_ft.convert.sources.holdout_split`: a validation set for model
selection cut from the official training set by a hash of each image's key, for datasets that
ship none. Caltech-101 ships no split at all; like CLIP we take 30 training images per class
(the first 30 by a hash of their path, 3,060 in all) and test on the rest (6,085 in CLIP's count).
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    check_count,
    class_folder_items,
    holdout_split,
    read_lines,
    require_files,
    sanitise,
    shuffled,
)
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.demo.digits import NumpyOnlyUnpickler
from robustbench_ft.shards.manifest import Manifest

VAL_FRACTION = 0.1
CALTECH_TRAIN_PER_CLASS = 30

Scan = Callable[[Path, str, ConvertOptions], tuple[list[SourceItem], tuple[str, ...]]]
"""(src, official split, options) -> (items, the download's own class names in label order, or () if it has none)."""


# --------------------------------------------------------------------------- scanners


CIFAR_REFUSAL = "it holds a {what} object; a CIFAR batch holds only dicts, lists, strings and numpy arrays"


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR python batch, read with an unpickler that accepts numpy arrays and nothing else.

    The batches are Python 2 pickles; ``latin1`` decodes their byte strings as numpy expects.
    """
    try:
        with open(path, "rb") as fh:
            return NumpyOnlyUnpickler(fh, encoding="latin1", refusal=CIFAR_REFUSAL).load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ConversionError(f"{path} is not a readable CIFAR python batch ({e}); re-download and extract "
                              "the python version of the archive") from None


def _cifar_scan(src: Path, split: str, options: ConvertOptions, *, dataset: str, files: dict[str, tuple[str, ...]],
                meta: str, names_key: str, labels_key: str) -> tuple[list[SourceItem], tuple[str, ...]]:
    every = sorted({f for names in files.values() for f in names} | {meta})
    layout = f"the extracted python archive holding {', '.join(every)}"
    require_files(dataset, src, (*files[split], meta), layout)
    names = tuple(_unpickle(src / meta)[names_key])
    items = []
    for batch in files[split]:
        data = _unpickle(src / batch)
        pixels = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = data[labels_key]
        if len(labels) != len(pixels):
            raise ConversionError(f"{src / batch}: {len(pixels)} images but {len(labels)} labels")
        items.extend(SourceItem(f"{dataset}-{batch}-{i:05d}", int(y), f"{batch}[{i}]", pixels=pixels[i])
                     for i, y in enumerate(labels))
    return items, names


def _listed_items(root: Path, lines: list[str], folder_labels: dict[str, int], dataset: str,
                  suffix: str = "") -> list[SourceItem]:
    """Items for split-file lines ``<class>/<file>`` relative to ``root``."""
    items = []
    for line in lines:
        rel = line.lstrip("/") + suffix
        folder = rel.rsplit("/", 1)[0]
        if folder not in folder_labels:
            raise ConversionError(f"{dataset}: split file lists {line!r}, whose class {folder!r} is not one of the "
                                  f"{len(folder_labels)} classes")
        key = f"{dataset}-" + "-".join(sanitise(p) for p in rel.rsplit(".", 1)[0].split("/"))
        items.append(SourceItem(key, folder_labels[folder], rel, str((root / rel).resolve())))
    return items


def _dtd_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    require_files("dtd", src, ("images", f"labels/{split}1.txt"), "dtd/ with images/<class>/<image> and labels/")
    names = tuple(sorted(p.name for p in (src / "images").iterdir() if p.is_dir()))
    labels = {name: i for i, name in enumerate(names)}
    return _listed_items(src / "images", read_lines(src / "labels" / f"{split}1.txt"), labels, "dtd"), names


def _food_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    require_files("food101", src, ("images", "meta/classes.txt", f"meta/{split}.txt"),
                  "food-101/ with images/<class>/<id>.jpg and meta/{classes,train,test}.txt")
    names = tuple(read_lines(src / "meta" / "classes.txt"))
    labels = {name: i for i, name in enumerate(names)}
    return _listed_items(src / "images", read_lines(src / "meta" / f"{split}.txt"), labels, "food101", ".jpg"), names


def _sun_partitions(src: Path) -> Path:
    for place in (src / "Partitions", src.parent / "Partitions", src):
        if (place / "Training_01.txt").is_file():
            return place
    raise ConversionError(f"sun397: no Training_01.txt/Testing_01.txt in {src / 'Partitions'}, "
                          f"{src.parent / 'Partitions'} or {src}; extract Partitions.zip (from the SUN397 page) next "
                          "to or into SUN397/")


def _sun_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    require_files("sun397", src, ("ClassName.txt",), "SUN397/ with ClassName.txt and <letter>/<class>/<image>")
    paths = tuple(read_lines(src / "ClassName.txt"))  # "/a/abbey", "/a/apartment_building/outdoor", ...
    labels = {p.lstrip("/"): i for i, p in enumerate(paths)}
    partition = _sun_partitions(src) / f"{'Training' if split == 'train' else 'Testing'}_01.txt"
    names = tuple(p.split("/", 2)[2].replace("/", " ") for p in paths)  # "apartment_building outdoor"
    return _listed_items(src, read_lines(partition), labels, "sun397"), names


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{path} is not a readable MATLAB file ({e}); re-download it") from None


def _cars_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    places = (src / "cars_test_annos_withlabels.mat", src / "devkit" / "cars_test_annos_withlabels.mat")
    test_annos = next((p for p in places if p.is_file()), places[0])
    annos = src / "devkit" / "cars_train_annos.mat" if split == "train" else test_annos
    folder = "cars_train" if split == "train" else "cars_test"
    require_files("stanford-cars", src, ("devkit/cars_meta.mat", str(annos.relative_to(src)), folder),
                  "stanford_cars/ with devkit/{cars_meta,cars_train_annos}.mat, cars_train/, cars_test/ and "
                  "cars_test_annos_withlabels.mat (torchvision's layout)")
    names = tuple(str(n) for n in np.atleast_1d(_loadmat(src / "devkit" / "cars_meta.mat")["class_names"]))
    items = []
    for anno in np.atleast_1d(_loadmat(annos)["annotations"]):
        fname = str(anno["fname"])
        rel = f"{folder}/{fname}"
        items.append(SourceItem(f"stanford-cars-{folder}-{sanitise(fname.rsplit('.', 1)[0])}", int(anno["class"]) - 1,
                                rel, str((src / rel).resolve())))
    return items, names


def _flowers_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    require_files("flowers102", src, ("jpg", "imagelabels.mat", "setid.mat"),
                  "flowers-102/ with jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat")
    labels = np.atleast_1d(_loadmat(src / "imagelabels.mat")["labels"])
    ids = np.atleast_1d(_loadmat(src / "setid.mat")[{"train": "trnid", "val": "valid", "test": "tstid"}[split]])
    items = []
    for image_id in sorted(int(i) for i in ids):
        rel = f"jpg/image_{image_id:05d}.jpg"
        items.append(SourceItem(f"flowers102-image_{image_id:05d}", int(labels[image_id - 1]) - 1, rel,
                                str((src / rel).resolve())))
    return items, ()  # the release has no class names: labels are 1..102


def _caltech_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    root = src / "101_ObjectCategories" if (src / "101_ObjectCategories").is_dir() else src
    folders = load_list("caltech101_folders.txt")
    items = class_folder_items(root, {f: i for i, f in enumerate(folders)}, dataset="caltech101",
                               layout="caltech-101/101_ObjectCategories/<folder>/<image> (102 folders)",
                               allow_missing=options.allow_count_mismatch)
    by_class: dict[int, list[SourceItem]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    chosen = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda it: hashlib.sha256(it.source.encode()).hexdigest())
        chosen.extend(ranked[:CALTECH_TRAIN_PER_CLASS] if split == "train" else ranked[CALTECH_TRAIN_PER_CLASS:])
    return sorted(chosen, key=lambda it: (it.label, it.source)), ()  # folder names were checked by the scan


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class TransferDataset:
    """How to read one transfer dataset: its scanner, official split sizes and layout."""

    name: str
    files: str  # stem of its class_lists/ files
    scan: Scan
    counts: dict[str, int | None]  # official split -> images (None: not checked); "val" only where the release has one
    description: str
    source: str


def _normalise(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def convert_transfer(src: Path, out: Path, split: str, options: ConvertOptions, *, dataset: TransferDataset,
                     classnames: tuple[str, ...]) -> Manifest:
    """One split of a transfer dataset; ``train``/``val`` come from the official training set when it has no val."""
    official = split if split in dataset.counts else "train"
    items, names = dataset.scan(src, official, options)
    checked = check_count(dataset.name, split, len(items), dataset.counts[official], options, src)
    if names and len(names) != len(classnames):
        raise ConversionError(f"{dataset.name}: the download at {src} has {len(names)} classes, {dataset.name} has "
                              f"{len(classnames)}; is it another dataset or version?")
    mismatches = [[own, ours] for own, ours in zip(names, classnames) if _normalise(own) != _normalise(ours)]
    if "val" not in dataset.counts and split in ("train", "val"):
        items = holdout_split(items, VAL_FRACTION, split)
        checked["val_fraction"] = VAL_FRACTION
    if split == "train":
        items = shuffled(items)
    return convert_items(items, out, name=f"{dataset.name}-{split}", classes=classnames, options=options,
                         metadata={"dataset": dataset.name, "split": split, "official_split": official,
                                   "class_name_mismatches": mismatches, **checked})


_CIFAR10 = partial(_cifar_scan, dataset="cifar10", meta="batches.meta", names_key="label_names", labels_key="labels",
                   files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)})
_CIFAR100 = partial(_cifar_scan, dataset="cifar100", meta="meta", names_key="fine_label_names",
                    labels_key="fine_labels", files={"train": ("train",), "test": ("test",)})

TRANSFER_DATASETS: tuple[TransferDataset, ...] = (
    TransferDataset("cifar10", "cifar10", _CIFAR10, {"train": 50_000, "test": 10_000},
                    "CIFAR-10: 32x32 photos of 10 classes.", "Krizhevsky 2009 (cs.toronto.edu/~kriz/cifar.html)"),
    TransferDataset("cifar100", "cifar100", _CIFAR100, {"train": 50_000, "test": 10_000},
                    "CIFAR-100: 32x32 photos of 100 classes.", "Krizhevsky 2009 (cs.toronto.edu/~kriz/cifar.html)"),
    TransferDataset("dtd", "dtd", _dtd_scan, {"train": 1_880, "val": 1_880, "test": 1_880},
                    "Describable Textures: 47 texture attributes (partition 1).",
                    "Cimpoi et al. 2014 (robots.ox.ac.uk/~vgg/data/dtd)"),
    TransferDataset("food101", "food101", _food_scan, {"train": 75_750, "test": 25_250},
                    "Food-101: 101 dishes.",
                    "Bossard et al. 2014 (data.vision.ee.ethz.ch/cvl/datasets_extra/food-101)"),
    TransferDataset("stanford-cars", "stanford_cars", _cars_scan, {"train": 8_144, "test": 8_041},
                    "Stanford Cars: 196 make/model/year classes.",
                    "Krause et al. 2013 (ai.stanford.edu/~jkrause/cars)"),
    TransferDataset("sun397", "sun397", _sun_scan, {"train": 19_850, "test": 19_850},
                    "SUN397: 397 scene categories (partition 01, 50+50 images per class).",
                    "Xiao et al. 2010 (vision.princeton.edu/projects/2010/SUN)"),
    TransferDataset("flowers102", "flowers102", _flowers_scan, {"train": 1_020, "val": 1_020, "test": 6_149},
                    "Oxford Flowers-102: 102 flower species.",
                    "Nilsback & Zisserman 2008 (robots.ox.ac.uk/~vgg/data/flowers/102)"),
    TransferDataset("caltech101", "caltech101", _caltech_scan,
                    # Sources disagree on the archive's total (9,144 to 9,146 images): the test count is not checked.
                    {"train": CALTECH_TRAIN_PER_CLASS * 102, "test": None},
                    "Caltech-101: 101 object categories and a background class; 30 training images per class.",
                    "Fei-Fei et al. 2004 (data.caltech.edu/records/mzrjq-6wc02)"),
)

def _register(dataset: TransferDataset) -> None:
    classnames = load_list(f"{dataset.files}.classes.txt")
    register_dataset(DatasetSpec(
        name=dataset.name, classnames=classnames, templates=load_list(f"{dataset.files}.templates.txt"),
        splits=("train", "val", "test"), description=dataset.description, source=dataset.source,
        converter=partial(convert_transfer, dataset=dataset, classnames=classnames),
    ))
    register_suite(Suite(
        name=f"transfer-{dataset.name}", reference=dataset.name, shifts=(), train=(dataset.name, "train"),
        val=(dataset.name, "val"), description=f"{dataset.description} Transfer accuracy (reference only, no shifts).",
    ))


for _dataset in TRANSFER_DATASETS:
    _register(_dataset)
