"""FLYP's binary few-shot tasks as suites of their own: ``pcam`` (PatchCamelyon) and ``rendered-sst2``.

Goyal et al., "Finetune like you pretrain", CVPR 2023, evaluate few-shot binary classification on both
(locuslab/FLYP @ 215d5bb, README "Few shot on SST2 / PatchCamelyon", ``src/few_shot.py``). Each suite's
reference is the dataset's official test split, with no shifts; train and val are the official train and
validation splits (both ship one). Run the few-shot protocol with ``run --shots K --seeds ...``
(:mod:`robustbench_ft.datasets.fewshot`).

* **PatchCamelyon** (Veeling et al., "Rotation Equivariant CNNs for Digital Pathology", arXiv 1806.03962;
  github.com/basveeling/pcam @ 521af5f README): 96x96 RGB patches, label 1 = metastatic tissue in the
  centre 32x32 region; train 262,144, valid 32,768, test 32,768; each split balanced 50/50. The download is
  gzipped HDF5: ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5.gz``; gunzip them (HDF5 cannot be
  read compressed). Keys ``x`` (``[N, 96, 96, 3]`` uint8) and ``y`` (``[N, 1, 1, 1]``), as torchvision 0.29.1
  ``datasets/pcam.py`` reads them. Needs the ``h5py`` package (``pip install h5py``). The README and
  torchvision disagree on which MD5 is valid's and which test's, so no MD5 is checked; the counts are.
* **Rendered SST2** (openai/CLIP ``data/rendered-sst2.md``; archive ``rendered-sst2.tgz``): SST-2 sentences
  rendered as images; ``rendered-sst2/{train,valid,test}/{negative,positive}/*.png``; train 6,920, valid 872,
  test 1,821 (torchvision 0.29.1 ``datasets/rendered_sst2.py``).

Class names and templates: CLIP's (``data/prompts.md`` @ d05afc4, ``## PatchCamelyon`` and ``## SST2``), the
same as FLYP's ``src/templates/{patchcamelyon,sst2}_template.py``.

Suite defaults for ``flyp``: the few-shot commands of FLYP's README (PCam: 20 epochs, lr 1e-6, wd 0.0,
batch 256, warmup 0; SST2: 20 epochs, lr 1e-5, wd 0.2, batch 256, warmup 0). With ``--shots K`` the 2K shots
are then one full batch (one step per epoch), as in FLYP. They apply to full-data runs too: no other recipe for
these sets was found.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import ConversionError, ConvertOptions, check_count, class_folder_items
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.shards.manifest import Manifest
from robustbench_ft.shards.writer import ShardWriter

PCAM_COUNTS = {"train": 262_144, "val": 32_768, "test": 32_768}  # basveeling/pcam README
SST2_COUNTS = {"train": 6_920, "val": 872, "test": 1_821}      # torchvision rendered_sst2.py
OFFICIAL_SPLIT = {"train": "train", "val": "valid", "test": "test"}  # both releases call val "valid"
PCAM_CHUNK = 1024  # HDF5 rows read at a time: the train split (7 GB of pixels) never sits in memory whole
FLYP_FEW_SHOT = "FLYP README, 'Few shot on SST2 / PatchCamelyon' (locuslab/FLYP @ 215d5bb)"


def pcam_files(split: str) -> tuple[str, str]:
    stem = f"camelyonpatch_level_2_split_{OFFICIAL_SPLIT[split]}"
    return f"{stem}_x.h5", f"{stem}_y.h5"


def _h5py():
    try:
        import h5py
    except ModuleNotFoundError:
        raise ConversionError("pcam: reading the official HDF5 files needs the h5py package, which is not installed; "
                              "install it with: pip install h5py") from None
    return h5py


def convert_pcam(src: Path, out: Path, split: str, options: ConvertOptions) -> Manifest:
    """One split of PatchCamelyon from the (gunzipped) official HDF5 files, written chunk by chunk."""
    names = pcam_files(split)
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        gz = [n for n in missing if (src / f"{n}.gz").is_file()]
        hint = f" (found {', '.join(n + '.gz' for n in gz)}: gunzip them first)" if gz else ""
        raise ConversionError(f"pcam: {src} lacks {', '.join(missing)}{hint}; expected the official "
                              "camelyonpatch_level_2_split_<train|valid|test>_<x|y>.h5 files")
    h5py = _h5py()
    with h5py.File(src / names[0], "r") as fx, h5py.File(src / names[1], "r") as fy:
        if "x" not in fx or "y" not in fy:
            raise ConversionError(f"pcam: {src / names[0]} / {names[1]} lack the datasets 'x' / 'y'")
        x, y = fx["x"], fy["y"]
        if x.ndim != 4 or x.shape[1:] != (96, 96, 3) or len(y) != len(x):
            raise ConversionError(f"pcam: {names[0]} holds shape {x.shape} and {names[1]} {len(y)} labels; expected "
                                  "[N, 96, 96, 3] images and N labels")
        checked = check_count("pcam", split, len(x), PCAM_COUNTS[split], options, src)
        fmt = "png" if options.image_format == "keep" else options.image_format
        with ShardWriter(out, f"pcam-{split}", load_list("pcam.classes.txt"), options.samples_per_shard, fmt,
                         options.quality, options.resize_shorter,
                         {"dataset": "pcam", "split": split, "official_split": OFFICIAL_SPLIT[split],
                          **checked}) as writer:
            from PIL import Image

            for start in range(0, len(x), PCAM_CHUNK):
                pixels = np.asarray(x[start:start + PCAM_CHUNK], dtype=np.uint8)
                labels = np.asarray(y[start:start + PCAM_CHUNK]).reshape(len(pixels), -1)[:, 0]
                for i, (image, label) in enumerate(zip(pixels, labels)):
                    if int(label) not in (0, 1):
                        raise ConversionError(f"pcam: {names[1]}[{start + i}] is {label}, not 0 or 1")
                    writer.write(f"pcam-{split}-{start + i:06d}", Image.fromarray(image), int(label),
                                 {"path": f"{names[0]}[{start + i}]"})
    assert writer.manifest is not None
    return writer.manifest


def convert_rendered_sst2(src: Path, out: Path, split: str, options: ConvertOptions) -> Manifest:
    """One split of Rendered SST2 from the extracted archive (``rendered-sst2/<split>/<class>/*.png``)."""
    classes = load_list("rendered_sst2.classes.txt")
    folder = src / OFFICIAL_SPLIT[split]
    items = class_folder_items(folder, {c: i for i, c in enumerate(classes)}, dataset="rendered-sst2",
                               layout="rendered-sst2/<train|valid|test>/<negative|positive>/<image>.png",
                               allow_missing=options.allow_count_mismatch)
    checked = check_count("rendered-sst2", split, len(items), SST2_COUNTS[split], options, folder)
    return convert_items(items, out, name=f"rendered-sst2-{split}", classes=classes, options=options,
                         metadata={"dataset": "rendered-sst2", "split": split, "official_split": OFFICIAL_SPLIT[split],
                                   **checked})


def _register(name: str, files: str, converter, description: str, source: str, flyp: dict) -> None:
    register_dataset(DatasetSpec(
        name=name, classnames=load_list(f"{files}.classes.txt"), templates=load_list(f"{files}.templates.txt"),
        splits=("train", "val", "test"), description=description, source=source, converter=converter))
    register_suite(Suite(
        name=name, reference=name, shifts=(), train=(name, "train"), val=(name, "val"),
        description=f"{description} Official splits; FLYP's few-shot task with --shots K.",
        method_defaults={"flyp": {"epochs": 20.0, "batch_size": 256, "warmup_steps": 0, **flyp}},
        defaults_source=FLYP_FEW_SHOT))


_register("pcam", "pcam", convert_pcam, "PatchCamelyon: 96x96 histopathology patches, metastatic tissue or not.",
          "Veeling et al. 2018, arXiv 1806.03962 (github.com/basveeling/pcam)", {"lr": 1e-6, "weight_decay": 0.0})
_register("rendered-sst2", "rendered_sst2", partial(convert_rendered_sst2),
          "Rendered SST2: SST-2 movie-review sentences rendered as images, negative or positive.",
          "Radford et al. 2021, CLIP (github.com/openai/CLIP data/rendered-sst2.md)",
          {"lr": 1e-5, "weight_decay": 0.2})
