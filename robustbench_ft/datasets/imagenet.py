"""ImageNet (ILSVRC-2012) and its five natural distribution shifts, as the WiSE-FT paper evaluates them.

Every dataset is one declaration below; the label handling lives in the declaration (see
:class:`~robustbench_ft.datasets.spec.DatasetSpec`), and each converter only reads its official
download's layout. Class lists and mappings are data files in ``class_lists/`` that name their
source; ImageNet's class names and the 80 CLIP prompt templates come from ``open_clip``.

| dataset | classes | labels | images (official) |
|---|---|---|---|
| ``imagenet`` (test = official val) | 1000 | wnid order | 50,000 val; train 1,281,167 |
| ``imagenetv2-matched-frequency`` | 1000 | folder ``0``..``999`` is the class index | 10,000 |
| ``imagenet-sketch`` | 1000 | wnid folders | 50,889 |
| ``imagenet-r`` | 200 (subset) | wnid folders, logits restricted to the 200 | 30,000 |
| ``imagenet-a`` | 200 (subset) | wnid folders, logits restricted to the 200 | 7,500 |
| ``objectnet`` | 113 (pooled) | ObjectNet folders, max over the mapped ImageNet logits | 18,574 |

ImageNet has no validation split besides the official val set (our test split): ``train`` and
``val`` are cut from the official training set by :func:`~robustbench_ft.convert.sources.holdout_split`
(1 % of the images, 12.8k, by a hash of the file name).
"""
from __future__ import annotations

import io
import tarfile
from functools import partial
from pathlib import Path

import open_clip

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    check_count,
    class_folder_items,
    holdout_split,
    shuffled,
)
from robustbench_ft.datasets.class_lists import load_list, load_table
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards.manifest import Manifest

IMAGENET_WNIDS: tuple[str, ...] = load_list("imagenet_wnids.txt")
IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(open_clip.IMAGENET_CLASSNAMES)
# open_clip keeps the 80 templates of Radford et al. as functions; our templates are "{}" format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
_INDEX = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}
_IMAGENET_R_WNIDS = load_list("imagenet_r_wnids.txt")
_IMAGENET_A_WNIDS = load_list("imagenet_a_wnids.txt")
IMAGENET_R_SUBSET: tuple[int, ...] = tuple(_INDEX[w] for w in _IMAGENET_R_WNIDS)
IMAGENET_A_SUBSET: tuple[int, ...] = tuple(_INDEX[w] for w in _IMAGENET_A_WNIDS)
_OBJECTNET = load_table("objectnet_to_imagenet.tsv")
OBJECTNET_FOLDERS: tuple[str, ...] = tuple(row[0] for row in _OBJECTNET)
OBJECTNET_POOLING: tuple[tuple[int, ...], ...] = tuple(
    tuple(_INDEX[w] for w in row[2].split(",")) for row in _OBJECTNET)
OBJECTNET_BORDER = 2
"""ObjectNet images carry a 1-pixel red border; wise-ft (``crop``) and imagenet-testbed (``crop_image``,
``PIL.ImageOps.crop(border=2)``) both cut 2 pixels from every edge before the model's transform."""

VAL_FRACTION = 0.01
TRAIN_COUNT = 1_281_167
VAL_COUNT = 50_000
# ObjectNet 1.0 on its 113 ImageNet classes; imagenet-testbed lists 18,514 for the 1.0-beta release.
OBJECTNET_COUNTS = {"objectnet-1.0": 18_574, "objectnet-1.0-beta": 18_514}

_CLASS_FOLDERS = "SRC/<class folder>/<image>"
_VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_VAL_META = "data/meta.mat"


def _convert(items: list[SourceItem], out: Path, dataset: str, split: str, options: ConvertOptions,
             classes: tuple[str, ...], metadata: dict) -> Manifest:
    return convert_items(items, out, name=f"{dataset}-{split}", classes=classes, options=options,
                         metadata={"dataset": dataset, "split": split, **metadata})


# --------------------------------------------------------------------------- ImageNet


def _devkit_labels(src: Path) -> dict[str, int]:
    """Label of every official val file name, from the devkit next to (or inside) the flat val folder.

    The devkit's ground truth lists, for val image ``i``, its ILSVRC2012_ID (1..1000), an order that
    is *not* the sorted-wnid label order; ``meta.mat`` maps each ID to its wnid.
    """
    import scipy.io

    places = [src, src.parent]
    for place in places:
        folder = place / "ILSVRC2012_devkit_t12"
        archive = place / "ILSVRC2012_devkit_t12.tar.gz"
        if folder.is_dir():
            truth = (folder / _VAL_GROUND_TRUTH).read_text().split()
            meta = scipy.io.loadmat(folder / _VAL_META, squeeze_me=True)
            break
        if archive.is_file():
            with tarfile.open(archive) as tar:
                truth = tar.extractfile(f"ILSVRC2012_devkit_t12/{_VAL_GROUND_TRUTH}").read().decode().split()
                meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(f"ILSVRC2012_devkit_t12/{_VAL_META}").read()),
                                        squeeze_me=True)
            break
    else:
        raise ConversionError(
            f"imagenet: {src} holds the validation images as flat files, whose labels are in the ILSVRC-2012 devkit, "
            f"but neither ILSVRC2012_devkit_t12/ nor ILSVRC2012_devkit_t12.tar.gz is in {src} or {src.parent}. Put the "
            "devkit there, or use the class-folder layout SRC/<wnid>/<image>")
    synsets = meta["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    return {f"ILSVRC2012_val_{i + 1:08d}": _INDEX[id_to_wnid[int(t)]] for i, t in enumerate(truth)}


def _imagenet_val_items(src: Path, options: ConvertOptions) -> list[SourceItem]:
    if not src.is_dir():
        raise ConversionError(f"imagenet: {src} is not a directory; expected the validation folder val/")
    if any(p.is_dir() and p.name in _INDEX for p in src.iterdir()):
        return class_folder_items(src, _INDEX, dataset="imagenet", layout=f"{_CLASS_FOLDERS} (wnid folders)",
                                  allow_missing=options.allow_count_mismatch)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.startswith("ILSVRC2012_val_"))
    if not files:
        raise ConversionError(
            f"imagenet: {src} has neither layout of the validation set: class folders SRC/<wnid>/<image>, or the flat "
            "files ILSVRC2012_val_00000001.JPEG ... with the devkit next to them")
    labels = _devkit_labels(src)
    unknown = [p.name for p in files if p.name.split(".")[0] not in labels]
    if unknown:
        raise ConversionError(f"imagenet: the devkit has no ground-truth label for {len(unknown)} file(s) in {src} "
                              f"(e.g. {', '.join(unknown[:3])}); are they ILSVRC-2012 validation images?")
    return [SourceItem(f"imagenet-{p.name.split('.')[0]}", labels[p.name.split(".")[0]], p.name, str(p.resolve()))
            for p in files]


def convert_imagenet(src: Path, out: Path, split: str, options: ConvertOptions) -> Manifest:
    """``test``: the official val set, SRC = ``val/`` in either layout; ``train``/``val``: SRC = ``train/<wnid>/``."""
    if split == "test":
        items = _imagenet_val_items(src, options)
        checked = check_count("imagenet", split, len(items), VAL_COUNT, options, src)
    else:
        items = class_folder_items(src, _INDEX, dataset="imagenet", layout=f"{_CLASS_FOLDERS} (train/<wnid>/...)",
                                   allow_missing=options.allow_count_mismatch)
        checked = check_count("imagenet", split, len(items), TRAIN_COUNT, options, src)
        items = holdout_split(items, VAL_FRACTION, split)
        if split == "train":
            items = shuffled(items)
        checked["val_fraction"] = VAL_FRACTION
    return _convert(items, out, "imagenet", split, options, IMAGENET_WNIDS, checked)


# --------------------------------------------------------------------------- shifts


def _convert_folders(src: Path, out: Path, split: str, options: ConvertOptions, *, dataset: str,
                     folders: tuple[str, ...], classes: tuple[str, ...], expected: int | None,
                     layout: str) -> Manifest:
    """A dataset laid out as one folder per class, ``folders[i]`` holding class ``i`` (named ``classes[i]``)."""
    items = class_folder_items(src, {f: i for i, f in enumerate(folders)}, dataset=dataset, layout=layout,
                               allow_missing=options.allow_count_mismatch)
    checked = check_count(dataset, split, len(items), expected, options, src)
    return _convert(items, out, dataset, split, options, classes, checked)


def convert_objectnet(src: Path, out: Path, split: str, options: ConvertOptions) -> Manifest:
    """SRC = ``objectnet-1.0/`` (or its ``images/``): ``images/<folder>/<image>``; keeps the 113 mapped folders."""
    images = src / "images" if (src / "images").is_dir() else src
    folder_labels = {f: i for i, f in enumerate(OBJECTNET_FOLDERS)}
    items = class_folder_items(images, folder_labels, dataset="objectnet",
                               layout="objectnet-1.0/images/<folder>/<image>",
                               allow_missing=options.allow_count_mismatch, ignore=lambda folder: True)
    count = len(items)
    expected = next((n for n in OBJECTNET_COUNTS.values() if n == count), OBJECTNET_COUNTS["objectnet-1.0"])
    checked = check_count("objectnet", split, count, expected, options, images)
    return _convert(items, out, "objectnet", split, options, OBJECTNET_FOLDERS, checked)


# --------------------------------------------------------------------------- declarations

_IMAGENET = {"templates": IMAGENET_TEMPLATES, "extra_metrics": ("ece",)}
_SOURCE_R = "Hendrycks et al. 2021, The Many Faces of Robustness (github.com/hendrycks/imagenet-r)"
_SOURCE_A = "Hendrycks et al. 2021, Natural Adversarial Examples (github.com/hendrycks/natural-adv-examples)"

IMAGENET = register_dataset(DatasetSpec(
    name="imagenet", classnames=IMAGENET_CLASSNAMES, class_ids=IMAGENET_WNIDS, splits=("train", "val", "test"),
    **_IMAGENET,
    description="ILSVRC-2012; test = the official 50k validation set; train/val = the training set without/only "
                "a 1% holdout.",
    source="Russakovsky et al. 2015, ImageNet Large Scale Visual Recognition Challenge (image-net.org)",
    converter=convert_imagenet,
))
IMAGENET_V2 = register_dataset(DatasetSpec(
    name="imagenetv2-matched-frequency", classnames=IMAGENET_CLASSNAMES, class_ids=IMAGENET_WNIDS, **_IMAGENET,
    description="ImageNetV2 MatchedFrequency: a new test set collected like ImageNet's (10k images).",
    source="Recht et al. 2019, Do ImageNet Classifiers Generalize to ImageNet? (github.com/modestyachts/ImageNetV2)",
    converter=partial(_convert_folders, dataset="imagenetv2-matched-frequency",
                      folders=tuple(str(i) for i in range(1000)), classes=IMAGENET_WNIDS, expected=10_000,
                      layout="imagenetv2-matched-frequency-format-val/<class index 0..999>/<image>"),
))
IMAGENET_SKETCH = register_dataset(DatasetSpec(
    name="imagenet-sketch", classnames=IMAGENET_CLASSNAMES, class_ids=IMAGENET_WNIDS, **_IMAGENET,
    description="Black-and-white sketches of the 1000 ImageNet classes.",
    source="Wang et al. 2019, Learning Robust Global Representations by Penalizing Local Predictive Power "
           "(github.com/HaohanWang/ImageNet-Sketch)",
    converter=partial(_convert_folders, dataset="imagenet-sketch", folders=IMAGENET_WNIDS, classes=IMAGENET_WNIDS,
                      expected=50_889, layout="sketch/<wnid>/<image>"),
))
IMAGENET_R = register_dataset(DatasetSpec(
    name="imagenet-r", classnames=tuple(IMAGENET_CLASSNAMES[i] for i in IMAGENET_R_SUBSET), **_IMAGENET,
    class_subset=IMAGENET_R_SUBSET, class_ids=_IMAGENET_R_WNIDS,
    description="Renditions (art, cartoons, sculptures, ...) of 200 ImageNet classes; logits restricted to them.",
    source=_SOURCE_R,
    converter=partial(_convert_folders, dataset="imagenet-r", folders=_IMAGENET_R_WNIDS,
                      classes=_IMAGENET_R_WNIDS, expected=30_000, layout="imagenet-r/<wnid>/<image>"),
))
IMAGENET_A = register_dataset(DatasetSpec(
    name="imagenet-a", classnames=tuple(IMAGENET_CLASSNAMES[i] for i in IMAGENET_A_SUBSET), **_IMAGENET,
    class_subset=IMAGENET_A_SUBSET, class_ids=_IMAGENET_A_WNIDS,
    description="Natural adversarial examples of 200 ImageNet classes; logits restricted to them.",
    source=_SOURCE_A,
    converter=partial(_convert_folders, dataset="imagenet-a", folders=_IMAGENET_A_WNIDS,
                      classes=_IMAGENET_A_WNIDS, expected=7_500, layout="imagenet-a/<wnid>/<image>"),
))
OBJECTNET = register_dataset(DatasetSpec(
    name="objectnet", classnames=tuple(row[1].lower() for row in _OBJECTNET), **_IMAGENET,
    pooling=OBJECTNET_POOLING, border_crop=OBJECTNET_BORDER, class_ids=OBJECTNET_FOLDERS,
    description="ObjectNet's 113 classes that overlap ImageNet (125 ImageNet classes, max-pooled); 2-pixel border cut.",
    source="Barbu et al. 2019, ObjectNet (objectnet.dev); class mapping of wise-ft / imagenet-testbed",
    converter=convert_objectnet,
))

IMAGENET_SUITE = register_suite(Suite(
    name="imagenet",
    reference="imagenet",
    shifts=("imagenetv2-matched-frequency", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a"),
    train=("imagenet", "train"),
    val=("imagenet", "val"),
    baseline="imagenet-testbed",  # robustbench_ft/baselines/imagenet-testbed.json (see robustbench_ft/testbed.py)
    description=(
        "ImageNet and the five natural distribution shifts of the WiSE-FT paper (Table 1). ImageNet-R and -A "
        "restrict logits to their 200 classes and ObjectNet pools them into its 113; their records also hold "
        "ImageNet accuracy on the same classes (top1@<shift>), the x value of their effective robustness."
    ),
))
