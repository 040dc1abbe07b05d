"""DomainNet (Peng, Bai, Xia, Huang, Saenko & Wang, Moment Matching for Multi-Source Domain Adaptation, ICCV 2019) as
the projection-family papers evaluate it: fine-tune on Real, test on Real and on Sketch, Painting,
Infograph and Clipart (TPGM and FTP, ``DomainNet_ResNet_Exp`` and GT-RIPL/FTP; Quickdraw is not
tested there, and is not here).

**Splits: the original (uncleaned) ones, as FTP and TPGM use them** (``projection.md`` §5.2: every cleaned
test file is a strict subset of theirs, and 110,307 + 12,256 + 52,764 = 175,327 = the original Real count):

| dataset | split | split file | images |
|---|---|---|---|
| ``domainnet-real`` | train | ``real_train_split.txt`` (= ``real_train_100_percent_split.txt``) of GT-RIPL/FTP | 110,307 |
| ``domainnet-real`` | val | ``real_val_split.txt`` (= ``real_val_100_percent_split.txt``) of GT-RIPL/FTP | 12,256 |
| ``domainnet-real`` | test | ``real_test.txt`` (original, ``…/multi-source/txt/``) | 52,764 |
| ``domainnet-sketch`` | test | ``sketch_test.txt`` (original) | 21,271 |
| ``domainnet-painting`` | test | ``painting_test.txt`` (original, ``…/groundtruth/txt/``) | 22,892 |
| ``domainnet-infograph`` | test | ``infograph_test.txt`` (original) | 16,114 |
| ``domainnet-clipart`` | test | ``clipart_test.txt`` (original, ``…/groundtruth/txt/``) | 14,814 |

The val split is the one FTP and TPGM select their epochs on (and TPGM trains its radii on): a
disjoint 10 % of the original ``real_train.txt``, whose file is public in GT-RIPL/FTP
``datasets/domainnet/`` @ 1f8dd44. Without those two files the converter falls back to the official
``real_train.txt`` (122,563 images) and holds out 10 % of it by a hash of each image's path
(:func:`~robustbench_ft.convert.sources.holdout_split`, the transfer suites' rule): **not** FTP's
val images, and the manifest says which was used (``val_source``). A cleaned split file (the M3SDA
page's recommended download) is refused by its line count, naming the original one, unless
``--allow-count-mismatch``.

The download: the six image zips of ai.bu.edu/M3SDA extracted side by side
(``SRC/<domain>/<class>/<domain>_<NNN>_<NNNNNN>.jpg``) with the split files in ``SRC`` (or ``SRC/txt``).
Each split-file line is ``<domain>/<class>/<file> <label>``; the label must be the class's index in
``class_lists/domainnet_folders.txt`` (345 classes in the files' own label order, which Python's
``sorted()`` does not reproduce).

Prompts: no reference does CLIP zero-shot classification on DomainNet (FTP and TPGM train a random
linear head on ResNet-50 features; projection.md §5.4). Class names are the folder names with ``_``
replaced by spaces, hyphens and capitals kept (``teddy-bear``, ``The Eiffel Tower``), the rule of the
DiGraP authors' evaluation code (chengyuehuang511/vlm_robustness ``metrics/clip_match.py``
``default_preprocess_class_name`` @ 1f545f4). Templates: CLIP's 80 ImageNet templates (none for
DomainNet was found; the same code defaults to them).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import (
    ConversionError,
    ConvertOptions,
    SourceItem,
    check_count,
    holdout_split,
    read_lines,
    sanitise,
    shuffled,
)
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.imagenet import IMAGENET_TEMPLATES
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards.manifest import Manifest

FOLDERS: tuple[str, ...] = load_list("domainnet_folders.txt")
CLASSNAMES: tuple[str, ...] = tuple(f.replace("_", " ") for f in FOLDERS)
SHIFT_DOMAINS = ("sketch", "painting", "infograph", "clipart")
# original (FTP/TPGM) and cleaned line counts of the split files (projection.md §5.2; cleaned real/quickdraw
# train derived there, the others counted)
ORIGINAL = {"real_test": 52_764, "sketch_test": 21_271, "painting_test": 22_892, "infograph_test": 16_114,
            "clipart_test": 14_814, "real_train_split": 110_307, "real_val_split": 12_256, "real_train": 122_563}
CLEANED = {"real_test": 52_041, "sketch_test": 20_916, "painting_test": 21_850, "infograph_test": 15_582,
           "clipart_test": 14_604, "real_train": 120_906}
FTP_SPLIT_FILES = {"train": ("real_train_split.txt", "real_train_100_percent_split.txt"),
                   "val": ("real_val_split.txt", "real_val_100_percent_split.txt")}
VAL_FRACTION = 0.1  # FTP's val split is 12,256 / 122,563 = 10 % of the original real_train.txt
_LAYOUT = ("the DomainNet image zips extracted into SRC (SRC/<domain>/<class>/<image>) and the original split files "
           "(<domain>_test.txt; real_train_split.txt and real_val_split.txt from GT-RIPL/FTP datasets/domainnet/) in "
           "SRC or SRC/txt")


def _find(src: Path, names: tuple[str, ...]) -> Path | None:
    for place in (src, src / "txt"):
        for name in names:
            if (place / name).is_file():
                return place / name
    return None


def split_items(src: Path, split_file: Path, domain: str, options: ConvertOptions) -> tuple[list[SourceItem], int]:
    """One item per line ``<domain>/<class>/<file> <label>`` of ``split_file``, images under ``src``, and how
    many listed images are missing (an error unless ``allow_count_mismatch``)."""
    index = {folder: i for i, folder in enumerate(FOLDERS)}
    items, missing = [], []
    for n, line in enumerate(read_lines(split_file), start=1):
        parts = line.split(" ")
        path = parts[0]
        folders = path.split("/")
        if len(parts) != 2 or not parts[1].isdigit() or len(folders) != 3 or folders[0] != domain:
            raise ConversionError(f"{split_file}:{n}: expected '{domain}/<class>/<file> <label>', got {line[:120]!r}")
        if index.get(folders[1]) != int(parts[1]):
            raise ConversionError(f"{split_file}:{n}: class {folders[1]!r} has label {parts[1]}, but DomainNet's "
                                  f"class {index.get(folders[1], 'list has no such class')}: not a DomainNet split file")
        image = src / path
        if not image.is_file():
            missing.append(path)
            continue
        key = "domainnet-" + "-".join(sanitise(p) for p in path.rsplit(".", 1)[0].split("/"))
        items.append(SourceItem(key, int(parts[1]), path, str(image.resolve())))
    if missing and not options.allow_count_mismatch:
        raise ConversionError(f"domainnet-{domain}: {len(missing)} images listed in {split_file.name} are missing under "
                              f"{src} (e.g. {missing[0]}); extract {domain}.zip into {src}, or pass "
                              "--allow-count-mismatch to convert the images present")
    return items, len(missing)


def _check_version(name: str, found: int, split_file: Path, options: ConvertOptions) -> dict:
    if found == CLEANED.get(name) and not options.allow_count_mismatch:
        raise ConversionError(f"{split_file} has {found} lines: it is the cleaned split file. The references (FTP, "
                              "TPGM) use the original ones (…/visda/2019/multi-source/txt/, groundtruth/txt/ for "
                              "clipart and painting on the M3SDA page); use those, or pass --allow-count-mismatch to "
                              "convert the cleaned version on purpose")
    return check_count(f"domainnet ({split_file.name})", name, found, ORIGINAL[name], options, split_file)


def convert_domainnet(src: Path, out: Path, split: str, options: ConvertOptions, *, domain: str) -> Manifest:
    """One split of one domain: FTP's Real train/val split files, or a held-out tenth of ``real_train.txt``."""
    metadata: dict = {"dataset": f"domainnet-{domain}", "split": split, "split_version": "original"}
    if split == "test":
        names = (f"{domain}_test.txt",)
    else:
        names = FTP_SPLIT_FILES[split] if _find(src, FTP_SPLIT_FILES[split]) else ("real_train.txt",)
    split_file = _find(src, names)
    if split_file is None:
        raise ConversionError(f"domainnet-{domain} ({split}): no {' or '.join(names)} in {src} or {src / 'txt'}; "
                              f"expected {_LAYOUT}")
    name = split_file.stem.replace("_100_percent", "")
    lines = len(read_lines(split_file))
    metadata.update(_check_version(name, lines, split_file, options), split_file=split_file.name)
    items, missing = split_items(src, split_file, domain, options)
    metadata["missing_images"] = missing
    if name == "real_train":  # no FTP split file: hold out a tenth by key hash
        items = holdout_split(items, VAL_FRACTION, split)
        metadata["val_source"] = f"holdout of real_train.txt ({VAL_FRACTION:.0%} by key hash; not FTP's val images)"
    elif split != "test":
        metadata["val_source"] = "real_val_split.txt of GT-RIPL/FTP (the FTP/TPGM val split)"
    if split == "train":
        items = shuffled(items)
    return convert_items(items, out, name=f"domainnet-{domain}-{split}", classes=FOLDERS, options=options,
                         metadata=metadata)


def _register(domain: str, splits: tuple[str, ...], description: str) -> DatasetSpec:
    return register_dataset(DatasetSpec(
        name=f"domainnet-{domain}", classnames=CLASSNAMES, templates=IMAGENET_TEMPLATES, splits=splits,
        class_ids=FOLDERS, description=description,
        source="DomainNet (Peng et al., ICCV 2019; ai.bu.edu/M3SDA), original split files as GT-RIPL/FTP ships them",
        converter=partial(convert_domainnet, domain=domain)))


_register("real", ("train", "val", "test"), "DomainNet Real: photos of 345 object classes (the reference).")
for _domain, _what in (("sketch", "sketches"), ("painting", "paintings"), ("infograph", "infographics"),
                       ("clipart", "clip art")):
    _register(_domain, ("test",), f"DomainNet {_domain.capitalize()}: {_what} of the 345 classes.")

# The FTP/TPGM DomainNet recipes (GT-RIPL/FTP and PotatoTian/TPGM DomainNet_ResNet_Exp README commands, CLIP-RN50,
# 100 % data): 50 epochs, batch 64 x 4 GPUs = 256, cosine decay stepped per epoch (per step here), no warmup. What
# maps onto the harness: epochs, batch and warmup for every fine-tuning method; FTP's AdamP lr 1e-4 and weight
# decay 0; TPGM's per-step mode (proj_freq 1, max_iters 1, MARS norms, proj_lr 1e-2). What does not: their FT and
# TPGM runs use SGD (Nesterov, momentum 0.9, wd 5e-4; lr 1e-3 FT, 1e-2 TPGM), whose rates do not transfer to
# AdamW, so finetune, l2-sp and TPGM's base keep the WiSE-FT AdamW rate; their head is random (excluded from the
# projection), here it is the zero-shot head (projected by TPGM and SPD, excluded by FTP's default as in its code).
_SCHEDULE = {"epochs": 50.0, "batch_size": 256, "warmup_steps": 0}
DOMAINNET = register_suite(Suite(
    name="domainnet", reference="domainnet-real", shifts=tuple(f"domainnet-{d}" for d in SHIFT_DOMAINS),
    train=("domainnet-real", "train"), val=("domainnet-real", "val"), baseline=None,
    description="DomainNet: fine-tune on Real (original FTP/TPGM splits); shifts Sketch, Painting, Infograph, Clipart.",
    method_defaults={
        **{m: dict(_SCHEDULE) for m in ("finetune", "l2-sp", "lp-ft", "flyp", "spd", "digrap")},
        "ftp": {**_SCHEDULE, "lr": 1e-4, "weight_decay": 0.0},
        "tpgm": {"mode": "per-step"},
    },
))
