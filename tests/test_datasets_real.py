"""Converters of the real dataset suites, on tiny fixtures laid out like each official download.

Every fixture is made in tmp_path with a few small images per class; the converters run with
``allow_count_mismatch`` where a fixture is smaller than the official release (the count check
itself is tested separately). End-to-end runs use a tiny random CLIP.
"""
from __future__ import annotations

import csv
import io
import pickle
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from robustbench_ft import RunConfig, run
from robustbench_ft.cli import main
from robustbench_ft.convert.engine import convert_dataset
from robustbench_ft.convert.sources import ConversionError, ConvertOptions
from robustbench_ft.datasets import imagenet, transfer, wilds
from robustbench_ft.datasets.class_lists import load_list
from robustbench_ft.datasets.registry import get_dataset, get_suite, register_dataset, register_suite
from robustbench_ft.datasets.spec import DatasetSpec, Suite
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.shards.verify import verify_shards

SUBSET = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False)
TINY = dict(model="rbft-tiny-vit", pretrained="random", method="zeroshot", report=False)


def _image(path: Path, seed: int, size=(12, 10), fmt: str | None = None, border: bool = False) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if border:
        arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _folders(root: Path, folders, per_class: int = 2, ext: str = "jpg", **kw) -> None:
    for c, folder in enumerate(folders):
        for i in range(per_class):
            _image(root / folder / f"img_{i}.{ext}", 100 * c + i, **kw)


def _convert(name: str, src: Path, out: Path, split: str = "test", options: ConvertOptions = SUBSET) -> Manifest:
    manifest = convert_dataset(get_dataset(name), src, out, split, options)
    verify_shards(out)
    return manifest


def _read(directory: Path) -> list[tuple]:
    return [(label, meta, image.size) for image, label, _, meta in ShardDataset(directory, with_meta=True)]


# --------------------------------------------------------------------------- ImageNet and its shifts


def test_class_lists_match_their_sources():
    assert len(imagenet.IMAGENET_WNIDS) == 1000 and list(imagenet.IMAGENET_WNIDS) == sorted(imagenet.IMAGENET_WNIDS)
    assert len(imagenet.IMAGENET_TEMPLATES) == 80 and imagenet.IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert imagenet.IMAGENET_R_SUBSET[:5] == (1, 2, 4, 6, 8) and len(imagenet.IMAGENET_R_SUBSET) == 200
    assert imagenet.IMAGENET_A_SUBSET[:5] == (6, 11, 13, 15, 17) and len(imagenet.IMAGENET_A_SUBSET) == 200
    objectnet = get_dataset("objectnet")
    assert len(objectnet.classnames) == 113 and sum(map(len, objectnet.pooling)) == 125
    assert objectnet.classnames[0] == "alarm clock" and objectnet.pooling[0] == (409, 530)  # analog, digital clock
    assert len(wilds.IWILDCAM_CLASSNAMES) == 182 and len(wilds.FMOW_CATEGORIES) == 62
    for t in transfer.TRANSFER_DATASETS:
        spec = get_dataset(t.name)
        assert spec.templates and all("{}" in x for x in spec.templates), t.name
    assert len(get_dataset("caltech101").classnames) == len(load_list("caltech101_folders.txt")) == 102


def test_imagenet_r_converts_with_labels_in_subset_order(tmp_path):
    wnids = load_list("imagenet_r_wnids.txt")
    src = tmp_path / "imagenet-r"
    _folders(src, [wnids[5], wnids[0], wnids[199]])
    (src / "README.txt").write_text("top-level files are ignored")
    manifest = _convert("imagenet-r", src, tmp_path / "out")
    assert manifest.num_samples == 6 and len(manifest.classes) == 200
    assert manifest.metadata["expected_count"] == 30_000 and manifest.metadata["source_count"] == 6
    labels = sorted({label for label, *_ in _read(tmp_path / "out")})
    assert labels == [0, 5, 199]
    assert manifest.image_format == "jpg" and manifest.metadata["reencoded"] == 0  # source bytes kept


def test_missing_classes_wrong_layout_and_count_are_refused_with_the_fix(tmp_path):
    wnids = load_list("imagenet_a_wnids.txt")
    src = tmp_path / "imagenet-a"
    _folders(src, wnids[:3], per_class=1)
    strict = ConvertOptions(workers=1, progress=False)
    with pytest.raises(ConversionError, match=r"197 of its 200 class folders are missing .*--allow-count-mismatch"):
        _convert("imagenet-a", src, tmp_path / "out", options=strict)
    _folders(src, wnids[3:], per_class=1)
    with pytest.raises(ConversionError, match=r"found 200 images .* the official release has 7500.*--allow-count"):
        _convert("imagenet-a", src, tmp_path / "out", options=strict)
    (src / "not-a-wnid").mkdir()
    with pytest.raises(ConversionError, match=r"layout imagenet-a/<wnid>/<image>: found 201 folders, 1 of them"):
        _convert("imagenet-a", src, tmp_path / "out")
    wrapped = tmp_path / "download"
    (wrapped / "imagenet-a").mkdir(parents=True)
    with pytest.raises(ConversionError, match="Did you mean --src"):
        _convert("imagenet-a", wrapped, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def _devkit(root: Path, ids_to_wnids: dict[int, str], truth: list[int]) -> None:
    """ILSVRC2012_devkit_t12.tar.gz with meta.mat (synsets incl. a non-leaf) and the val ground truth."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, "x", 0) for i, w in ids_to_wnids.items()] + [(1001, "n00001740", "entity", 5)]
    synsets = np.array(rows, dtype=dtype)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    files = {"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
             "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                 "".join(f"{t}\n" for t in truth).encode()}
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_imagenet_val_flat_files_are_labelled_through_the_devkit(tmp_path):
    val = tmp_path / "val"
    ids = {1: "n02119789", 2: "n01440764", 3: "n15075141"}  # devkit IDs are not the sorted-wnid labels
    truth = [1, 3, 2, 1]
    for i in range(len(truth)):
        _image(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", i, fmt="JPEG")
    _devkit(tmp_path, ids, truth)
    _convert("imagenet", val, tmp_path / "out")
    index = {w: i for i, w in enumerate(imagenet.IMAGENET_WNIDS)}
    got = [(meta["path"], label) for label, meta, _ in _read(tmp_path / "out")]
    assert got == [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", index[ids[t]]) for i, t in enumerate(truth)]
    assert index["n15075141"] == 999 and index["n01440764"] == 0


def test_imagenet_train_holdout_is_disjoint_and_training_shards_are_shuffled(tmp_path):
    train = tmp_path / "train"
    _folders(train, imagenet.IMAGENET_WNIDS[:3], per_class=40, size=(4, 4), ext="png")
    opts = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False, samples_per_shard=50)
    a = _convert("imagenet", train, tmp_path / "train-out", "train", opts)
    b = _convert("imagenet", train, tmp_path / "val-out", "val", opts)
    assert a.num_samples + b.num_samples == 120 and 0 < b.num_samples < 10  # ~1 %
    train_paths = [m["path"] for _, m, _ in _read(tmp_path / "train-out")]
    assert not set(train_paths) & {m["path"] for _, m, _ in _read(tmp_path / "val-out")}
    assert train_paths != sorted(train_paths)


def test_imagenetv2_folders_are_class_indices(tmp_path):
    src = tmp_path / "imagenetv2-matched-frequency-format-val"
    _folders(src, ["0", "10", "999"], per_class=1, ext="jpeg")
    _convert("imagenetv2-matched-frequency", src, tmp_path / "out")
    assert sorted(label for label, *_ in _read(tmp_path / "out")) == [0, 10, 999]


def test_objectnet_keeps_mapped_classes_and_cuts_the_border(tmp_path):
    images = tmp_path / "objectnet-1.0" / "images"
    _folders(images, ["alarm_clock", "banana", "zebra_crossing_sign"], per_class=2, ext="png", size=(20, 16),
             border=True)
    manifest = _convert("objectnet", tmp_path / "objectnet-1.0", tmp_path / "out")
    assert manifest.num_samples == 4 and manifest.metadata["border_crop"] == 2 and manifest.image_format == "png"
    read = _read(tmp_path / "out")
    assert sorted({label for label, *_ in read}) == [0, 2] and {size for *_, size in read} == {(16, 12)}
    image = next(iter(ShardDataset(tmp_path / "out")))[0]
    assert not (np.asarray(image)[[0, -1]] == (255, 0, 0)).all(axis=-1).any()  # the red frame is gone
    no_crop = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False, border_crop=0)
    _convert("objectnet", tmp_path / "objectnet-1.0", tmp_path / "raw", options=no_crop)
    assert {size for *_, size in _read(tmp_path / "raw")} == {(20, 16)}


# --------------------------------------------------------------------------- WILDS


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _iwildcam(root: Path) -> None:
    rows = []
    for i, (split, y, loc) in enumerate([("train", 0, 1), ("train", 3, 1), ("id_test", 3, 1), ("id_test", 5, 2),
                                         ("id_test", 5, 2), ("test", 7, 9), ("test", 181, 9), ("val", 2, 8)]):
        name = f"{i:04x}aa-{split}.jpg"
        _image(root / "train" / name, i, fmt="JPEG")
        rows.append({"split": split, "location_remapped": loc, "location": loc * 10, "sequence_remapped": i,
                     "datetime": "2013-06-01 10:00:00.000", "y": y, "filename": name})
    _write_csv(root / "metadata.csv", rows)


def _fmow(root: Path) -> None:
    _write_csv(root / "country_code_mapping.csv", [{"alpha-2": "FR", "alpha-3": "FRA", "region": "Europe"},
                                                   {"alpha-2": "JP", "alpha-3": "JPN", "region": "Asia"}])
    rows = []
    cases = [("train", "2010-05-01T10:00:00Z", "FRA", "airport"), ("train", "2014-05-01T10:00:00Z", "FRA", "barn"),
             ("test", "2011-01-01T00:00:00Z", "JPN", "zoo"), ("test", "2009-03-01T00:00:00.123Z", "XXX", "dam"),
             ("test", "2016-01-01T00:00:00Z", "JPN", "zoo"), ("test", "2017-07-07T07:07:07Z", "FRA", "park"),
             ("test", "2017-08-08T08:08:08Z", "FRA", "barn"), ("test", "2016-02-02T00:00:00Z", "ATA", "zoo"),
             ("val", "2014-01-01T00:00:00Z", "FRA", "park"), ("seq", "2017-01-01T00:00:00Z", "FRA", "park")]
    for i, (split, stamp, country, category) in enumerate(cases):
        _image(root / "images" / f"rgb_img_{i}.png", i, size=(8, 8))
        rows.append({"split": split, "img_filename": "x", "category": category, "country_code": country,
                     "timestamp": stamp, "lat": 0, "lon": 0})
    _write_csv(root / "rgb_metadata.csv", rows)


def test_wilds_splits_labels_and_metadata_follow_the_wilds_package(tmp_path):
    _iwildcam(tmp_path / "iwildcam_v2.0")
    m = _convert("iwildcam", tmp_path / "iwildcam_v2.0", tmp_path / "iw")
    assert m.metadata["wilds_split"] == "id_test" and m.metadata["expected_count"] == 8_154
    assert [(y, meta["location"]) for y, meta, _ in _read(tmp_path / "iw")] == [(3, 1), (5, 2), (5, 2)]
    _convert("iwildcam-ood", tmp_path / "iwildcam_v2.0", tmp_path / "iw-ood")
    assert sorted(y for y, *_ in _read(tmp_path / "iw-ood")) == [7, 181]

    _fmow(tmp_path / "fmow_v1.1")
    _convert("fmow", tmp_path / "fmow_v1.1", tmp_path / "fm")
    cats = {c: i for i, c in enumerate(wilds.FMOW_CATEGORIES)}
    got = [(y, meta["region"], meta["year"], meta["path"]) for y, meta, _ in _read(tmp_path / "fm")]
    assert got == [(cats["zoo"], "Asia", 2011, "images/rgb_img_2.png"),
                   (cats["dam"], "Other", 2009, "images/rgb_img_3.png")]
    _convert("fmow-ood", tmp_path / "fmow_v1.1", tmp_path / "fm-ood")
    assert [m["path"] for _, m, _ in _read(tmp_path / "fm-ood")] == [f"images/rgb_img_{i}.png" for i in (4, 5, 6, 7)]
    _convert("fmow", tmp_path / "fmow_v1.1", tmp_path / "fm-train", "train")
    # row 1 (train, 2014) falls in the OOD validation years: WILDS uses it nowhere
    assert [m["path"] for _, m, _ in _read(tmp_path / "fm-train")] == ["images/rgb_img_0.png"]


def test_wilds_metadata_without_the_official_columns_is_refused(tmp_path):
    root = tmp_path / "iwildcam_v2.0"
    (root / "train").mkdir(parents=True)
    _write_csv(root / "metadata.csv", [{"split": "train", "file": "a.jpg"}])
    with pytest.raises(ConversionError, match="lacks the column.*filename, y, location_remapped"):
        _convert("iwildcam", root, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"lacks rgb_metadata.csv, country_code_mapping.csv, images; expected"):
        _convert("fmow", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="the download .*nothing does not exist; see datasets/README.md"):
        _convert("fmow", tmp_path / "nothing", tmp_path / "out")


# --------------------------------------------------------------------------- transfer datasets


def _cifar(root: Path, files: dict[str, int], meta: str, names_key: str, labels_key: str, names: list[str]) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in files.items():
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 labels_key: [i % len(names) for i in range(n)], "filenames": [f"f{i}.png" for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=4))
    (root / meta).write_bytes(pickle.dumps({names_key: names}, protocol=4))


def test_cifar_pickles_are_read_as_arrays_only(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    src = tmp_path / "cifar-10-batches-py"
    _cifar(src, {**{f"data_batch_{i}": 20 for i in range(1, 6)}, "test_batch": 4}, "batches.meta", "label_names",
           "labels", names)
    m = _convert("cifar10", src, tmp_path / "test")
    assert m.num_samples == 4 and m.image_format == "png" and m.metadata["class_name_mismatches"] == []
    first = next(iter(ShardDataset(tmp_path / "test")))[0]
    batch = pickle.loads((src / "test_batch").read_bytes())
    assert np.array_equal(np.asarray(first), batch["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    train = _convert("cifar10", src, tmp_path / "train", "train")
    val = _convert("cifar10", src, tmp_path / "val", "val")
    assert train.num_samples + val.num_samples == 100 and val.metadata["val_fraction"] == 0.1

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))
    (src / "test_batch").write_bytes(pickle.dumps({"data": Exploit()}))
    with pytest.raises(ConversionError, match="test_batch is not a readable CIFAR python batch .it holds a builtins"):
        _convert("cifar10", src, tmp_path / "bad")


def test_cifar100_reads_fine_labels(tmp_path):
    names = [n.replace(" ", "_") for n in get_dataset("cifar100").classnames]
    src = tmp_path / "cifar-100-python"
    _cifar(src, {"train": 5, "test": 3}, "meta", "fine_label_names", "fine_labels", names)
    _convert("cifar100", src, tmp_path / "out")
    assert [y for y, *_ in _read(tmp_path / "out")] == [0, 1, 2]


def test_dtd_food_sun_use_their_official_split_files(tmp_path):
    dtd = tmp_path / "dtd"
    classes = get_dataset("dtd").classnames
    _folders(dtd / "images", classes, per_class=1)
    for split in ("train", "val", "test"):
        (dtd / "labels").mkdir(exist_ok=True)
        (dtd / "labels" / f"{split}1.txt").write_text(f"{classes[3]}/img_0.jpg\n{classes[46]}/img_0.jpg\n")
    _convert("dtd", dtd, tmp_path / "dtd-out", "val")
    assert [y for y, *_ in _read(tmp_path / "dtd-out")] == [3, 46]

    food = tmp_path / "food-101"
    names = [c.replace(" ", "_") for c in get_dataset("food101").classnames]
    _folders(food / "images", names[:2], per_class=2)
    (food / "meta").mkdir()
    (food / "meta" / "classes.txt").write_text("\n".join(names) + "\n")
    (food / "meta" / "test.txt").write_text(f"{names[1]}/img_0\n{names[0]}/img_1\n")
    m = _convert("food101", food, tmp_path / "food-out")
    assert [y for y, *_ in _read(tmp_path / "food-out")] == [1, 0] and m.metadata["class_name_mismatches"] == []

    sun = tmp_path / "SUN397"
    paths = [f"/{n[0]}/{n.replace(' ', '_')}" for n in get_dataset("sun397").classnames]
    paths[8] = "/a/apartment_building/outdoor"  # "apartment building outdoor"
    paths[9] = "/a/apse/outside"  # not "apse indoor": reported as a mismatch
    (sun / "a").mkdir(parents=True)
    (sun / "ClassName.txt").write_text("\n".join(paths) + "\n")
    _image(sun / "a" / "abbey" / "sun_a.jpg", 1)
    _image(sun / "a" / "apartment_building" / "outdoor" / "sun_b.jpg", 2)
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Testing_01.txt").write_text(
        "/a/apartment_building/outdoor/sun_b.jpg\n/a/abbey/sun_a.jpg\n")
    (tmp_path / "Partitions" / "Training_01.txt").write_text("/a/abbey/sun_a.jpg\n")
    m = _convert("sun397", sun, tmp_path / "sun-out")
    assert [y for y, *_ in _read(tmp_path / "sun-out")] == [8, 0]
    assert m.metadata["class_name_mismatches"] == [["apse outside", "apse indoor"]]


def test_cars_flowers_caltech_read_their_mat_files_and_folders(tmp_path):
    cars = tmp_path / "stanford_cars"
    names = list(get_dataset("stanford-cars").classnames)
    (cars / "devkit").mkdir(parents=True)
    scipy.io.savemat(cars / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    annos = np.array([(1, 2, 10, 9, 196, "00001.jpg"), (1, 1, 5, 5, 1, "00002.jpg")],
                     dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
                            ("fname", "O")])
    scipy.io.savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annos})
    for name in ("00001.jpg", "00002.jpg"):
        _image(cars / "cars_test" / name, 3)
    _convert("stanford-cars", cars, tmp_path / "cars-out")
    assert [y for y, *_ in _read(tmp_path / "cars-out")] == [195, 0]

    flowers = tmp_path / "flowers-102"
    for i in range(1, 5):
        _image(flowers / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(flowers / "imagelabels.mat", {"labels": np.array([[77, 1, 102, 5]])})
    scipy.io.savemat(flowers / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]),
                                             "tstid": np.array([[4, 3]])})
    _convert("flowers102", flowers, tmp_path / "flowers-out")
    assert [y for y, *_ in _read(tmp_path / "flowers-out")] == [101, 4]

    caltech = tmp_path / "caltech-101" / "101_ObjectCategories"
    folders = load_list("caltech101_folders.txt")
    _folders(caltech, [folders[0], folders[101]], per_class=32, size=(4, 4))
    train = _convert("caltech101", tmp_path / "caltech-101", tmp_path / "ct-train", "train")
    val = _convert("caltech101", tmp_path / "caltech-101", tmp_path / "ct-val", "val")
    test = _convert("caltech101", tmp_path / "caltech-101", tmp_path / "ct-test", "test")
    assert train.num_samples + val.num_samples == 60 and test.num_samples == 4
    assert sorted({y for y, *_ in _read(tmp_path / "ct-test")}) == [0, 101]


# --------------------------------------------------------------------------- engine: resume, bad files, CLI


def test_killed_conversion_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    from robustbench_ft.convert import engine as convert

    wnids = load_list("imagenet_r_wnids.txt")
    src = tmp_path / "imagenet-r"
    _folders(src, wnids[:3], per_class=4, ext="png")
    opts = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False, samples_per_shard=3,
                          image_format="jpg")
    written: list[str] = []
    real = convert._write_shard

    def dies_on_third(task):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if killed
        written.append(Path(task.out_path).name)
        return real(task)

    monkeypatch.setattr(convert, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _convert("imagenet-r", src, tmp_path / "out", options=opts)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        verify_shards(tmp_path / "out")
    written.clear()
    monkeypatch.setattr(convert, "_write_shard", lambda task: written.append(Path(task.out_path).name) or real(task))
    resumed = _convert("imagenet-r", src, tmp_path / "out", options=opts)
    assert written == ["imagenet-r-test-000002.tar", "imagenet-r-test-000003.tar"]
    fresh = _convert("imagenet-r", src, tmp_path / "fresh", options=opts)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in fresh.shards]
    written.clear()
    _convert("imagenet-r", src, tmp_path / "out", options=ConvertOptions(**{**opts.__dict__, "quality": 80}))
    assert len(written) == 4  # other options: every shard is redone


def test_unreadable_files_are_named_or_skipped_and_counted_in_the_record(tmp_path, run_dirs):
    src = tmp_path / "raw"
    _folders(src, ["b", "d", "e"], per_class=3)
    (src / "d" / "notes.txt").write_text("not an image")
    with pytest.raises(ConversionError, match=r"cannot read .*d/notes\.txt as an image.*on_bad='skip'"):
        _convert("rt-subset", src, tmp_path / "x")
    skip = ConvertOptions(allow_count_mismatch=True, workers=2, progress=False, on_bad="skip", samples_per_shard=4)
    root = Path(run_dirs["data_root"])
    _make_tiny_suite_data(tmp_path, root)
    m = _convert("rt-subset", src, root / "rt-subset" / "test", options=skip)
    assert m.metadata["num_skipped"] == 1 and m.metadata["skipped"][0]["path"] == "d/notes.txt"
    out = run(RunConfig(suite="rt-suite", **TINY, **run_dirs), progress=False, log=lambda s: None)
    assert out.records[0].metrics["rt-subset"]["num_skipped"] == 1


def test_cli_shard_dataset_and_list_suites(tmp_path, capsys):
    wnids = load_list("imagenet_r_wnids.txt")
    _folders(tmp_path / "imagenet-r", wnids[:2], per_class=1)
    root = tmp_path / "data"
    assert main(["shard", "imagenet-r", "--src", str(tmp_path / "imagenet-r"), "--data-root", str(root),
                 "--workers", "1"]) == 2
    assert "--allow-count-mismatch" in capsys.readouterr().err
    assert main(["shard", "imagenet-r", "--src", str(tmp_path / "imagenet-r"), "--data-root", str(root),
                 "--workers", "1", "--allow-count-mismatch", "--resize-shorter", "8"]) == 0
    assert "wrote 2 samples of 200 classes" in capsys.readouterr().out
    assert Manifest.load(root / "imagenet-r" / "test").resize_shorter == 8
    assert main(["verify", str(root / "imagenet-r" / "test")]) == 0
    assert main(["shard", "imagenet-r", "--src", str(tmp_path / "imagenet-r"), "--shuffle-seed", "1"]) == 2
    assert "--shuffle-seed: only for `shard imagefolder`" in capsys.readouterr().err
    assert main(["shard", "mnist", "--src", str(tmp_path)]) == 2
    assert "builds it itself" in capsys.readouterr().err
    assert main(["shard", "imagenet-rr", "--src", str(tmp_path)]) == 2
    assert "Did you mean 'imagenet-r'" in capsys.readouterr().err
    assert main(["list", "suites", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "imagenet: reference imagenet; shifts imagenetv2-matched-frequency, imagenet-r" in out
    assert "built: imagenet-r/test; missing: imagenet/test" in out
    assert "transfer-cifar10: reference cifar10; shifts none" in out and "wilds-fmow" in out


# --------------------------------------------------------------------------- end to end


def _register_tiny_suite() -> None:
    """A 6-class reference with a class-subset shift and a pooled shift, converted by the ImageNet converters."""
    try:
        get_suite("rt-suite")
        return
    except KeyError:
        pass
    classes = ("ant", "bee", "cat", "dog", "eel", "fox")
    common = {"templates": ("a photo of a {}.",), "extra_metrics": ("ece",)}
    folders = partial(imagenet._convert_folders, expected=None, layout="SRC/<class>/<image>")
    register_dataset(DatasetSpec("rt-ref", classes, **common, splits=("train", "test"),
                                 converter=partial(folders, dataset="rt-ref", folders=classes, classes=classes)))
    register_dataset(DatasetSpec("rt-subset", ("bee", "dog", "eel"), **common, class_subset=(1, 3, 4),
                                 converter=partial(folders, dataset="rt-subset", folders=("b", "d", "e"),
                                                   classes=("bee", "dog", "eel"))))
    register_dataset(DatasetSpec("rt-pooled", ("insect", "fox"), **common, pooling=((0, 1), (5,)), border_crop=2,
                                 converter=partial(folders, dataset="rt-pooled", folders=("insect", "fox"),
                                                   classes=("insect", "fox"))))
    register_suite(Suite("rt-suite", reference="rt-ref", shifts=("rt-subset", "rt-pooled"), train=("rt-ref", "train"),
                         val=None))


_register_tiny_suite()


def _make_tiny_suite_data(tmp_path: Path, root: Path) -> None:
    spec = get_dataset("rt-ref")
    _folders(tmp_path / "ref", spec.classnames, per_class=3, size=(32, 32))
    _folders(tmp_path / "subset", ["b", "d", "e"], per_class=2, size=(32, 32))
    _folders(tmp_path / "pooled", ["insect", "fox"], per_class=2, size=(36, 36))
    for name, src in (("rt-ref", "ref"), ("rt-subset", "subset"), ("rt-pooled", "pooled")):
        _convert(name, tmp_path / src, root / name / "test")


def test_run_projects_logits_and_reports_reference_accuracy_on_each_subset(tmp_path, run_dirs):
    root = Path(run_dirs["data_root"])
    _make_tiny_suite_data(tmp_path, root)
    out = run(RunConfig(suite="rt-suite", **TINY, **run_dirs), progress=False, log=lambda s: None)
    rec = out.records[0]
    assert rec.metrics["rt-subset"]["n"] == 6 and rec.metrics["rt-pooled"]["n"] == 4
    ref = rec.metrics["rt-ref"]
    assert ref["n@rt-subset"] == 9 and ref["n@rt-pooled"] == 9  # ant+bee+fox samples pool into 2 classes
    assert 0 <= ref["top1@rt-subset"] <= 1 and 0 <= ref["ece"] <= 1
    assert Manifest.load(root / "rt-pooled" / "test").metadata["border_crop"] == 2

    # the same numbers by hand from the cached logits, which are always over the 6 reference classes
    cached = {}
    for path in (Path(run_dirs["cache_dir"]) / "logits").glob("*.npy"):
        if not path.name.endswith(".labels.npy"):
            labels = np.load(path.with_suffix(".labels.npy"))
            cached[len(labels)] = (np.load(path), labels)
    assert sorted(cached) == [4, 6, 18] and all(lg.shape[1] == 6 for lg, _ in cached.values())
    logits, labels = cached[6]
    assert rec.metrics["rt-subset"]["top1"] == pytest.approx(np.mean(logits[:, [1, 3, 4]].argmax(1) == labels))
    logits, labels = cached[4]
    pooled = np.stack([logits[:, [0, 1]].max(1), logits[:, 5]], axis=1)
    assert rec.metrics["rt-pooled"]["top1"] == pytest.approx(np.mean(pooled.argmax(1) == labels))
    logits, labels = cached[18]
    keep = np.isin(labels, [1, 3, 4])
    own = np.searchsorted([1, 3, 4], labels[keep])
    assert ref["top1@rt-subset"] == pytest.approx(np.mean(logits[keep][:, [1, 3, 4]].argmax(1) == own))


def test_wilds_fmow_suite_runs_end_to_end_with_worst_region_accuracy(tmp_path, run_dirs):
    _fmow(tmp_path / "fmow_v1.1")
    root = Path(run_dirs["data_root"])
    for name in ("fmow", "fmow-ood"):
        _convert(name, tmp_path / "fmow_v1.1", root / name / "test")
    out = run(RunConfig(suite="wilds-fmow", **TINY, **run_dirs), progress=False, log=lambda s: None)
    rec = out.records[0]
    assert rec.primary_metric == {"fmow": "top1", "fmow-ood": "worst_region_acc"}
    assert rec.metrics["fmow-ood"]["n"] == 4 and rec.metrics["fmow"]["worst_region_acc"] in (0.0, 1.0)
    # fmow-ood holds Asia (1), Europe (2) and Other (Antarctica's code is not in the mapping; left out)
    assert rec.metrics["fmow-ood"]["worst_region_acc"] in (0.0, 0.5, 1.0)


def test_run_on_a_missing_or_interrupted_conversion_says_how_to_finish_it(tmp_path, run_dirs):
    config = RunConfig(suite="rt-suite", **TINY, **run_dirs)
    with pytest.raises(FileNotFoundError, match=r"`robustbench-ft shard rt-ref --src RAW --split test --out "):
        run(config, progress=False, log=lambda s: None)
    root = Path(run_dirs["data_root"])
    _make_tiny_suite_data(tmp_path, root)
    (root / "rt-subset" / "test" / "manifest.json").unlink()  # as a killed conversion leaves it
    with pytest.raises(ShardError, match=r"no manifest.json .* rerun `robustbench-ft shard rt-subset --src RAW"):
        run(config, progress=False, log=lambda s: None)


def test_fmow_prompts_are_the_references_own():
    """wise-ft / FLYP's 16 FMoW templates: 14 with the raw category (underscores, "a" even before a vowel),
    2 through append_proper_article (spaces, a/an)."""
    from robustbench_ft.datasets.registry import get_dataset
    from robustbench_ft.models.zeroshot import fill_template

    spec = get_dataset("fmow")
    assert len(spec.templates) == 16 and spec.classnames[1] == "airport_hangar"
    prompts = [fill_template(t, "airport_hangar") for t in spec.templates]
    assert prompts[:4] == ["satellite photo of a airport_hangar.", "aerial photo of a airport_hangar.",
                           "satellite photo of an airport hangar.", "aerial photo of an airport hangar."]
    assert prompts[-2:] == ["a photo of a airport_hangar.", "airport_hangar."]
    assert fill_template("{article_name}", "barn") == "a barn"


def test_wilds_suites_default_to_flyps_wilds_recipe():
    from robustbench_ft import RunConfig
    from robustbench_ft.methods.resolve import resolve

    for suite in ("wilds-iwildcam", "wilds-fmow"):
        for method in ("finetune", "flyp", "lp-ft", "l2-sp"):
            opts = resolve(RunConfig(method=method, suite=suite)).options
            assert (opts.epochs, opts.lr, opts.batch_size, opts.warmup_steps) == (20.0, 1e-5, 256, 500)
            assert opts.weight_decay == (0.0 if method == "l2-sp" else 0.2)


def test_every_registered_dataset_has_a_protocol_card():
    """docs/protocol.md says how each dataset is read, split and scored; a new dataset needs its card."""
    import re

    from robustbench_ft.datasets.registry import list_datasets

    names = [spec.name for spec in list_datasets() if spec.source]  # the datasets tests register name no source
    text = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    headed = {name for heading in re.findall(r"^### (.+)$", text, flags=re.M)
              for name in re.findall(r"`([^`]+)`", heading)}
    assert len(names) >= 20
    missing = sorted(name for name in names if name not in headed)
    assert not missing, f"docs/protocol.md has no card for {missing}"
