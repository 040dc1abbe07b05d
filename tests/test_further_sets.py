"""CIFAR-10.1/10.2 (the cifar10 suite's shifts), PatchCamelyon and Rendered SST2 from layout-faithful fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustbench_ft.config import RunConfig
from robustbench_ft.convert.engine import convert_dataset
from robustbench_ft.convert.sources import ConversionError, ConvertOptions
from robustbench_ft.datasets import binary_sets
from robustbench_ft.datasets.registry import get_dataset, get_suite
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.methods.resolve import resolve
from robustbench_ft.shards.verify import verify_shards

SUBSET = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False)
EXACT = ConvertOptions(workers=1, progress=False)


def _convert(name: str, src: Path, out: Path, split: str = "test", options: ConvertOptions = SUBSET):
    manifest = convert_dataset(get_dataset(name), src, out, split, options)
    verify_shards(out)
    return manifest


def _pixels(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def test_cifar10_suite_and_its_shifts():
    suite = get_suite("cifar10")
    assert suite.reference == "cifar10" and suite.shifts == ("cifar10.1", "cifar10.2")
    assert get_dataset("cifar10.1").classnames == get_dataset("cifar10").classnames == get_dataset("cifar10.2").classnames


def test_cifar101_v6_files_are_read(tmp_path):
    images, labels = _pixels(20)
    folder = tmp_path / "CIFAR-10.1" / "datasets"  # a clone of the repository
    folder.mkdir(parents=True)
    np.save(folder / "cifar10.1_v6_data.npy", images)
    np.save(folder / "cifar10.1_v6_labels.npy", labels.astype(np.int32))
    m = _convert("cifar10.1", tmp_path / "CIFAR-10.1", tmp_path / "out")
    assert m.num_samples == 20 and m.metadata["expected_count"] == 2000
    got = [(np.asarray(img), y) for img, y, *_ in ShardDataset(tmp_path / "out")]
    assert np.array_equal(got[3][0], images[3]) and [y for _, y in got] == labels.tolist()
    with pytest.raises(ConversionError, match=r"found 20 images .* the official release has 2000"):
        _convert("cifar10.1", folder, tmp_path / "exact", options=EXACT)
    (folder / "cifar10.1_v6_labels.npy").unlink()
    with pytest.raises(ConversionError, match="lacks cifar10.1_v6_labels.npy; both v6 files are needed"):
        _convert("cifar10.1", folder, tmp_path / "bad")


def test_cifar102_npz_and_the_pinned_npy_dict(tmp_path):
    images, labels = _pixels(12)
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    np.savez(new / "cifar102_test.npz", images=images, labels=labels, label_names=np.array(["airplane"] * 10))
    np.save(old / "cifar102_test.npy", {"images": images, "labels": labels, "label_names": ["airplane"] * 10},
            allow_pickle=True)
    a, b = _convert("cifar10.2", new, tmp_path / "a"), _convert("cifar10.2", old, tmp_path / "b")
    read = lambda d: [(np.asarray(img).tobytes(), y) for img, y, *_ in ShardDataset(d)]  # noqa: E731
    assert a.num_samples == b.num_samples == 12 and read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a")[5] == (images[5].tobytes(), 5)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))
    np.save(old / "cifar102_test.npy", np.array(Exploit(), dtype=object), allow_pickle=True)
    with pytest.raises(ConversionError, match="not a readable CIFAR-10.2 file .it holds a builtins.print"):
        _convert("cifar10.2", old, tmp_path / "c")


def test_rendered_sst2_official_folders(tmp_path):
    src = tmp_path / "rendered-sst2"
    for split, n in (("valid", 3), ("train", 2)):
        for c in ("negative", "positive"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 6), (i, 0, 0)).save(src / split / c / f"{i}.png")
    m = _convert("rendered-sst2", src, tmp_path / "val", "val")
    assert m.num_samples == 6 and m.metadata["official_split"] == "valid" and m.metadata["expected_count"] == 872
    assert sorted(y for _, y, *_ in ShardDataset(tmp_path / "val")) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConversionError, match="rendered-sst2: .*test is not a directory"):
        _convert("rendered-sst2", src, tmp_path / "test")


def test_binary_suites_carry_flyps_few_shot_recipe():
    pcam = resolve(RunConfig(suite="pcam", method="flyp")).options
    sst2 = resolve(RunConfig(suite="rendered-sst2", method="flyp")).options
    assert (pcam.epochs, pcam.lr, pcam.weight_decay, pcam.batch_size, pcam.warmup_steps) == (20, 1e-6, 0.0, 256, 0)
    assert (sst2.lr, sst2.weight_decay) == (1e-5, 0.2)
    assert get_dataset("pcam").classnames == ("lymph node", "lymph node containing metastatic tumor tissue")


def test_pcam_needs_the_gunzipped_hdf5_files(tmp_path):
    (tmp_path / "camelyonpatch_level_2_split_valid_x.h5.gz").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"lacks camelyonpatch_level_2_split_valid_x.h5, .*_valid_y.h5 "
                                              r"\(found camelyonpatch_level_2_split_valid_x.h5.gz: gunzip them first\)"):
        _convert("pcam", tmp_path, tmp_path / "out", "val")


def test_pcam_hdf5(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (5, 96, 96, 3), dtype=np.uint8), np.array([0, 1, 1, 0, 1]).reshape(5, 1, 1, 1)
    xs, ys = binary_sets.pcam_files("test")
    with h5py.File(tmp_path / xs, "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / ys, "w") as f:
        f["y"] = y
    monkeypatch.setattr(binary_sets, "PCAM_CHUNK", 2)  # several chunks
    m = _convert("pcam", tmp_path, tmp_path / "out")
    got = [(np.asarray(img), label) for img, label, *_ in ShardDataset(tmp_path / "out")]
    assert m.num_samples == 5 and [g[1] for g in got] == [0, 1, 1, 0, 1] and np.array_equal(got[4][0], x[4])


# --------------------------------------------------------------------------- ImageNet-Vid-Robust and pm-k


def _vid(root: Path) -> Path:
    src = root / "imagenet_vid_ytbb_robust" / "imagenet-vid-robust"
    sets = {"val/ILSVRC2015_val_00000000/000442.JPEG": ["val/ILSVRC2015_val_00000000/000441.JPEG",
                                                        "val/ILSVRC2015_val_00000000/000452.JPEG"],
            "val/ILSVRC2015_val_00000001/000010.JPEG": ["val/ILSVRC2015_val_00000001/000001.JPEG"]}
    labels = {frame: [3] for frames in sets.values() for frame in frames}
    labels.update({"val/ILSVRC2015_val_00000000/000442.JPEG": [3, 7], "val/ILSVRC2015_val_00000001/000010.JPEG": [29]})
    for frame in labels:
        (src / frame).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (1, 2, 3)).save(src / frame, format="JPEG")
    (src / "metadata").mkdir()
    (src / "metadata" / "pmsets.json").write_text(json.dumps(sets))
    (src / "metadata" / "labels.json").write_text(json.dumps(labels))
    return src


def test_vid_robust_frames_carry_the_pmk_metadata(tmp_path):
    from robustbench_ft.datasets import video_robust

    spec = get_dataset("imagenet-vid-robust")
    assert len(spec.classnames) == 30 and sum(map(len, spec.pooling)) == 288 and spec.metric == "pm10"
    assert get_suite("imagenet-vid-robust").shifts == ("imagenet-vid-robust",)
    src = _vid(tmp_path)
    m = _convert("imagenet-vid-robust", src.parent, tmp_path / "out")
    assert m.num_samples == 5 and m.metadata["expected_count"] == video_robust.VID_ANCHORS
    metas = sorted((meta["anchor"][-11:], meta["offset"], meta["labels"], y)
                   for _, y, _, meta in ShardDataset(tmp_path / "out", with_meta=True))
    assert metas == [("000010.JPEG", -9, [3], 3), ("000010.JPEG", 0, [29], 29), ("000442.JPEG", -1, [3], 3),
                     ("000442.JPEG", 0, [3, 7], 3), ("000442.JPEG", 10, [3], 3)]
    (src / "metadata" / "pmsets.json").unlink()
    with pytest.raises(ConversionError, match="lacks metadata/pmsets.json, the frame metadata pm-k is scored with"):
        _convert("imagenet-vid-robust", src, tmp_path / "bad")


def test_pm_k_counts_an_anchor_only_if_every_frame_within_k_is_right():
    from robustbench_ft import metrics

    def onehot(preds):
        return np.eye(4)[preds]
    metas = [{"anchor": "a", "offset": 0, "labels": [1, 2]}, {"anchor": "a", "offset": -1, "labels": [1]},
             {"anchor": "a", "offset": 5, "labels": [1]},
             {"anchor": "b", "offset": 0, "labels": [3]}, {"anchor": "b", "offset": 2, "labels": [3]}]
    labels = np.array([1, 1, 1, 3, 3])
    logits = onehot([2, 1, 0, 3, 3])  # a: anchor right (any label), offset 5 wrong; b: all right
    assert metrics.compute("pm10", logits, labels, metas, ("pm0",)) == {"top1": 0.6, "n": 5, "pm10": 0.5, "pm0": 1.0}
    assert metrics.pm_k(logits, labels, metas, k=4) == 1.0
    assert metrics.pm_k(onehot([0, 1, 1, 3, 3]), labels, metas, k=10) == 0.5  # a's anchor wrong
    with pytest.raises(ValueError, match=r"pm-10 needs each frame's metadata \(anchor, offset, labels\)"):
        metrics.compute("pm10", logits, labels, [{}] * 5)
