"""The array cache behind evaluation: logits per classifier and image features per encoder, one ``.npy`` per
(content hash, dataset manifest hash, transform id), read memory-mapped and checked before use.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from robustbench_ft import distributed
from robustbench_ft.util import atomic_write_text

_DIGEST_CHUNK = 1 << 24  # bytes of an array hashed at a time (arrays are memory-mapped)
_TEMPORARY = re.compile(r"^\.(?:rows-|.+\.npy\.)(\d+)-[0-9a-f]+\.tmp\.npy$")  # group 1: the writer's pid
_cleaned: set[Path] = set()  # cache directories whose stale temporary files this process removed


class ArrayCache:
    """Arrays on disk, one ``.npy`` per (classifier or encoder, dataset, transform), read memory-mapped.

    Each entry is ``KEY.npy`` (rows in manifest order), ``KEY.labels.npy`` and ``KEY.check.json``
    (shape, dtype and sha256 of both arrays); the array file is moved into place last (atomically),
    so a present array with its check means a complete entry. Before an entry is used its shape is
    compared with what the caller expects (rows = the manifest's sample count) and its bytes with
    the recorded digests: an entry cut short, edited or left by another version is named, dropped and
    recomputed, never scored. Used for logits (``<cache_dir>/logits``) and image features
    (``<cache_dir>/features``).

    Temporary row files of a run that was killed (``.rows-<pid>-*.tmp.npy``) are removed the first
    time a later process opens the cache, when their process no longer runs.
    """

    def __init__(self, root: str | Path, log=print):
        self.root = Path(root)
        self.log = log
        _remove_stale_temporaries(self.root)

    def path(self, content_hash: str, manifest_hash: str, transform: str) -> Path:
        return self.root / f"{content_hash[:20]}-{manifest_hash[:20]}-{transform}.npy"

    @staticmethod
    def labels_path(key: Path) -> Path:
        return key.with_suffix(".labels.npy")

    @staticmethod
    def check_path(key: Path) -> Path:
        return key.with_suffix(".check.json")

    def get(self, key: Path, rows: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(array memory-mapped copy-on-write, labels), or None when absent or not what it claims to be
        (then the caller recomputes it). ``rows``: the number of samples the entry must have."""
        if not key.is_file():
            return None
        try:
            array = np.load(key, mmap_mode="c")
            labels = np.load(self.labels_path(key))
            check = json.loads(self.check_path(key).read_text())
        except (OSError, ValueError):
            return self._drop(key, "unreadable or incomplete")
        problem = _problem(array, labels, check, rows)
        if problem is not None:
            return self._drop(key, problem)
        return array, labels

    def _drop(self, key: Path, why: str) -> None:
        self.log(f"warning: cache entry {key} is {why}; recomputing it")
        if distributed.world().is_main:
            for path in (key, self.labels_path(key), self.check_path(key)):
                path.unlink(missing_ok=True)
        return None

    def put(self, key: Path, array: np.ndarray, labels: np.ndarray) -> None:
        """Store ``array`` and ``labels`` under ``key`` (rank 0 only under torchrun: every rank holds the same rows).

        An array streamed by :class:`~robustbench_ft.evaluation.rows.RowStore` into this cache's
        directory is moved into place, not copied.
        """
        if not distributed.world().is_main:
            return
        labels = np.asarray(labels, dtype=np.int64)
        streamed = Path(array.filename) if isinstance(array, np.memmap) and array.filename else None
        if (streamed is not None and streamed.name.startswith(".rows-") and streamed.is_file()
                and streamed.parent.resolve() == self.root.resolve()):
            self._install(key, streamed, array, labels)
            return
        tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array))
            self._install(key, tmp, np.load(tmp, mmap_mode="r"), labels)
        finally:
            tmp.unlink(missing_ok=True)

    def _tmp(self, key: Path) -> Path:
        # unique per writer: two runs caching the same entry at once must not share a temporary file
        key.parent.mkdir(parents=True, exist_ok=True)
        return key.with_name(f".rows-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npy")

    def _install(self, key: Path, array_file: Path, array: np.ndarray, labels: np.ndarray) -> None:
        tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                np.save(f, labels)
            tmp.replace(self.labels_path(key))
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write_text(self.check_path(key), json.dumps(_check_of(array, labels), sort_keys=True))
        os.replace(array_file, key)


def _digest(array: np.ndarray) -> str:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    h = hashlib.sha256()
    for start in range(0, len(flat), _DIGEST_CHUNK):
        h.update(flat[start:start + _DIGEST_CHUNK])
    return h.hexdigest()


def _check_of(array: np.ndarray, labels: np.ndarray) -> dict:
    return {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": _digest(array),
            "labels_sha256": _digest(labels)}


def _problem(array: np.ndarray, labels: np.ndarray, check: dict, rows: int | None) -> str | None:
    """What is wrong with a cache entry, or None."""
    if array.ndim != 2:
        return f"malformed (an array of shape {array.shape}, not rows of outputs)"
    if rows is not None and array.shape[0] != rows:
        return f"for {array.shape[0]} samples, but the dataset has {rows}"
    if labels.shape != (array.shape[0],):
        return f"malformed ({array.shape[0]} rows against {labels.shape} labels)"
    if not isinstance(check, dict) or check.get("shape") != list(array.shape) or check.get("dtype") != str(array.dtype):
        return "not the shape or dtype its check records"
    if check.get("sha256") != _digest(array) or check.get("labels_sha256") != _digest(labels):
        return "changed since it was written (its bytes differ from the recorded sha256)"
    return None


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary row files whose writing process is gone (a killed run's): ``.rows-<pid>-*.tmp.npy``,
    and ``.KEY.npy.<pid>-*.tmp.npy`` as earlier versions named them."""
    if root in _cleaned or not root.is_dir():
        return
    _cleaned.add(root)
    for path in root.glob(".*.tmp.npy"):
        match = _TEMPORARY.match(path.name)
        if match and int(match[1]) != os.getpid() and not _alive(int(match[1])):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
