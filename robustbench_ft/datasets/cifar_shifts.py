"""The ``cifar10`` suite: CIFAR-10 as the reference, CIFAR-10.1 and CIFAR-10.2 as its shifts (two of WiSE-FT's
"six further distribution shifts", Wortsman et al., CVPR 2022, §4).

* **CIFAR-10.1** (Recht et al., "Do CIFAR-10 Classifiers Generalize to CIFAR-10?", arXiv 1806.00451):
  github.com/modestyachts/CIFAR-10.1 @ d9982ab, ``datasets/cifar10.1_v6_data.npy`` (uint8 ``[2000, 32, 32, 3]``)
  and ``cifar10.1_v6_labels.npy`` (2,000 labels, 200 per class). The README recommends v6 ("exactly class
  balanced"); wise-ft (mlfoundations/wise-ft @ 58b7a4b, ``src/datasets/cifar10.py::CIFAR101``) evaluates v6.
* **CIFAR-10.2** (Lu et al., "Harder or Different? A Closer Look at Distribution Shift in Dataset
  Reproduction"): github.com/modestyachts/cifar-10.2, the test set of 2,000 images. The current release
  (@ 521467a) ships ``cifar102_test.npz`` (keys ``images``, ``labels``); the one wise-ft's ``datasets.md`` pins
  (@ 61b0e3a) ships ``cifar102_test.npy``, a pickled dict with the same keys. Both are read; the dict through an
  unpickler that accepts numpy arrays and plain containers only (a data file must not run code). Only the test
  split is evaluated, as wise-ft does (``CIFAR102`` loads the test file alone).

Both label in CIFAR-10's class order (CIFAR-10.1 ``code/utils.py``: ``cifar10_label_names``; CIFAR-10.2 README:
``label_names`` maps CIFAR-10 indices), so their class list is the reference's (CLIP's CIFAR-10 names) and the
logits are read as they are. Metric: plain top-1, as wise-ft (no ``post_loop_metrics``).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import ConversionError, ConvertOptions, SourceItem, check_count
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.demo.digits import NumpyOnlyUnpickler
from robustbench_ft.shards.manifest import Manifest

CIFAR101_FILES = ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")
CIFAR102_FILES = ("cifar102_test.npz", "cifar102_test.npy")
TEST_COUNT = 2_000  # both: CIFAR-10.1 README (v6: 2,000 images); CIFAR-10.2 README (n = 2,000 test)


CIFAR102_REFUSAL = "it holds a {what} object; the CIFAR-10.2 file holds only a dict of numpy arrays"


def _folder(src: Path, names: tuple[str, ...], dataset: str, layout: str) -> Path:
    """``src`` or its ``datasets/`` folder (a clone of the repository), whichever holds one of ``names``."""
    for place in (src, src / "datasets"):
        if any((place / n).is_file() for n in names):
            return place
    found = ", ".join(sorted(p.name for p in src.iterdir())[:8]) if src.is_dir() else "not a directory"
    raise ConversionError(f"{dataset}: {src} holds none of {', '.join(names)}; expected {layout}. Found: {found}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable numpy array file ({e}); re-download it") from None


def _cifar101_arrays(src: Path) -> tuple[np.ndarray, np.ndarray, str]:
    folder = _folder(src, CIFAR101_FILES, "cifar10.1",
                     "the CIFAR-10.1 repository (or its datasets/ folder) with " + " and ".join(CIFAR101_FILES))
    missing = [n for n in CIFAR101_FILES if not (folder / n).is_file()]
    if missing:
        raise ConversionError(f"cifar10.1: {folder} lacks {', '.join(missing)}; both v6 files are needed")
    return _load_npy(folder / CIFAR101_FILES[0]), _load_npy(folder / CIFAR101_FILES[1]), CIFAR101_FILES[0]


def _cifar102_dict(path: Path) -> dict[str, Any]:
    """The old release's ``.npy``: a 0-d object array holding the dict, read without running code."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype != object or shape != ():
                raise ConversionError(f"{path}: expected a pickled dict (the 2020 release), found a {dtype} array "
                                      f"of shape {shape}")
            value = NumpyOnlyUnpickler(f, refusal=CIFAR102_REFUSAL).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as e:
        raise ConversionError(f"{path} is not a readable CIFAR-10.2 file ({e}); re-download it") from None
    value = value.item() if isinstance(value, np.ndarray) else value
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a dict with 'images' and 'labels', found {type(value).__name__}")
    return value


def _cifar102_arrays(src: Path) -> tuple[np.ndarray, np.ndarray, str]:
    folder = _folder(src, CIFAR102_FILES, "cifar10.2", "the CIFAR-10.2 repository with cifar102_test.npz (current "
                     "release) or cifar102_test.npy (the 2020 release wise-ft pins)")
    if (folder / CIFAR102_FILES[0]).is_file():
        try:
            with np.load(folder / CIFAR102_FILES[0], allow_pickle=False) as data:
                table = {k: data[k] for k in ("images", "labels") if k in data.files}
        except (OSError, ValueError) as e:
            raise ConversionError(f"{folder / CIFAR102_FILES[0]} is not a readable npz file ({e})") from None
        name = CIFAR102_FILES[0]
    else:
        table, name = _cifar102_dict(folder / CIFAR102_FILES[1]), CIFAR102_FILES[1]
    if "images" not in table or "labels" not in table:
        raise ConversionError(f"cifar10.2: {folder / name} has keys {sorted(table)}; expected 'images' and 'labels'")
    return np.asarray(table["images"]), np.asarray(table["labels"]), name


def convert_cifar_shift(src: Path, out: Path, split: str, options: ConvertOptions, *, dataset: str,
                        classnames: tuple[str, ...]) -> Manifest:
    """The test set of CIFAR-10.1 (v6) or CIFAR-10.2 as shards (labels in CIFAR-10's order)."""
    images, labels, name = (_cifar101_arrays if dataset == "cifar10.1" else _cifar102_arrays)(src)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ConversionError(f"{dataset}: {name} holds a {images.dtype} array of shape {images.shape}; expected "
                              "uint8 [N, 32, 32, 3]")
    if len(labels) != len(images) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10):
        raise ConversionError(f"{dataset}: {len(images)} images but {len(labels)} labels, or labels outside 0..9")
    checked = check_count(dataset, split, len(images), TEST_COUNT, options, src)
    stem = dataset.replace(".", "_")
    items = [SourceItem(f"{stem}-{i:05d}", int(y), f"{name}[{i}]", pixels=images[i]) for i, y in enumerate(labels)]
    return convert_items(items, out, name=f"{stem}-{split}", classes=classnames, options=options,
                         metadata={"dataset": dataset, "split": split, "file": name, **checked})


_SHIFTS = {
    "cifar10.1": ("CIFAR-10.1 (v6): 2,000 new CIFAR-10-like test images from TinyImages, class balanced.",
                  "Recht et al. 2018, arXiv 1806.00451 (github.com/modestyachts/CIFAR-10.1)"),
    "cifar10.2": ("CIFAR-10.2: a second reproduction of the CIFAR-10 test set, 2,000 test images.",
                  "Lu et al., Harder or Different? (github.com/modestyachts/cifar-10.2)"),
}

for _name, (_description, _source) in _SHIFTS.items():
    _classes = load_list("cifar10.classes.txt")
    register_dataset(DatasetSpec(
        name=_name, classnames=_classes, templates=load_list("cifar10.templates.txt"), splits=("test",),
        description=_description, source=_source,
        converter=lambda src, out, split, options, _d=_name, _c=_classes: convert_cifar_shift(
            src, out, split, options, dataset=_d, classnames=_c),
    ))

CIFAR10_SUITE = register_suite(Suite(
    name="cifar10", reference="cifar10", shifts=tuple(_SHIFTS), train=("cifar10", "train"), val=("cifar10", "val"),
    description="CIFAR-10 with CIFAR-10.1 (v6) and CIFAR-10.2 as shifts (WiSE-FT's further shifts).",
))
