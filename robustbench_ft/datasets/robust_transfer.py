"""The three datasets of Heuillet et al.'s robust-transfer benchmark not in :mod:`robustbench_ft.datasets.transfer`
(Oxford-IIIT Pet, FGVC-Aircraft, UC Merced Land Use), and the ``robust-transfer`` collection of all six suites.

Heuillet et al., "A Guide to Robust Generalization: The Impact of Architecture, Pre-training, and Optimization
Strategy" (arXiv 2508.14079, 2025) fine-tune on Caltech-101, Oxford-IIIT Pet, Flowers-102, Stanford Cars,
FGVC-Aircraft and UC Merced (MaxHeuillet/robust_training @ 4c886c1 ``databases/loaders.py``). Each is a suite of its
own, ``transfer-<name>``, as the other transfer datasets are; ``robust-transfer`` names the six, and ``run --suite
robust-transfer`` runs each in turn (typically with ``--perturbations linf-4/255,l2-2.0,l1-75,corruptions-s3``).

| dataset | official download (SRC) | splits: train / val / test |
|---|---|---|
| ``oxford-pets`` | ``oxford-iiit-pet/`` (images/, annotations/) | trainval.txt less 10% / that 10% / test.txt |
| ``fgvc-aircraft`` | ``fgvc-aircraft-2013b/`` (data/images/, data/variants.txt) | images_variant_{train,val,test}.txt |
| ``uc-merced`` | ``UCMerced_LandUse/`` (Images/<class>/) | Heuillet et al.'s stratified 68 % / 12 % / 20 % |

Counts (each converter checks them): Pets trainval 3,680 and test 3,669, 37 breeds (mmpretrain @ ee7f2e8
``oxfordiiitpet.py``); FGVC-Aircraft 100 variants, test 3,333 (mmpretrain ``fgvcaircraft.py``; train and val are
not checked: their sizes were not found, only trainval 6,667); UC Merced 21 classes × 100 images (torchgeo @ 7ea0616
``ucmerced.py``), split as ``process_trainvaltest`` does (``train_test_split(test_size=0.2, stratify=labels,
random_state=42)``, then ``test_size=0.15`` of the rest, same seed, over torchvision ImageFolder's order: sorted
folders, sorted files), which gives 1,428 / 252 / 420 (derived). Heuillet et al. hold out 15 % of Pets' trainval as
val; here the harness's hash-keyed 10 % holdout is used, as for the other transfer datasets (the test sets agree).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    check_count,
    class_folder_items,
    read_lines,
    require_files,
    sanitise,
    shuffled,
)
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.datasets.transfer import TransferDataset, _register
from robustbench_ft.shards.manifest import Manifest

ROBUST_TRANSFER = ("transfer-caltech101", "transfer-oxford-pets", "transfer-flowers102", "transfer-stanford-cars",
                   "transfer-fgvc-aircraft", "transfer-uc-merced")
"""The suites of the ``robust-transfer`` collection: Heuillet et al.'s six datasets."""
COLLECTIONS = {"robust-transfer": ROBUST_TRANSFER}
UC_MERCED_PER_CLASS = 100
UC_MERCED_SPLIT_SEED = 42  # random_state of both train_test_split calls (Heuillet et al.)


def _pets_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    listing = f"annotations/{'trainval' if split == 'train' else 'test'}.txt"
    require_files("oxford-pets", src, ("images", listing),
                  "oxford-iiit-pet/ with images/<id>.jpg and annotations/{trainval,test}.txt")
    items, tokens = [], {}
    for line in read_lines(src / listing):
        if line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 37:
            raise ConversionError(f"oxford-pets: {src / listing}: expected 'Image CLASS-ID SPECIES BREED-ID' with "
                                  f"CLASS-ID in 1..37, got {line[:80]!r}")
        image, label = parts[0], int(parts[1]) - 1
        tokens.setdefault(label, image.rsplit("_", 1)[0])  # the breed is the image name less its number
        rel = f"images/{image}.jpg"
        items.append(SourceItem(f"oxford-pets-{sanitise(image)}", label, rel, str((src / rel).resolve())))
    names = tuple(tokens[i] for i in range(37)) if len(tokens) == 37 else ()
    return items, names


def _aircraft_scan(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceItem], tuple[str, ...]]:
    data = src / "data" if (src / "data").is_dir() else src
    listing = f"images_variant_{split}.txt"
    require_files("fgvc-aircraft", data, ("images", "variants.txt", listing),
                  "fgvc-aircraft-2013b/data/ with images/<id>.jpg, variants.txt and images_variant_<split>.txt")
    names = tuple(read_lines(data / "variants.txt"))
    labels = {name: i for i, name in enumerate(names)}
    items = []
    for line in read_lines(data / listing):
        image, _, variant = line.partition(" ")
        if variant not in labels:
            raise ConversionError(f"fgvc-aircraft: {data / listing} lists {line[:80]!r}, whose variant is not one of "
                                  f"the {len(names)} in variants.txt")
        rel = f"images/{image}.jpg"
        items.append(SourceItem(f"fgvc-aircraft-{sanitise(image)}", labels[variant], rel, str((data / rel).resolve())))
    return items, names


def uc_merced_split(labels: list[int], split: str) -> list[int]:
    """Indices of ``split`` among samples labelled ``labels`` (ImageFolder order), as Heuillet et al. split them."""
    from sklearn.model_selection import train_test_split

    everything = range(len(labels))
    rest, test = train_test_split(everything, test_size=0.2, stratify=labels, random_state=UC_MERCED_SPLIT_SEED)
    if split == "test":
        return sorted(test)
    train, val = train_test_split(rest, test_size=0.15, stratify=[labels[i] for i in rest],
                                  random_state=UC_MERCED_SPLIT_SEED)
    return sorted(train if split == "train" else val)


def convert_uc_merced(src: Path, out: Path, split: str, options: ConvertOptions, *,
                      classnames: tuple[str, ...]) -> Manifest:
    if options.image_format == "keep":  # the release is TIFF, which shards do not store: PNG keeps every pixel
        options = replace(options, image_format="png")
    root = src / "Images" if (src / "Images").is_dir() else src
    folders = load_list("uc_merced_folders.txt")
    items = class_folder_items(root, {f: i for i, f in enumerate(folders)}, dataset="uc-merced",
                               layout="UCMerced_LandUse/Images/<class>/<class>NN.tif (21 folders)",
                               allow_missing=options.allow_count_mismatch)
    items = sorted(items, key=lambda it: (it.label, it.source))  # ImageFolder: sorted classes, then sorted files
    checked = check_count("uc-merced", "all", len(items), UC_MERCED_PER_CLASS * len(folders), options, src)
    chosen = [items[i] for i in uc_merced_split([it.label for it in items], split)]
    if split == "train":
        chosen = shuffled(chosen)
    return convert_items(chosen, out, name=f"uc-merced-{split}", classes=classnames, options=options,
                         metadata={"dataset": "uc-merced", "split": split, "split_rule": "Heuillet et al. "
                                   "process_trainvaltest (sklearn train_test_split, stratified, random_state 42)",
                                   **checked})


DATASETS = (
    TransferDataset("oxford-pets", "oxford_pets", _pets_scan, {"train": 3_680, "test": 3_669},
                    "Oxford-IIIT Pet: 37 cat and dog breeds.",
                    "Parkhi et al. 2012 (robots.ox.ac.uk/~vgg/data/pets)"),
    TransferDataset("fgvc-aircraft", "fgvc_aircraft", _aircraft_scan, {"train": None, "val": None, "test": 3_333},
                    "FGVC-Aircraft (2013b): 100 aircraft variants.",
                    "Maji et al. 2013 (robots.ox.ac.uk/~vgg/data/fgvc-aircraft)"),
)

for _dataset in DATASETS:
    _register(_dataset)

_UC_CLASSES = load_list("uc_merced.classes.txt")
register_dataset(DatasetSpec(
    name="uc-merced", classnames=_UC_CLASSES, templates=load_list("uc_merced.templates.txt"),
    splits=("train", "val", "test"), description="UC Merced Land Use: 21 land-use classes of 256x256 aerial images.",
    source="Yang & Newsam 2010 (weegee.vision.ucmerced.edu/datasets/landuse.html)",
    converter=partial(convert_uc_merced, classnames=_UC_CLASSES),
))
register_suite(Suite(
    name="transfer-uc-merced", reference="uc-merced", shifts=(), train=("uc-merced", "train"), val=("uc-merced", "val"),
    description="UC Merced Land Use: 21 land-use classes. Transfer accuracy (reference only, no shifts).",
))
