"""The WebDataset copies on the Hugging Face hub that ``robustbench-ft shard import-wds`` accepts, and how
their labels and metadata become the harness's.

CLIP_benchmark exported each copy from the raw dataset with its own loader, so a copy's label order
is that loader's (CLIP_benchmark ``clip_benchmark/datasets/builder.py`` and ``objectnet.py`` @ 48de38c):

* ImageNet-1k val, ImageNet-V2 (folder number = ImageNet index), ImageNet-Sketch (wnid folders):
  the 1000 ImageNet classes in sorted-wnid order, named by the OpenAI names (``en_classnames.json``
  ``imagenet1k``, equal to ``open_clip.IMAGENET_CLASSNAMES``, checked) = the harness's order;
* ImageNet-R and ImageNet-A: ``ImageFolder`` labels 0..199 over the *sorted* wnid folders, named by
  the ImageNet names of those wnids; mapped to the harness's lists (``class_lists/imagenet_{r,a}_wnids.txt``);
* ObjectNet: labels over the 113 mapped folders *sorted*, named by their ObjectNet labels in lower
  case; mapped to the harness's folder order (``class_lists/objectnet_to_imagenet.tsv``). The copies
  hold the full images with ObjectNet's 1-pixel red frame (CLIP_benchmark applies no crop), so the
  import cuts the harness's 2-pixel border (``DatasetSpec.border_crop``), as the field does;
* DataComp's WILDS copies (``djghosh/wds_wilds-iwildcam_test``, ``wds_wilds-fmow_test``; datacomp
  ``eval_utils/wilds_eval.py`` @ 4a8df19) hold WILDS' OOD test split (42,791 and 22,108 images,
  DataComp ``tasklist.yml``), labelled by WILDS' ``y``, with each sample's row of WILDS'
  ``metadata_array`` as ``.npy``: iWildCam ``[location, sequence, year, month, day, hour, minute,
  second, y]`` (wilds ``iwildcam_dataset.py``), FMoW ``[region, year, y]`` with ``region`` an index
  into WILDS' region list (the regions in order of first appearance in ``rgb_metadata.csv``) and
  ``year`` = calendar year − 2002 (wilds ``fmow_dataset.py``).

Every copy's mapping is checked against the dataset's class list before anything is read (a
bijection onto its classes, each copy name equal to the harness's name for the class it maps to),
and a copy's ``classnames.txt`` must equal the names its label order implies; the WILDS copies'
names (not published in code) are compared loosely and differences recorded in the manifest.
Counts are the official releases' (the converters' constants).
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from robustbench_ft.convert.engine import convert_items
from robustbench_ft.convert.sources import ConversionError, ConvertOptions, SourceItem, check_count, sanitise
from robustbench_ft.convert.wds_import import (
    CLASSNAMES,
    STAGING,
    WdsSample,
    WdsSource,
    fetch_shards,
    iter_samples,
    read_lines,
    remove_staging,
)
from robustbench_ft.datasets import imagenet, wilds
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.datasets.spec import DatasetSpec
from robustbench_ft.shards import urls
from robustbench_ft.shards.manifest import Manifest

WILDS_YEAR_ORIGIN = 2002  # FMoW's metadata "year" is the calendar year minus 2002 (wilds fmow_dataset.py)
IWILDCAM_FIELDS = ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y")
FMOW_FIELDS = ("region", "year", "y")


@dataclass(frozen=True)
class HubCopy:
    """One accepted copy: which harness dataset (and split) it is, where it lives, its labels and count."""

    dataset: str
    split: str
    repos: tuple[str, ...]
    source_classnames: tuple[str, ...]   # its classnames.txt, in its label order
    to_harness: tuple[int, ...]          # its label -> the dataset's label
    expected: int                        # images in the official release
    label_order: str                     # in words, for the README table
    exact_names: bool = True             # classnames.txt must equal source_classnames (else compared loosely)
    metadata: str | None = None          # "iwildcam" | "fmow": .npy rows become per-sample metadata

    def url(self, repo: str | None = None) -> str:
        return f"https://huggingface.co/datasets/{repo or self.repos[0]}/tree/main"


def _ordered(dataset: str, repos: tuple[str, ...], expected: int, order: str) -> HubCopy:
    """A copy labelled over the *sorted* class ids of ``dataset`` (an ImageFolder of its class folders), named
    as the harness names them; the harness labels them in its own declared order."""
    spec = get_dataset(dataset)
    position = {c: i for i, c in enumerate(spec.shard_classes)}
    ranked = sorted(spec.shard_classes)
    return HubCopy(dataset, "test", repos, tuple(spec.classnames[position[c]] for c in ranked),
                   tuple(position[c] for c in ranked), expected, order)


def _repos(cb: str | None, datacomp: str) -> tuple[str, ...]:
    return ((f"clip-benchmark/wds_{cb}",) if cb else ()) + (f"djghosh/wds_{datacomp}_test",)


_SORTED = "sorted-wnid folder order"
COPIES: dict[tuple[str, str], HubCopy] = {(c.dataset, c.split): c for c in (
    _ordered("imagenet", _repos("imagenet1k", "imagenet1k"), imagenet.VAL_COUNT, _SORTED),
    _ordered("imagenetv2-matched-frequency", _repos("imagenetv2", "imagenetv2"), 10_000,
             "folder number = ImageNet index"),
    _ordered("imagenet-sketch", _repos("imagenet_sketch", "imagenet_sketch"), 50_889, _SORTED),
    _ordered("imagenet-r", _repos("imagenet-r", "imagenet-r"), 30_000, f"0..199 in {_SORTED}"),
    _ordered("imagenet-a", _repos("imagenet-a", "imagenet-a"), 7_500, f"0..199 in {_SORTED}"),
    _ordered("objectnet", _repos("objectnet", "objectnet"), imagenet.OBJECTNET_COUNTS["objectnet-1.0"],
             "0..112 over the sorted ObjectNet folders; 2-px border cut at import"),
    HubCopy("iwildcam-ood", "test", _repos(None, "wilds-iwildcam"), wilds.IWILDCAM_CLASSNAMES,
            tuple(range(len(wilds.IWILDCAM_CLASSNAMES))), wilds.IWILDCAM_COUNTS["test"], "WILDS y",
            exact_names=False, metadata="iwildcam"),
    HubCopy("fmow-ood", "test", _repos(None, "wilds-fmow"), wilds.FMOW_CLASSNAMES,
            tuple(range(len(wilds.FMOW_CLASSNAMES))), wilds.FMOW_COUNTS["test"], "WILDS y",
            exact_names=False, metadata="fmow"),
)}


def get_copy(dataset: str, split: str = "test") -> HubCopy:
    copy = COPIES.get((dataset, split))
    if copy is None:
        accepted = ", ".join(f"{d} ({s})" for d, s in COPIES)
        raise ValueError(f"import-wds: no accepted hub copy of {dataset!r} ({split}); accepted: {accepted} "
                         "(README: 'Hub copies'). A class-folder tree converts with `robustbench-ft shard imagefolder`")
    return copy


def loose(name: str) -> str:
    """A class name compared loosely: lower case, ``_`` and ``-`` as spaces, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_-]", " ", name.lower())).strip()


def check_copy(copy: HubCopy, spec: DatasetSpec) -> None:
    """The copy's label mapping against the dataset's class list: a bijection onto its classes, and every
    copy class named as the harness names the class it maps to. Raises ValueError naming the first fault."""
    n = len(spec.shard_classes)
    if sorted(copy.to_harness) != list(range(n)) or len(copy.source_classnames) != n:
        raise ValueError(f"hub copy of {spec.name}: its mapping covers {len(copy.to_harness)} labels, "
                         f"{len(set(copy.to_harness))} distinct, but the dataset has {n} classes")
    for i, target in enumerate(copy.to_harness):
        if loose(copy.source_classnames[i]) != loose(spec.classnames[target]):
            raise ValueError(f"hub copy of {spec.name}: its label {i} ({copy.source_classnames[i]!r}) maps to class "
                             f"{target} ({spec.classnames[target]!r}) of the harness")


def check_names(copy: HubCopy, found: list[str], where: str) -> dict:
    """The copy's ``classnames.txt`` against the names its label order implies (see the module docstring).

    Returns what the manifest records; raises ConversionError where the labels cannot be trusted."""
    expected = copy.source_classnames
    if len(found) != len(expected):
        raise ConversionError(f"import-wds: {where} names {len(found)} classes, a copy of {copy.dataset} has "
                              f"{len(expected)}: is it a copy of another dataset?")
    test = (lambda a, b: a == b) if copy.exact_names else (lambda a, b: loose(a) == loose(b))
    differ = [i for i, (a, b) in enumerate(zip(found, expected)) if not test(a, b)]
    if differ and copy.exact_names:
        i = differ[0]
        raise ConversionError(
            f"import-wds: line {i + 1} of {where} is {found[i][:60]!r}, but a copy of {copy.dataset} labelled in "
            f"{copy.label_order} has {expected[i][:60]!r} there ({len(differ)} line(s) differ): its labels are in "
            "another order, which the import cannot map safely")
    return {"classnames_differ": [{"label": i, "copy": found[i][:80], "harness": expected[i]} for i in differ[:20]],
            "num_classnames_differ": len(differ)} if differ else {}


def fmow_region_names(region_names: Sequence[str] | None, wilds_metadata: str | os.PathLike | None) -> tuple[str, ...]:
    """WILDS' FMoW region list (index -> name), given or rebuilt as WILDS builds it from ``fmow_v1.1``'s
    ``rgb_metadata.csv`` and ``country_code_mapping.csv``: each row's region (``Other`` for a code the
    mapping lacks), in order of first appearance."""
    if region_names:
        return tuple(region_names)
    if wilds_metadata is None:
        raise ConversionError(
            "import-wds fmow-ood: DataComp's copy stores each image's region as an index into WILDS' region list, "
            "whose order is that of first appearance in WILDS' rgb_metadata.csv; give --fmow-metadata DIR (the "
            "fmow_v1.1 folder with rgb_metadata.csv and country_code_mapping.csv; no images needed) or "
            "--region-names NAME,NAME,... in that order")
    root = Path(wilds_metadata)
    regions = {r["alpha-3"]: r["region"] for r in _csv(root / "country_code_mapping.csv", ("alpha-3", "region"))}
    order: dict[str, None] = {}
    for row in _csv(root / "rgb_metadata.csv", ("country_code",)):
        order.setdefault(regions.get(row["country_code"], wilds.OTHER_REGION), None)
    return tuple(order)


def _csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConversionError(f"import-wds fmow-ood: {path} does not exist (--fmow-metadata names the fmow_v1.1 "
                              "folder)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ConversionError(f"import-wds fmow-ood: {path} lacks the column(s) {', '.join(missing)}")
        return list(reader)


def _row(sample: WdsSample, fields: tuple[str, ...], copy: HubCopy) -> dict[str, int]:
    row = sample.npy
    if row is None or row.ndim != 1 or len(row) != len(fields) or row.dtype.kind not in "iu":
        shape = None if row is None else (row.shape, str(row.dtype))
        raise ConversionError(f"import-wds: {sample.source}: a copy of {copy.dataset} carries a .npy row of "
                              f"{len(fields)} integers ({', '.join(fields)}); found {shape}")
    values = dict(zip(fields, (int(v) for v in row)))
    if values["y"] != sample.label:
        raise ConversionError(f"import-wds: {sample.source}: its .cls label {sample.label} differs from the y "
                              f"{values['y']} of its .npy metadata row")
    return values


def metadata_of(copy: HubCopy, regions: tuple[str, ...] | None) -> Callable[[WdsSample], dict | None]:
    """What each sample's ``.npy`` row becomes: the per-sample metadata the dataset's local converter
    stores (location / sequence / datetime for iWildCam; region name and year for FMoW)."""
    if copy.metadata == "iwildcam":
        def iwildcam(sample: WdsSample) -> dict:
            v = _row(sample, IWILDCAM_FIELDS, copy)
            stamp = (f"{v['year']:04d}-{v['month']:02d}-{v['day']:02d} "
                     f"{v['hour']:02d}:{v['minute']:02d}:{v['second']:02d}")
            return {"location": v["location"], "sequence": v["sequence"], "datetime": stamp, "wilds_split": "test"}
        return iwildcam
    if copy.metadata == "fmow":
        def fmow(sample: WdsSample) -> dict:
            v = _row(sample, FMOW_FIELDS, copy)
            if not 0 <= v["region"] < len(regions or ()):
                raise ConversionError(f"import-wds: {sample.source} has region index {v['region']}, but the region "
                                      f"list has {len(regions or ())} names ({', '.join(regions or ())})")
            return {"region": regions[v["region"]], "year": WILDS_YEAR_ORIGIN + v["year"] if v["year"] >= 0 else None,
                    "wilds_split": "test"}
        return fmow
    return lambda sample: None


def import_hub_copy(src: str | os.PathLike, out: str | os.PathLike, dataset: str, split: str = "test",
                    options: ConvertOptions | None = None, *, region_names: Sequence[str] | None = None,
                    fmow_metadata: str | os.PathLike | None = None, keep_source: bool = False,
                    log: Callable[[str], None] = print) -> Manifest:
    """What ``robustbench-ft shard import-wds SRC --dataset NAME`` does (see the module docstring)."""
    copy, spec = get_copy(dataset, split), get_dataset(dataset)
    check_copy(copy, spec)
    options = options or ConvertOptions()
    if options.border_crop is None:
        options = replace(options, border_crop=spec.border_crop)
    if options.border_crop and options.image_format == "keep":
        options = replace(options, image_format="png")  # a cropped image is re-encoded: losslessly
    source = WdsSource.parse(src)
    where = urls.describe(source.file(CLASSNAMES))
    names = check_names(copy, read_lines(source, CLASSNAMES) or [], where)
    regions = fmow_region_names(region_names, fmow_metadata) if copy.metadata == "fmow" else None
    out = Path(out)
    staging = out / STAGING
    shards = fetch_shards(source, split, staging, log)
    meta = metadata_of(copy, regions)
    items = []
    for shard in shards:
        for sample in iter_samples(shard):
            if not 0 <= sample.label < len(copy.to_harness):
                raise ConversionError(f"import-wds: {sample.source} has label {sample.label}, outside the "
                                      f"{len(copy.to_harness)} classes of {dataset}")
            items.append(SourceItem(f"{sanitise(dataset)}-{sanitise(sample.key)}", copy.to_harness[sample.label],
                                    sample.source, sample.path, meta=meta(sample), span=sample.span))
    checked = check_count(dataset, split, len(items), copy.expected, options, urls.describe(source.root))
    provenance = {**source.provenance(), "layout": "CLIP_benchmark webdataset", "label_order": copy.label_order,
                  "source_shards": [{"name": s.name, "size": s.size, "sha256": s.sha256} for s in shards], **names}
    if regions is not None:
        provenance["region_names"] = list(regions)
    manifest = convert_items(items, out, name=f"{dataset}-{split}", classes=spec.shard_classes, options=options,
                             metadata={"dataset": dataset, "split": split, **checked, "imported_from": provenance})
    if not keep_source:
        remove_staging(staging)
    return manifest
