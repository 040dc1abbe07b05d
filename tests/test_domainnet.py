"""The DomainNet suite: class list and prompts, and the converter on a tiny download laid out like the official one
(image folders ``<domain>/<class>/<domain>_<NNN>_<NNNNNN>.jpg`` and split files ``<domain>/<class>/<file> <label>``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustbench_ft.convert.engine import convert_dataset
from robustbench_ft.convert.sources import ConversionError, ConvertOptions
from robustbench_ft.datasets import domainnet
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.loading.shard_dataset import ShardDataset

SUBSET = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False)
CLASSES = ("aircraft_carrier", "The_Eiffel_Tower", "t-shirt", "zigzag")  # labels 0, 308, 327, 344


def _download(root: Path, ftp_splits: bool = True, txt: str = "txt", per_class: int = 4) -> Path:
    """Four classes, five domains, ``per_class`` images per class and domain (one of Real's for its test list);
    Real's train list split 2:1 as FTP's files split it."""
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for domain in ("real", *domainnet.SHIFT_DOMAINS):
        for folder in CLASSES:
            label = domainnet.FOLDERS.index(folder)
            for i in range(per_class):
                rel = f"{domain}/{folder}/{domain}_{label + 1:03d}_{i:06d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / rel)
                which = "test" if domain != "real" or i == per_class - 1 else "train"
                lines.setdefault(f"{domain}_{which}", []).append(f"{rel} {label}")
    (root / txt).mkdir(parents=True, exist_ok=True)
    for name, rows in lines.items():
        if name != "real_train":
            (root / txt / f"{name}.txt").write_text("\n".join(rows) + "\n")
    train = lines["real_train"]
    if ftp_splits:
        (root / txt / "real_train_split.txt").write_text("\n".join(r for r in train if not r.split(" ")[0].endswith("2.jpg")))
        (root / txt / "real_val_100_percent_split.txt").write_text("\n".join(r for r in train if r.split(" ")[0].endswith("2.jpg")))
    else:
        (root / txt / "real_train.txt").write_text("\n".join(train) + "\n")
    return root


def _labels(directory: Path) -> list[tuple[int, str]]:
    return [(label, meta["path"]) for _, label, _, meta in ShardDataset(directory, with_meta=True)]


def test_class_list_prompts_and_suite_follow_the_split_files_and_references():
    assert len(domainnet.FOLDERS) == 345 and domainnet.FOLDERS[0] == "aircraft_carrier"
    assert domainnet.FOLDERS[308:311] == ("The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa")
    assert domainnet.FOLDERS[327] == "t-shirt" and domainnet.FOLDERS[66:68] == ("cello", "cell_phone")
    assert domainnet.FOLDERS != tuple(sorted(domainnet.FOLDERS))  # the files' order, not Python's
    real = get_dataset("domainnet-real")
    assert real.classnames[308] == "The Eiffel Tower" and real.classnames[303] == "teddy-bear"
    assert real.shard_classes == domainnet.FOLDERS and len(real.templates) == 80 and real.splits == ("train", "val", "test")
    suite = get_suite("domainnet")
    assert suite.reference == "domainnet-real" and suite.val == ("domainnet-real", "val")
    assert suite.shifts == ("domainnet-sketch", "domainnet-painting", "domainnet-infograph", "domainnet-clipart")
    assert suite.method_defaults["ftp"]["lr"] == 1e-4 and suite.method_defaults["tpgm"] == {"mode": "per-step"}
    assert sum(domainnet.ORIGINAL[k] for k in ("real_train_split", "real_val_split", "real_test")) == 175_327


def test_real_splits_come_from_ftps_split_files_and_labels_from_the_lines(tmp_path):
    src = _download(tmp_path / "raw")
    out = {s: tmp_path / "shards" / s for s in ("train", "val", "test")}
    manifests = {s: convert_dataset(get_dataset("domainnet-real"), src, out[s], s, SUBSET) for s in out}
    assert [manifests[s].num_samples for s in ("train", "val", "test")] == [8, 4, 4]
    assert manifests["val"].metadata["val_source"].startswith("real_val_split.txt of GT-RIPL/FTP")
    assert manifests["val"].metadata["split_file"] == "real_val_100_percent_split.txt"
    assert list(manifests["train"].classes) == list(domainnet.FOLDERS)
    seen = {s: _labels(out[s]) for s in out}
    for label, path in seen["train"] + seen["val"] + seen["test"]:
        assert domainnet.FOLDERS[label] == path.split("/")[1]
    assert not {p for _, p in seen["train"]} & {p for _, p in seen["val"]}
    sketch = convert_dataset(get_dataset("domainnet-sketch"), src, tmp_path / "sketch", "test", SUBSET)
    assert sketch.num_samples == 16 and sketch.metadata["expected_count"] == 21_271


def test_without_ftps_files_a_tenth_of_real_train_is_held_out(tmp_path):
    src = _download(tmp_path / "raw", ftp_splits=False, txt=".", per_class=16)
    parts = {s: convert_dataset(get_dataset("domainnet-real"), src, tmp_path / s, s, SUBSET) for s in ("train", "val")}
    assert "holdout of real_train.txt" in parts["val"].metadata["val_source"]
    paths = {s: {p for _, p in _labels(tmp_path / s)} for s in parts}
    assert len(paths["train"] | paths["val"]) == 60 and not paths["train"] & paths["val"] and paths["val"]
    assert parts["train"].metadata["expected_count"] == 122_563


def test_cleaned_files_wrong_labels_and_missing_images_are_refused_with_the_fix(tmp_path, monkeypatch):
    src = _download(tmp_path / "raw")
    spec = get_dataset("domainnet-clipart")
    cleaned = tmp_path / "cleaned"
    (cleaned / "txt").mkdir(parents=True)
    (cleaned / "txt" / "clipart_test.txt").write_text("clipart/zigzag/x.jpg 344\n" * domainnet.CLEANED["clipart_test"])
    with pytest.raises(ConversionError, match="it is the cleaned split file.*original ones"):
        convert_dataset(spec, cleaned, tmp_path / "out", "test", ConvertOptions(workers=1, progress=False))
    with pytest.raises(ConversionError, match="found 16 images .* the official release has 14814"):
        convert_dataset(spec, src, tmp_path / "out", "test", ConvertOptions(workers=1, progress=False))
    bad = src / "txt" / "clipart_test.txt"
    bad.write_text(bad.read_text().replace("zigzag/clipart_345_000000.jpg 344", "zigzag/clipart_345_000000.jpg 3"))
    with pytest.raises(ConversionError, match=r"clipart_test.txt:\d+: class 'zigzag' has label 3, but DomainNet's class 344"):
        convert_dataset(spec, src, tmp_path / "out", "test", SUBSET)
    (src / "painting" / "zigzag" / "painting_345_000001.jpg").unlink()
    monkeypatch.setitem(domainnet.ORIGINAL, "painting_test", 16)  # the fixture's file has the official count
    with pytest.raises(ConversionError, match="1 images listed in painting_test.txt are missing .*extract painting.zip"):
        convert_dataset(get_dataset("domainnet-painting"), src, tmp_path / "out", "test",
                        ConvertOptions(workers=1, progress=False))
    subset = convert_dataset(get_dataset("domainnet-painting"), src, tmp_path / "painting", "test", SUBSET)
    assert subset.num_samples == 15 and subset.metadata["missing_images"] == 1
    (src / "txt" / "infograph_test.txt").unlink()
    with pytest.raises(ConversionError, match="no infograph_test.txt in"):
        convert_dataset(get_dataset("domainnet-infograph"), src, tmp_path / "out", "test", SUBSET)
    assert not (tmp_path / "out").exists()  # nothing converted
