"""Shard format: writer, manifest, verification, streaming reader and the ImageFolder converter."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustbench_ft.convert.imagefolder import ImageFolderError, write_imagefolder_shards
from robustbench_ft.loading.loader import make_loader
from robustbench_ft.loading.shard_dataset import ShardDataset
from robustbench_ft.shards.manifest import Manifest, ShardError
from robustbench_ft.shards.tarformat import iter_tar_members
from robustbench_ft.shards.verify import verify_shards
from robustbench_ft.shards.writer import ShardFile, ShardWriter, write_shards

CLASSES = ("zero", "one", "two")


def _image(seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _samples(n: int) -> list[tuple[str, Image.Image, int, dict | None]]:
    return [(f"s{i:03d}", _image(i), i % len(CLASSES), {"i": i} if i % 2 else None) for i in range(n)]


def _build(directory: Path, n: int = 10, samples_per_shard: int = 3) -> Manifest:
    return write_shards(_samples(n), directory, "toy", CLASSES, samples_per_shard=samples_per_shard)


def test_round_trip_is_pixel_exact_with_labels_meta_and_index(tmp_path):
    samples = _samples(10)
    samples[4] = (samples[4][0], _png_bytes(samples[4][1]), samples[4][2], samples[4][3])  # pre-encoded bytes
    manifest = write_shards(samples, tmp_path, "toy", CLASSES, samples_per_shard=3)

    assert [s.num_samples for s in manifest.shards] == [3, 3, 3, 1]
    assert [s.name for s in manifest.shards] == [f"toy-{i:06d}.tar" for i in range(4)]
    assert Manifest.load(tmp_path) == manifest
    assert verify_shards(tmp_path) == manifest

    read = list(ShardDataset(tmp_path, with_index=True, with_meta=True))
    assert len(read) == 10
    for (key, image, label, meta), (got, got_label, index, got_key, got_meta) in zip(_samples(10), read):
        assert np.array_equal(np.asarray(got), np.asarray(image))
        assert (got_label, got_key, got_meta) == (label, key, meta or {})
        assert index == int(key[1:])


def test_writer_resizes_shorter_side_without_upscaling(tmp_path):
    with ShardWriter(tmp_path, "toy", CLASSES, image_format="jpg", resize_shorter=8) as writer:
        writer.write("big", _image(0, (20, 14)), 0)
        writer.write("small", _image(1, (6, 5)), 1)
    assert writer.manifest.resize_shorter == 8
    assert [img.size for img, _ in ShardDataset(tmp_path)] == [(11, 8), (6, 5)]


@pytest.mark.parametrize(
    "key, image, label, match",
    [
        ("a.b", None, 0, "no dots or slashes"),
        ("a/b", None, 0, "no dots or slashes"),
        ("ok", None, 3, "outside 0..2"),
        ("ok", None, True, "bool"),
        ("ok", b"\xff\xd8\xff not a png", 0, "bytes are jpg"),
    ],
)
def test_writer_rejects_bad_samples(tmp_path, key, image, label, match):
    with ShardWriter(tmp_path, "toy", CLASSES) as writer:
        with pytest.raises(ValueError, match=match):
            writer.write(key, image if image is not None else _image(0), label)
        writer.write("fine", _image(0), 0)
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("fine", _image(1), 1)
    assert writer.manifest.num_samples == 1


def test_modified_byte_fails_hash_verification_naming_the_shard(tmp_path):
    manifest = _build(tmp_path)
    shard = tmp_path / manifest.shards[1].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(ShardError, match=r"toy-000001\.tar is corrupt"):
        verify_shards(tmp_path)
    with pytest.raises(ShardError, match=r"toy-000001\.tar is corrupt"):
        ShardDataset(tmp_path, verify="hash")


def test_missing_shard_names_the_file(tmp_path):
    _build(tmp_path)
    (tmp_path / "toy-000002.tar").unlink()
    for check in (lambda: verify_shards(tmp_path), lambda: ShardDataset(tmp_path, verify="none")):
        with pytest.raises(ShardError, match=r"toy-000002\.tar is missing"):
            check()


def test_truncated_shard_is_caught_at_construction_and_while_streaming(tmp_path):
    manifest = _build(tmp_path)
    shard = tmp_path / manifest.shards[0].name
    full = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # end of sample 0's last member, rounded up to a tar block: a cut at a header boundary, which
    # tarfile itself would read as a valid shorter archive
    first, *_, last = [m for m in members if m.name.startswith("s000.")]
    boundary = last.offset_data + -(-last.size // 512) * 512

    shard.write_bytes(full[: len(full) // 2])
    with pytest.raises(ShardError, match=r"toy-000000\.tar has \d+ bytes but the manifest says"):
        ShardDataset(tmp_path)

    damaged = [
        (full[: first.offset_data + 5], "unreadable after 0 samples"),  # inside the image data
        (full[: last.offset_data + 5], "unreadable after 0 samples"),
        (full[:boundary], "unreadable .*no end-of-archive marker"),
        (full[:boundary] + bytes(1024), "holds 1 samples but the manifest says 3"),  # a valid, shorter tar
    ]
    for data, match in damaged:
        shard.write_bytes(full)
        dataset = ShardDataset(tmp_path)  # intact when opened, damaged before it is read
        shard.write_bytes(data)
        with pytest.raises(ShardError, match=r"toy-000000\.tar .*" + match):
            list(dataset)
        with pytest.raises(ShardError, match=r"toy-000000\.tar"):
            verify_shards(tmp_path, check_hashes=False)


def test_interrupted_writer_leaves_no_manifest(tmp_path):
    _build(tmp_path)  # a previous complete build in the same directory must not survive a failed rebuild
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "toy", CLASSES, samples_per_shard=2) as writer:
            for key, image, label, meta in _samples(5):
                writer.write(key, image, label, meta)
            raise RuntimeError("boom")
    assert writer.manifest is None
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ShardError, match="no manifest.json in .*build was interrupted; rebuild"):
        ShardDataset(tmp_path)


def test_content_hash_tracks_data_not_names(tmp_path):
    a = _build(tmp_path / "a")
    b = write_shards(_samples(10), tmp_path / "b", "other-name", CLASSES, samples_per_shard=3)
    c = write_shards(_samples(10), tmp_path / "c", "toy", ("zero", "one", "deux"), samples_per_shard=3)
    d = write_shards(_samples(9), tmp_path / "d", "toy", CLASSES, samples_per_shard=3)
    assert a.content_hash() == b.content_hash()
    assert len({a.content_hash(), c.content_hash(), d.content_hash()}) == 3


def test_ranks_and_workers_cover_every_sample_exactly_once(tmp_path):
    manifest = _build(tmp_path, n=11, samples_per_shard=2)  # 6 shards
    labels = {i: i % len(CLASSES) for i in range(11)}
    seen: list[int] = []
    for rank in range(2):
        loader = make_loader(
            tmp_path, _to_tensor, batch_size=4, num_workers=2, rank=rank, world_size=2, with_index=True
        )
        rank_seen = []
        for images, batch_labels, indices in loader:
            assert images.shape[1:] == (3, 14, 20)
            assert [labels[int(i)] for i in indices] == batch_labels.tolist()
            rank_seen += indices.tolist()
        assert len(rank_seen) == len(loader.dataset)
        seen += rank_seen
    assert sorted(seen) == list(range(manifest.num_samples))

    keys = [batch[2] for batch in make_loader(tmp_path, _to_tensor, batch_size=5, with_meta=True)]
    assert sum(keys, []) == [f"s{i:03d}" for i in range(11)]


def _write_tree(root: Path) -> dict[str, bytes]:
    """An ImageFolder tree of PNGs (one nested, one with an awkward name); returns rel path -> bytes."""
    files = {
        "cat/a.png": (30, 12),
        "cat/b.png": (9, 9),
        "cat/nested/c.png": (16, 24),
        "dog/d.png": (12, 12),
        "dog/e f.g.png": (40, 20),
        "eel/h.png": (10, 18),
        "eel/i.png": (25, 15),
    }
    out = {}
    for i, (rel, size) in enumerate(sorted(files.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(_image(100 + i, size)))
        out[rel] = path.read_bytes()
    (root / "cat" / ".DS_Store").write_bytes(b"ignored")
    return out


def test_imagefolder_conversion_is_deterministic_and_resizes(tmp_path):
    _write_tree(tmp_path / "src")
    one = write_imagefolder_shards(tmp_path / "src", tmp_path / "w1", samples_per_shard=3, resize_shorter=10, workers=1)
    two = write_imagefolder_shards(tmp_path / "src", tmp_path / "w2", samples_per_shard=3, resize_shorter=10, workers=2)

    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert one.content_hash() == two.content_hash()
    assert (one.name, one.classes, one.num_samples, one.image_format) == ("src", ("cat", "dog", "eel"), 7, "jpg")
    verify_shards(tmp_path / "w2")

    dataset = ShardDataset(tmp_path / "w2", with_meta=True)
    read = [(meta["path"], label, key, image.size) for image, label, key, meta in dataset]
    assert [(path, label) for path, label, _, _ in read] == [
        ("cat/a.png", 0), ("cat/b.png", 0), ("cat/nested/c.png", 0),
        ("dog/d.png", 1), ("dog/e f.g.png", 1), ("eel/h.png", 2), ("eel/i.png", 2),
    ]
    assert read[4][2] == "dog-e_f_g"
    assert [size for *_, size in read] == [(25, 10), (9, 9), (10, 15), (10, 10), (20, 10), (10, 18), (17, 10)]


def test_imagefolder_shuffle_seed_permutes_files_deterministically(tmp_path):
    _write_tree(tmp_path / "src")
    kwargs = dict(samples_per_shard=3, image_format="png", shuffle_seed=0)
    one = write_imagefolder_shards(tmp_path / "src", tmp_path / "w1", workers=1, **kwargs)
    two = write_imagefolder_shards(tmp_path / "src", tmp_path / "w2", workers=2, **kwargs)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    paths = [meta["path"] for *_, meta in ShardDataset(tmp_path / "w1", with_meta=True)]
    assert paths != sorted(paths) and sorted(paths) == sorted(_write_tree(tmp_path / "again"))


def test_imagefolder_keep_copies_source_bytes(tmp_path):
    originals = _write_tree(tmp_path / "src")
    jpg = tmp_path / "src" / "eel" / "j.png"  # a JPEG behind a .png name is re-encoded, not copied
    _image(7).save(jpg, format="JPEG")
    manifest = write_imagefolder_shards(tmp_path / "src", tmp_path / "out", image_format="keep", workers=1)

    assert manifest.image_format == "png" and manifest.metadata["reencoded"] == 1
    members: dict[str, dict[str, bytes]] = {}  # sample key -> extension -> bytes
    with tarfile.open(tmp_path / "out" / manifest.shards[0].name) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    stored = {json.loads(m["json"])["path"]: m["png"] for m in members.values()}
    assert {rel: stored[rel] for rel in originals} == originals
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored["eel/j.png"]))), np.asarray(Image.open(jpg)))


def test_imagefolder_rejects_wrong_layout(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        _image(i).save(flat / f"{i}.png")
    layout = r"SRC/<class>/<image>.*0 class sub-folders and 2 files at the top level \(e.g. 0.png"
    with pytest.raises(ImageFolderError, match=layout):
        write_imagefolder_shards(flat, tmp_path / "out")
    (flat / "cat").mkdir()
    _image(3).save(flat / "cat" / "x.png")
    with pytest.raises(ImageFolderError, match="1 class sub-folders and 2 files at the top level"):
        write_imagefolder_shards(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imagefolder_bad_file_errors_or_is_skipped(tmp_path):
    _write_tree(tmp_path / "src")
    bad = tmp_path / "src" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageFolderError, match=r"cannot read .*dog/broken\.png as an image.*on_bad='skip'"):
        write_imagefolder_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=2, workers=2)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))

    manifest = write_imagefolder_shards(
        tmp_path / "src", tmp_path / "out", samples_per_shard=2, workers=2, on_bad="skip"
    )
    assert manifest.num_samples == 7
    assert manifest.metadata["num_skipped"] == 1
    assert manifest.metadata["skipped"][0]["path"] == "dog/broken.png"
    verify_shards(tmp_path / "out")


def test_shards_are_readable_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    manifest = _build(tmp_path, n=4, samples_per_shard=3)
    urls = [str(path) for path in manifest.shard_paths(tmp_path)]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls"))
    assert [(key, np.asarray(image).tolist(), label) for key, image, label in read] == [
        (key, np.asarray(image).tolist(), label) for key, image, label, _ in _samples(4)
    ]


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    """The direct header writer must produce exactly tarfile's PAX archive, so shard hashes (which key
    the logits cache) do not depend on which writer made them; a 120-character key takes the PAX path."""
    magic = b"\x89PNG\r\n\x1a\n"
    samples = [("a", magic + bytes(700), 1), ("k" * 120, magic + bytes(512 - 8), 2), ("c", magic, 0)]
    shard = ShardFile(tmp_path / "x-000000.tar", "png", 3)
    for key, data, label in samples:
        shard.add(key, data, label, {"i": label})
    info = shard.finish()

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, data, label in samples:
            for name, payload in ((f"{key}.png", data), (f"{key}.cls", str(label).encode()),
                                  (f"{key}.json", json.dumps({"i": label}).encode())):
                member = tarfile.TarInfo(name)
                member.size, member.mtime, member.mode = len(payload), 0, 0o644
                tar.addfile(member, io.BytesIO(payload))
    written = (tmp_path / "x-000000.tar").read_bytes()
    assert written == expected.getvalue()
    assert info.size == len(written) and info.num_samples == 3


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_member_reader_agrees_with_tarfile(tmp_path, tar_format):
    path = tmp_path / "t.tar"
    names = ["a.png", "b" * 99 + ".cls", "dir/" + "c" * 130 + ".json", "é.png"]
    if tar_format == tarfile.USTAR_FORMAT:
        names = ["a.png", "b" * 96 + ".cls", "d" * 90 + "/" + "e" * 60 + ".json"]  # ustar splits long names into prefix/name
    with tarfile.open(path, mode="w", format=tar_format) as tar:
        for i, name in enumerate(names):
            member = tarfile.TarInfo(name)
            member.size = 100 * i + 3
            tar.addfile(member, io.BytesIO(bytes([i]) * member.size))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    with open(path, "rb") as f:
        assert list(iter_tar_members(f)) == expected


def test_member_reader_refuses_links_and_bad_checksums(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, mode="w") as tar:
        link = tarfile.TarInfo("x.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with open(path, "rb") as f, pytest.raises(Exception, match="not a regular file"):
        list(iter_tar_members(f))
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with open(path, "rb") as f, pytest.raises(Exception, match="bad header checksum"):
        list(iter_tar_members(f))


def test_hash_check_reads_a_shard_once_per_version_and_verify_always_rereads(tmp_path, monkeypatch):
    from robustbench_ft.shards import verify as shards_mod

    manifest = _build(tmp_path)
    hashed: list[str] = []
    real = shards_mod.file_sha256
    monkeypatch.setattr(shards_mod, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    monkeypatch.setattr(shards_mod, "_verified", {})
    shards_mod.check_shard_files(manifest, tmp_path, "hash")
    assert sorted(hashed) == sorted(s.name for s in manifest.shards) and (tmp_path / ".verified.json").is_file()
    monkeypatch.setattr(shards_mod, "_verified", {})  # a new process: the stamp file remembers
    shards_mod.check_shard_files(manifest, tmp_path, "hash")
    assert len(hashed) == len(manifest.shards)

    shard = tmp_path / manifest.shards[0].name
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, new content (and mtime): hashed again, and caught
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard.name} is corrupt"):
        shards_mod.check_shard_files(manifest, tmp_path, "hash")
    shard.write_bytes(bytes(data[:700]) + bytes([data[700] ^ 0xFF]) + bytes(data[701:]))
    before = len(hashed)
    verify_shards(tmp_path)  # the explicit check hashes every shard, remembered or not
    assert len(hashed) == before + len(manifest.shards)
