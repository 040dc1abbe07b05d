"""Checking a shard set against its manifest: presence, sizes, sha256 (a match remembered per file version).

Verification and the readers turn a missing, truncated or corrupt shard into a :class:`ShardError`
that names the file and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from robustbench_ft.shards.manifest import MANIFEST_FILE, REBUILD_HINT, Manifest, ShardError, ShardInfo
from robustbench_ft.shards.reader import read_shard
from robustbench_ft.util import file_sha256


def check_shard_files(manifest: Manifest, directory: str | os.PathLike, verify: str = "size") -> None:
    """Check that every shard of ``manifest`` exists and, by level, matches its size or sha256.

    ``verify``: "none" checks existence only, "size" also the byte size (catches truncation and
    interrupted copies for the price of a stat), "hash" also the sha256 (reads every byte the first
    time; a match is remembered per file version, see :func:`_sha256_matches`).
    """
    directory = Path(directory)
    for info in manifest.shards:
        problem = shard_problem(info, directory, verify)
        if problem is not None:
            raise ShardError(f"{problem}; {REBUILD_HINT}")


def shard_problem(info: ShardInfo, directory: str | os.PathLike, verify: str = "size") -> str | None:
    """What is wrong with one shard file at ``verify`` level (see :func:`check_shard_files`), or None."""
    if verify not in ("none", "size", "hash"):
        raise ValueError(f"verify must be 'none', 'size' or 'hash', got {verify!r}")
    path = Path(directory) / info.name
    if not path.is_file():
        return f"shard {path} is missing (listed in {Path(directory) / MANIFEST_FILE})"
    if verify == "none":
        return None
    size = path.stat().st_size
    if size != info.size:
        return f"shard {path} has {size} bytes but the manifest says {info.size}: it is truncated or was replaced"
    if verify == "hash" and not _sha256_matches(path, info.sha256):
        return f"shard {path} is corrupt: its sha256 differs from the manifest's"
    return None


VERIFIED_FILE = ".verified.json"
_verified: dict[Path, dict[str, list]] = {}  # directory -> its VERIFIED_FILE, read once per process


def _sha256_matches(path: Path, expected: str) -> bool:
    """Whether ``path`` hashes to ``expected``, reading it once per file version.

    A match is remembered, by (size, mtime, ctime, inode), in memory and in ``.verified.json`` beside the
    manifest where the directory is writable, so that every evaluation of a large set does not
    re-read gigabytes; a file that changed in any of these is hashed again. (The check guards against
    damage, not against someone who rewrites a shard and restores its timestamps.)
    """
    stat = path.stat()
    version = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, expected]
    stamps = _verified.get(path.parent)
    if stamps is None:
        try:
            stamps = json.loads((path.parent / VERIFIED_FILE).read_text())
            stamps = stamps if isinstance(stamps, dict) else {}
        except (OSError, ValueError):
            stamps = {}
        _verified[path.parent] = stamps
    if stamps.get(path.name) == version:
        return True
    if file_sha256(path) != expected:
        return False
    stamps[path.name] = version
    try:
        from robustbench_ft.util import atomic_write_text

        atomic_write_text(path.parent / VERIFIED_FILE, json.dumps(stamps, sort_keys=True))
    except OSError:  # a read-only dataset directory: remembered for this process only
        pass
    return True


def verify_shards(directory: str | os.PathLike, check_hashes: bool = True) -> Manifest:
    """Check a shard set end to end against its manifest; return the manifest if everything matches.

    Existence, size, sha256 (``check_hashes``: every byte is hashed now, whatever an earlier check
    remembered), then every shard is read: sample counts, labels, image format and key uniqueness.
    Raises :class:`ShardError` naming the first bad file.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    check_shard_files(manifest, directory, "size")
    for info, path in zip(manifest.shards, manifest.shard_paths(directory)):
        if check_hashes and file_sha256(path) != info.sha256:
            raise ShardError(f"shard {path} is corrupt: its sha256 differs from the manifest's; {REBUILD_HINT}")
    keys: set[str] = set()
    for info, path in zip(manifest.shards, manifest.shard_paths(directory)):
        for sample in read_shard(path, len(manifest.classes), expected_samples=info.num_samples):
            if sample.image_ext != manifest.image_format:
                raise ShardError(
                    f"shard {path}: sample {sample.key!r} is {sample.image_ext}, the manifest says "
                    f"{manifest.image_format}; {REBUILD_HINT}"
                )
            if sample.key in keys:
                raise ShardError(
                    f"shard {path}: sample key {sample.key!r} occurs twice in the shard set; {REBUILD_HINT}"
                )
            keys.add(sample.key)
    return manifest
