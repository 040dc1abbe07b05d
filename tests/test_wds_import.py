"""`shard import-wds`: hub copies in the CLIP_benchmark / DataComp layout, from a folder and over loopback HTTP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from http_fixtures import Faults, serve, write_copy

from robustbench_ft.cli import main
from robustbench_ft.convert.sources import ConversionError, ConvertOptions
from robustbench_ft.convert.wds_import import WdsSource
from robustbench_ft.datasets.hub_copies import COPIES, HubCopy, check_copy, get_copy, import_hub_copy
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.shards.verify import verify_shards

OPTS = ConvertOptions(allow_count_mismatch=True, workers=1, progress=False, samples_per_shard=4)


def _copy(root: Path, dataset: str, labels, **kw) -> Path:
    return write_copy(root, get_copy(dataset).source_classnames, labels, **kw)


def _shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def test_every_accepted_copy_maps_onto_its_dataset_class_list():
    for (dataset, _), copy in COPIES.items():
        check_copy(copy, get_dataset(dataset))  # bijection, and each copy name = the harness's name of its target
    spec = get_dataset("imagenet-r")
    swapped = list(COPIES[("imagenet-r", "test")].to_harness)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    bad = HubCopy(**{**COPIES[("imagenet-r", "test")].__dict__, "to_harness": tuple(swapped)})
    with pytest.raises(ValueError, match="label 0 .* maps to class 1"):
        check_copy(bad, spec)
    # ImageNet-R's copy is labelled over sorted wnids: each copy label lands on the class of that wnid
    copy = COPIES[("imagenet-r", "test")]
    assert [spec.class_ids[t] for t in copy.to_harness] == sorted(spec.class_ids)


def test_import_over_http_equals_a_local_import_byte_for_byte(tmp_path):
    labels = [0, 5, 199, 3, 3, 7, 0, 150]
    src = _copy(tmp_path / "wds_imagenet-r", "imagenet-r", labels)
    local = import_hub_copy(src, tmp_path / "local", "imagenet-r", options=OPTS, log=lambda m: None)
    rev = "0123456789abcdef0123456789abcdef01234567"
    with serve(tmp_path) as url:
        remote = import_hub_copy(f"{url}/wds_imagenet-r", tmp_path / "remote", "imagenet-r", options=OPTS,
                                 log=lambda m: None)
    assert _shards(tmp_path / "local") == _shards(tmp_path / "remote") and len(_shards(tmp_path / "local")) == 2
    assert local.content_hash() == remote.content_hash()
    strip = lambda m: {**m.to_dict(), "metadata": {**m.metadata, "imported_from": {  # noqa: E731
        k: v for k, v in m.metadata["imported_from"].items() if k != "url"}}}
    assert strip(local) == strip(remote)
    assert remote.metadata["imported_from"]["url"].startswith("http://127.0.0.1:")
    assert not (tmp_path / "remote" / ".wds-source").exists()  # downloads removed once complete
    verify_shards(tmp_path / "remote")
    spec = get_dataset("imagenet-r")
    got = [(label, meta["path"]) for _, label, _, meta in ShardDataset(tmp_path / "remote", with_meta=True)]
    ranked = sorted(spec.class_ids)
    assert [spec.class_ids[label] for label, _ in got] == [ranked[y] for y in labels]
    assert got[0][1] == "test/0.tar:s0000000.webp"
    # a hub URL records its revision; a commit pins it
    source = WdsSource.parse(f"https://huggingface.co/datasets/clip-benchmark/wds_imagenet-r/tree/{rev}")
    assert source.root == f"https://huggingface.co/datasets/clip-benchmark/wds_imagenet-r/resolve/{rev}"
    assert source.provenance() == {"url": source.given, "hub_repo": "clip-benchmark/wds_imagenet-r",
                                   "revision": rev, "pinned": True}
    assert not WdsSource.parse("https://huggingface.co/datasets/a/b/resolve/main").provenance()["pinned"]
    # a pipe: command ({} = the file's path under the prefix) reads the same bytes; a failing one is named
    piped = import_hub_copy(f"pipe:cat {src}/{{}}", tmp_path / "piped", "imagenet-r", options=OPTS, log=lambda m: None)
    assert _shards(tmp_path / "piped") == _shards(tmp_path / "local") and piped.content_hash() == local.content_hash()
    with pytest.raises(ShardError, match=r"pipe:cat .*nowhere/classnames.txt 2>/dev/null: the command exited with status 1"):
        import_hub_copy(f"pipe:cat {tmp_path}/nowhere/{{}} 2>/dev/null", tmp_path / "p2", "imagenet-r", options=OPTS)


def test_objectnet_copy_gets_the_two_pixel_border_cut_losslessly(tmp_path):
    src = _copy(tmp_path / "wds_objectnet", "objectnet", [0, 1, 112], border=True)
    manifest = import_hub_copy(src, tmp_path / "out", "objectnet", options=OPTS, log=lambda m: None)
    assert manifest.image_format == "png" and manifest.metadata["border_crop"] == 2
    images = [np.asarray(image) for image, _ in ShardDataset(tmp_path / "out")]
    assert all(a.shape == (8, 10, 3) for a in images)  # 14x12 less 2 px per edge
    assert not any((a == (255, 0, 0)).all(axis=-1).any() for a in images)  # the red frame is gone


def test_killed_or_dropped_imports_resume_and_leave_nothing_that_passes_for_complete(tmp_path, monkeypatch):
    from robustbench_ft.convert import engine

    src = _copy(tmp_path / "wds_imagenet-a", "imagenet-a", list(range(9)))
    faults = Faults(truncate={"wds_imagenet-a/test/1.tar": 700})
    out = tmp_path / "out"
    with serve(tmp_path, faults) as url:
        with pytest.raises(ShardError, match=r"test/1\.tar: reading failed after 700 bytes"):
            import_hub_copy(f"{url}/wds_imagenet-a", out, "imagenet-a", options=OPTS, log=lambda m: None)
        assert not (out / "manifest.json").exists() and not list((out / ".wds-source" / "test").glob("1.tar*"))
        faults.truncate.clear()
        faults.requests.clear()
        real = engine._write_shard
        calls = []

        def dies_on_second(task):
            if calls:
                raise KeyboardInterrupt  # as if killed
            calls.append(task)
            return real(task)

        monkeypatch.setattr(engine, "_write_shard", dies_on_second)
        with pytest.raises(KeyboardInterrupt):
            import_hub_copy(f"{url}/wds_imagenet-a", out, "imagenet-a", options=OPTS, log=lambda m: None)
        assert "wds_imagenet-a/test/0.tar" not in faults.requests  # the finished download was kept
        monkeypatch.setattr(engine, "_write_shard", lambda task: calls.append(task) or real(task))
        faults.requests.clear()
        calls.clear()
        import_hub_copy(f"{url}/wds_imagenet-a", out, "imagenet-a", options=OPTS, log=lambda m: None)
    assert not any(r.endswith(".tar") for r in faults.requests) and len(calls) == 2  # 3 shards, 1 already written
    fresh = import_hub_copy(src, tmp_path / "fresh", "imagenet-a", options=OPTS, log=lambda m: None)
    assert Manifest.load(out).content_hash() == fresh.content_hash()


def test_a_copy_in_another_label_order_or_size_is_refused(tmp_path):
    names = list(get_copy("imagenet-a").source_classnames)
    names[3], names[4] = names[4], names[3]
    src = write_copy(tmp_path / "swapped", names, [0, 1])
    with pytest.raises(ConversionError, match=r"line 4 of .*classnames.txt is .* another order"):
        import_hub_copy(src, tmp_path / "o1", "imagenet-a", options=OPTS)
    src = _copy(tmp_path / "small", "imagenet-a", [0, 1])
    strict = ConvertOptions(workers=1, progress=False)
    with pytest.raises(ConversionError, match="found 2 images .* official release has 7500"):
        import_hub_copy(src, tmp_path / "o2", "imagenet-a", options=strict, log=lambda m: None)
    with pytest.raises(ValueError, match="no accepted hub copy of 'cifar10'"):
        import_hub_copy(src, tmp_path / "o3", "cifar10", options=OPTS)


def _iwildcam_rows(labels):
    return [np.array([10 + i, 100 + i, 2013, 6, 5, 4, 3, 2, y], dtype=np.int64) for i, y in enumerate(labels)]


def test_wilds_copies_turn_npy_rows_into_the_metadata_the_metrics_read(tmp_path):
    labels = [0, 1, 181, 5]
    src = _copy(tmp_path / "wds_wilds-iwildcam_test", "iwildcam-ood", labels, npy=_iwildcam_rows(labels))
    import_hub_copy(src, tmp_path / "iw", "iwildcam-ood", options=OPTS, log=lambda m: None)
    with serve(tmp_path) as url:  # DataComp's layout over HTTP too: the same shards, byte for byte
        import_hub_copy(f"{url}/wds_wilds-iwildcam_test", tmp_path / "iw-http", "iwildcam-ood", options=OPTS,
                        log=lambda m: None)
    assert _shards(tmp_path / "iw") == _shards(tmp_path / "iw-http")
    metas = [meta for _, _, _, meta in ShardDataset(tmp_path / "iw", with_meta=True)]
    assert metas[1] == {"path": "test/0.tar:s0000001.webp", "location": 11, "sequence": 101,
                        "datetime": "2013-06-05 04:03:02", "wilds_split": "test"}
    bad = _iwildcam_rows(labels)
    bad[2][-1] = 7
    src = _copy(tmp_path / "bad", "iwildcam-ood", labels, npy=bad)
    with pytest.raises(ConversionError, match=r"\.cls label 181 differs from the y 7"):
        import_hub_copy(src, tmp_path / "bad-out", "iwildcam-ood", options=OPTS, log=lambda m: None)

    labels = [0, 61, 2]
    rows = [np.array([r, 14 + i, y], dtype=np.int64) for i, (r, y) in enumerate(zip([0, 2, 1], labels))]
    src = _copy(tmp_path / "wds_wilds-fmow_test", "fmow-ood", labels, npy=rows)
    with pytest.raises(ConversionError, match="--fmow-metadata DIR"):
        import_hub_copy(src, tmp_path / "fm", "fmow-ood", options=OPTS, log=lambda m: None)
    wilds_dir = tmp_path / "fmow_v1.1"
    wilds_dir.mkdir()
    (wilds_dir / "country_code_mapping.csv").write_text("alpha-3,region\nFRA,Europe\nKEN,Africa\nUSA,Americas\n")
    (wilds_dir / "rgb_metadata.csv").write_text("split,country_code\ntrain,KEN\ntest,ATA\ntrain,KEN\nval,FRA\n")
    manifest = import_hub_copy(src, tmp_path / "fm", "fmow-ood", options=OPTS, fmow_metadata=wilds_dir,
                               log=lambda m: None)
    assert manifest.metadata["imported_from"]["region_names"] == ["Africa", "Other", "Europe"]
    metas = [meta for _, _, _, meta in ShardDataset(tmp_path / "fm", with_meta=True)]
    assert [(m["region"], m["year"]) for m in metas] == [("Africa", 2016), ("Europe", 2017), ("Other", 2018)]


def test_cli_import_wds_names_what_is_missing(tmp_path, capsys):
    src = _copy(tmp_path / "wds_imagenetv2", "imagenetv2-matched-frequency", [4, 999])
    assert main(["shard", "import-wds", str(src), "--dataset", "imagenetv2-matched-frequency",
                 "--data-root", str(tmp_path / "data"), "--allow-count-mismatch", "--workers", "1"]) == 0
    assert "imported 2 samples of 1000 classes" in capsys.readouterr().out
    manifest = Manifest.load(tmp_path / "data" / "imagenetv2-matched-frequency" / "test")
    assert manifest.metadata["imported_from"]["source_shards"][0]["name"] == "test/0.tar"
    assert main(["shard", "import-wds", str(src)]) == 2
    assert "needs SRC and --dataset" in capsys.readouterr().err
    # a WebDataset copy given to imagefolder: its folders are not the dataset's classes, and that is said
    assert main(["shard", "imagefolder", str(src), str(tmp_path / "x"), "--dataset", "imagenet"]) == 2
    assert "its class folders" in capsys.readouterr().err
    assert main(["shard", "imagenet", "--src", str(src), "--region-names", "a,b"]) == 2
    assert "--region-names: only for `shard import-wds" in capsys.readouterr().err
    assert main(["shard", "import-wds", str(tmp_path / "nowhere"), "--dataset", "imagenet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    json.dumps(manifest.metadata)  # plain JSON all through
