"""Small things used everywhere: atomic writes, file and value hashes, safe names, "did you mean", the silent log.

The lowest layer with :mod:`robustbench_ft.typed`: it imports nothing of the package.
"""
from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

_HASH_CHUNK = 1 << 20


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename: readers see the old
    file or the whole new one, never a truncated one, even if the process is killed mid-write."""
    path = Path(path)
    if path.is_dir():  # say so for the path given, not for the temporary file beside it
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records and reports are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able value, independent of dict order (config identities, record ids)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def slugify(text: str) -> str:
    """A file-system-safe name for a candidate or run ("wise-ft α=0.50" -> "wise-ft-alpha-0.50")."""
    text = text.replace("α", "alpha").replace("=", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "record"


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that refuses an object naming a key twice (JSON parsers
    disagree on which value wins, so a file could show one reader one number and another another)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"the key {key[:40]!r} appears twice in one object")
        out[key] = value
    return out


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the closest valid name, or ""."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> KeyError:
    """A KeyError that lists the valid names and suggests the closest one."""
    valid = sorted(valid)
    return KeyError(f"unknown {kind} {name!r}.{did_you_mean(name, valid)} Valid {kind}s: {', '.join(valid)}")


def silent(message: str) -> None:
    """A log that says nothing (build workers of ``prepare_suite``; ranks other than 0 under torchrun)."""
