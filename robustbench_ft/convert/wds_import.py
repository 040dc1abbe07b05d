"""Reading WebDataset copies laid out as CLIP_benchmark exports them, from a directory or a URL prefix.

Layout (CLIP_benchmark ``webdataset_builder.py`` and ``datasets/builder.py::build_wds_dataset``,
github.com/LAION-AI/CLIP_benchmark @ 48de38c; DataComp's ``djghosh/wds_*_test`` copies are the same)::

    ROOT/classnames.txt                           one class name per line, in label order
    ROOT/zeroshot_classification_templates.txt    one template per line, with {c}
    ROOT/<split>/nshards.txt                      the number of shards N
    ROOT/<split>/0.tar ... <split>/<N-1>.tar      members sNNNNNNN.webp|jpg|png + sNNNNNNN.cls (+ .npy)

``.cls`` is the label as ASCII digits (webdataset's writer ``str(x).encode("ascii")``); ``.npy`` is
one row of a WILDS ``metadata_array`` (``np.save`` bytes) in DataComp's WILDS copies.

ROOT is a local directory or a URL prefix (see :mod:`robustbench_ft.shards.urls`). A Hugging Face
dataset URL may be given as its ``tree``, ``resolve`` or ``raw`` link
(``https://huggingface.co/datasets/<org>/<repo>/tree/<revision>``); every file is then read from the
``resolve/<revision>/`` link and the revision is recorded (a 40-hex commit pins the copy; a branch
such as ``main`` does not). Tars at a URL are first downloaded beside the output, hashed while they
arrive and kept under ``OUT/.wds-source/`` until the conversion is complete, so a killed import
resumes: finished downloads are reused (size and sha256 recorded next to them), the shard writing
resumes as every converter's does (:mod:`robustbench_ft.convert.engine`). A local ROOT is read in
place. Members are indexed with :mod:`tarfile` (byte offsets, so worker processes read images from
the tar without the set in memory); keys and extensions are split as webdataset splits them
(``webdataset.tariterators.base_plus_ext``).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustbench_ft.convert.sources import ConversionError
from robustbench_ft.shards import urls
from robustbench_ft.util import atomic_write_text, file_sha256

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
IMAGE_EXTS = ("webp", "jpg", "jpeg", "png")
STAGING = ".wds-source"
_HF = re.compile(r"^https://huggingface\.co/datasets/(?P<repo>[^/]+/[^/]+)/(?:tree|resolve|raw|blob)/"
                 r"(?P<rev>[^/]+)(?P<rest>/.*)?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MAX_SHARDS = 100_000


@dataclass(frozen=True)
class WdsSource:
    """Where a copy's files are: ``root`` (a directory or URL prefix) and, for a hub URL, repo and revision."""

    root: str | Path
    given: str
    repo: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, src: str | os.PathLike) -> "WdsSource":
        text = str(src)
        match = _HF.match(text)
        if match:
            rest = (match.group("rest") or "").strip("/")
            root = f"https://huggingface.co/datasets/{match.group('repo')}/resolve/{match.group('rev')}"
            return cls(root + (f"/{rest}" if rest else ""), text, match.group("repo"), match.group("rev"))
        if urls.is_url(text):
            return cls(text, text)
        path = Path(text)
        if not path.is_dir():
            raise FileNotFoundError(f"import-wds: {path} is not a directory (give a CLIP_benchmark-layout copy: "
                                    f"{CLASSNAMES}, <split>/nshards.txt, <split>/0.tar ...; or its URL)")
        return cls(path, text)

    @property
    def is_remote(self) -> bool:
        return urls.is_url(self.root)

    def file(self, rel: str) -> str | Path:
        return urls.join(self.root, rel)

    def provenance(self) -> dict:
        """What the manifest records of where the copy came from."""
        out: dict = {"url": urls.describe(self.given) if self.is_remote else "local directory"}
        if self.repo:
            out.update({"hub_repo": self.repo, "revision": self.revision,
                        "pinned": bool(_COMMIT.fullmatch(self.revision or ""))})
        return out


def read_lines(source: WdsSource, rel: str, *, required: bool = True) -> list[str] | None:
    """Non-empty stripped lines of a text file of the copy; None when absent and not ``required``."""
    try:
        text = urls.read_text(source.file(rel))
    except FileNotFoundError:
        if not required:
            return None
        raise ConversionError(f"import-wds: {urls.describe(source.file(rel))} is missing; a CLIP_benchmark-layout "
                              f"copy has {CLASSNAMES} at its root and <split>/nshards.txt") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def shard_count(source: WdsSource, split: str) -> int:
    lines = read_lines(source, f"{split}/nshards.txt") or []
    try:
        count = int(lines[0]) if len(lines) == 1 else -1
    except ValueError:
        count = -1
    if not 1 <= count <= _MAX_SHARDS:
        raise ConversionError(f"import-wds: {urls.describe(source.file(f'{split}/nshards.txt'))} must hold one "
                              f"number of shards (1..{_MAX_SHARDS}), got {' '.join(lines)[:40]!r}")
    return count


@dataclass(frozen=True)
class SourceShard:
    """One tar of the copy, as read: its name in the copy (``test/0.tar``), a local path, size and sha256."""

    name: str
    path: Path
    size: int
    sha256: str


def fetch_shards(source: WdsSource, split: str, staging: Path, log: Callable[[str], None] = print
                 ) -> list[SourceShard]:
    """Every tar of ``split``: a local copy's files in place, a remote copy's downloaded into ``staging``
    (kept between runs: a finished download, recorded with its size and sha256, is not fetched again)."""
    shards = []
    reused = 0
    for i in range(shard_count(source, split)):
        name = f"{split}/{i}.tar"
        if not source.is_remote:
            path = Path(source.file(name))
            if not path.is_file():
                raise ConversionError(f"import-wds: {path} is missing ({split}/nshards.txt lists "
                                      f"{shard_count(source, split)} shards)")
            shards.append(SourceShard(name, path, path.stat().st_size, file_sha256(path)))
            continue
        done = _downloaded(staging, name)
        if done is not None:
            reused += 1
            shards.append(done)
            continue
        shards.append(_download(source, name, staging))
    if reused:
        log(f"import-wds: reusing {reused} of {len(shards)} source shards downloaded before, in {staging}")
    return shards


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.done.json")


def _downloaded(staging: Path, name: str) -> SourceShard | None:
    path = staging / name
    try:
        done = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if path.stat().st_size == int(done["size"]):
            return SourceShard(name, path, int(done["size"]), str(done["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _download(source: WdsSource, name: str, staging: Path) -> SourceShard:
    path = staging / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    url = source.file(name)
    try:
        reader = urls.HashingReader(urls.open_url(url), str(url))  # closing it checks a pipe: command's status
        try:
            with open(partial, "wb") as out:
                while chunk := reader.read(1 << 20):
                    out.write(chunk)
            size, digest = reader.finish()
        finally:
            reader.close()
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"import-wds: {urls.describe(url)} is missing (nshards.txt lists it)") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    atomic_write_text(_sidecar(path), json.dumps({"url": urls.describe(url), "size": size, "sha256": digest}))
    return SourceShard(name, path, size, digest)


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class WdsSample:
    """One sample of a copy's tar: where its image bytes are, its label and its WILDS metadata row."""

    key: str
    source: str                      # "test/0.tar:s0000123.webp": names the image in the copy
    path: str                        # the local tar
    span: tuple[int, int]            # (offset, size) of the image member's bytes in the tar
    label: int
    npy: np.ndarray | None = None


def iter_samples(shard: SourceShard) -> Iterator[WdsSample]:
    """The samples of one tar in stored order; a sample without one image and a ``.cls`` label is an error."""
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(shard.path, "r:") as tar:
            group: dict[str, tarfile.TarInfo] = {}
            key = None
            for member in tar:
                if not member.isreg():
                    continue
                prefix, ext = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != key and group:
                    yield _sample(tar, shard, key, group)
                    group = {}
                key = prefix
                group[ext.lower()] = member
            if group:
                yield _sample(tar, shard, key, group)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConversionError(f"import-wds: {shard.name} ({shard.path}) is not a readable tar ({exc}); delete it "
                              "to download it again") from None


def _sample(tar: tarfile.TarFile, shard: SourceShard, key: str | None, group: dict[str, tarfile.TarInfo]) -> WdsSample:
    images = [ext for ext in group if ext in IMAGE_EXTS]
    if key is None or len(images) != 1 or "cls" not in group:
        raise ConversionError(f"import-wds: {shard.name}: sample {key!r} has members {sorted(group)}; a "
                              f"CLIP_benchmark-layout sample has one image ({'/'.join(IMAGE_EXTS)}) and a .cls label")
    raw = tar.extractfile(group["cls"]).read()  # type: ignore[union-attr]
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConversionError(f"import-wds: {shard.name}: sample {key!r} has label {raw[:20]!r}, not an integer") \
            from None
    npy = None
    if "npy" in group:
        try:
            npy = np.load(io.BytesIO(tar.extractfile(group["npy"]).read()), allow_pickle=False)  # type: ignore[union-attr]
        except ValueError as exc:
            raise ConversionError(f"import-wds: {shard.name}: sample {key!r} has an unreadable .npy ({exc})") from None
    member = group[images[0]]
    return WdsSample(key, f"{shard.name}:{Path(member.name).name}", str(shard.path),
                     (member.offset_data, member.size), label, npy)
