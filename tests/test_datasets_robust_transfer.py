"""Oxford-IIIT Pet, FGVC-Aircraft and UC Merced converters on tiny fixtures laid out like the official downloads."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustbench_ft.convert.engine import convert_dataset
from robustbench_ft.convert.sources import ConversionError, ConvertOptions
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.datasets.robust_transfer import ROBUST_TRANSFER, uc_merced_split
from robustbench_ft.loading.shard_dataset import ShardDataset

SUBSET = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False)


def _image(path: Path, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _labels(name: str, src: Path, out: Path, split: str) -> list[int]:
    convert_dataset(get_dataset(name), src, out, split, SUBSET)
    return [label for _, label, *_ in ShardDataset(out)]


def test_class_lists_have_the_official_sizes_and_order():
    pets = load_list("oxford_pets.classes.txt")
    assert len(pets) == 37 and pets[:2] == ("Abyssinian", "american bulldog") and pets[5] == "Bengal"
    aircraft = load_list("fgvc_aircraft.classes.txt")
    assert len(aircraft) == 100 and aircraft[0] == "707-320" and aircraft[-1] == "Yak-42"
    assert len(load_list("uc_merced_folders.txt")) == len(load_list("uc_merced.classes.txt")) == 21
    assert list(load_list("uc_merced_folders.txt")) == sorted(load_list("uc_merced_folders.txt"))
    assert ROBUST_TRANSFER == tuple(s for s in ROBUST_TRANSFER if get_suite(s))


def test_pets_labels_are_class_ids_and_names_are_checked(tmp_path):
    src = tmp_path / "oxford-iiit-pet"
    lines = ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1", "Bengal_3 6 1 6"]
    for i, line in enumerate(lines):
        _image(src / "images" / f"{line.split()[0]}.jpg", i)
    (src / "annotations").mkdir()
    (src / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    assert _labels("oxford-pets", src, tmp_path / "out", "test") == [0, 1, 5]
    (src / "annotations" / "test.txt").write_text("Abyssinian_1 40 1 1\n")
    with pytest.raises(ConversionError, match="CLASS-ID in 1..37"):
        _labels("oxford-pets", src, tmp_path / "bad", "test")


def test_aircraft_labels_follow_variants_txt_and_its_official_val(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = load_list("fgvc_aircraft.classes.txt")
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for i, image in enumerate(("0034309", "1025794")):
        _image(data / "images" / f"{image}.jpg", i)
    (data / "images_variant_val.txt").write_text(f"0034309 {variants[99]}\n1025794 F/A-18\n")
    assert _labels("fgvc-aircraft", data.parent, tmp_path / "out", "val") == [99, variants.index("F/A-18")]
    (data / "images_variant_test.txt").write_text("0034309 Boeing 9000\n")
    with pytest.raises(ConversionError, match="not one of the 100"):
        _labels("fgvc-aircraft", data.parent, tmp_path / "bad", "test")


def test_uc_merced_split_is_heuillets_stratified_68_12_20(tmp_path):
    labels = [c for c in range(21) for _ in range(100)]
    parts = {s: uc_merced_split(labels, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1428, 252, 420]
    assert set().union(*map(set, parts.values())) == set(range(2100))
    assert Counter(labels[i] for i in parts["test"]) == {c: 20 for c in range(21)}
    src = tmp_path / "UCMerced_LandUse"
    folders = load_list("uc_merced_folders.txt")
    for c, folder in enumerate(folders):
        for i in range(5):
            _image(src / "Images" / folder / f"{folder}{i:02d}.tif", 10 * c + i, fmt="TIFF")
    test = _labels("uc-merced", src, tmp_path / "out", "test")
    assert Counter(test) == {c: 1 for c in range(21)}  # 20 % of 5 per class, stratified
    with pytest.raises(ConversionError, match="2100"):
        convert_dataset(get_dataset("uc-merced"), src, tmp_path / "strict", "test",
                        ConvertOptions(workers=1, progress=False))
